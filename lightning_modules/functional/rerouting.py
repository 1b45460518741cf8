"""Circuit Breakers' math (representation rerouting, Zou et al. 2024) as plain functions on hidden states.

Hidden states come as sequences of [B, T, H] tensors (one per layer), the current model's and the original model's
(the same network with its LoRA adapter switched off) on the same batch, with the batch's attention mask [B, T]:
- `rerouting_loss`: ReLU of the cosine between current and original states per token, summed over layers and
  unmasked tokens, divided by layers x unmasked tokens (the reference divides by its mask repeated over the
  layers, so this is the mean over layers and tokens);
- `retain_loss`: the L2 norm over the hidden dimension of (current - original), both zeroed at padding, averaged
  over layers x batch x positions (padding counts as zeros, as in the reference);
- `rerouting_coefficients`: p = step / schedule_steps, (c_rr, c_retain) = (alpha (1 - p), alpha p), with c_rr
  kept at 0 once p >= 1 (the reference then skips the rerouting term).
Everything is formed in float32 or wider (the reference takes its norms with dtype=float).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

NORM_FLOOR = 1e-12  # a zero hidden vector has cosine 0 here (the reference divides by its norm: NaN)


def _stacked(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """[L, B, T, H] in float32 (or wider) from L tensors [B, T, H]."""
    stacked = torch.stack(list(states))
    return stacked.to(torch.promote_types(stacked.dtype, torch.float32))


def token_cosines(current: Sequence[torch.Tensor], original: Sequence[torch.Tensor]) -> torch.Tensor:
    """[L, B, T] cosine between each current and original hidden vector."""
    cur = _stacked(current)
    orig = _stacked(original).to(cur.dtype)
    cur = cur / cur.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
    orig = orig / orig.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
    return (cur * orig).sum(-1)


def rerouting_loss(current: Sequence[torch.Tensor], original: Sequence[torch.Tensor],
                   mask: torch.Tensor) -> torch.Tensor:
    """sum over layers and tokens of mask * ReLU(cos(current, original)) / (layers * mask.sum()); 0 (attached) when
    the mask is empty."""
    cos = token_cosines(current, original)
    m = mask.to(cos.dtype)
    return (torch.relu(cos) * m).sum() / (len(current) * m.sum()).clamp_min(1.0)


def retain_loss(current: Sequence[torch.Tensor], original: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """mean over layers x batch x positions of |mask * current - mask * original|_2 (norm over the hidden dim)."""
    cur = _stacked(current)
    m = mask.to(cur.dtype)[None, :, :, None]
    return (cur * m - _stacked(original).to(cur.dtype) * m).norm(dim=-1).mean()


def masked_cosine(current: Sequence[torch.Tensor], original: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The mean cosine over layers and unmasked tokens (a diagnostic: the reference prints it as cb_cos_sim and
    retain_cos_sim)."""
    cos = token_cosines(current, original)
    m = mask.to(cos.dtype)
    return (cos * m).sum() / (len(current) * m.sum()).clamp_min(1.0)


def rerouting_coefficients(step: int, alpha: float, schedule_steps: int) -> tuple[float, float]:
    """(c_rr, c_retain) at optimizer step `step` (1 at the first step): p = step / schedule_steps,
    c_rr = alpha * max(1 - p, 0), c_retain = alpha * p (p is not capped: c_retain keeps growing past schedule_steps,
    as in the reference)."""
    if step < 1 or schedule_steps < 1:
        raise ValueError(f"rerouting_coefficients needs step >= 1 and schedule_steps >= 1, got {step}, {schedule_steps}")
    p = step / schedule_steps
    return alpha * max(1.0 - p, 0.0), alpha * p
