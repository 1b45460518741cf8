"""The math of refusal-direction ablation (Arditi et al. 2024; andyrdt/refusal_direction pipeline/submodules/
generate_directions.py, select_direction.py, utils/hook_utils.py, utils/utils.py), as plain functions on tensors.

- Candidates: r[i, l] = mean(harmful) - mean(harmless) of the residual stream entering block l at post-instruction
  position i, in float64, not normalised (`mean_difference`).
- Refusal score: log p(refusal tokens) - log(1 - p) at the last prompt position (`refusal_score`).
- Selection: drop a candidate whose layer >= int((1 - prune) * L), whose KL on the harmless last-position
  distribution under ablation is > 0.1, whose induce score is < 0, or with any NaN; take the lowest bypass score
  (`discard_reason`, `select_candidate`).
- Ablation: x <- x - (x . r_hat) r_hat (`project_out`); its permanent form on a weight that writes to the residual
  stream is W <- W - r_hat r_hat^T W on the d_model side (`orthogonalize_output`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from immunize.errors import UserError


def unit(direction: torch.Tensor) -> torch.Tensor:
    """direction / ||direction||, or a one-line UserError for a zero or non-finite direction."""
    norm = direction.double().norm()
    if not torch.isfinite(norm) or norm == 0:
        raise UserError(f"the refusal direction has norm {norm.item()}; harmful and harmless prompts give the same "
                        "mean activation there: choose another layer or position, or other prompts")
    return direction / norm.to(direction.dtype)


def project_out(x: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """x minus its component along the unit vector r_hat, over the last dimension (computed in at least float32,
    returned in x's dtype)."""
    work = torch.promote_types(x.dtype, torch.float32)
    r = r_hat.to(device=x.device, dtype=work)
    xw = x.to(work)
    return (xw - (xw @ r).unsqueeze(-1) * r).to(x.dtype)


def orthogonalize_output(weight: torch.Tensor, r_hat: torch.Tensor, d_model_last: bool) -> torch.Tensor:
    """W - r_hat r_hat^T W on the d_model side of a weight that writes to the residual stream: the last dimension
    for an embedding table (rows are d_model vectors) or a bias, the first for an nn.Linear weight (out, in)."""
    return project_out(weight, r_hat) if d_model_last else project_out(weight.T, r_hat).T


def mean_difference(harmful_sum: torch.Tensor, n_harmful: int, harmless_sum: torch.Tensor,
                    n_harmless: int) -> torch.Tensor:
    """mean(harmful) - mean(harmless) from sums of activations and counts (float64, not normalised)."""
    if n_harmful < 1 or n_harmless < 1:
        raise UserError(f"the refusal direction needs harmful and harmless prompts, got {n_harmful} harmful and "
                        f"{n_harmless} harmless after filtering; give more prompts (data.n_train) or set "
                        "model.filter_prompts false")
    return harmful_sum.double() / n_harmful - harmless_sum.double() / n_harmless


def refusal_score(last_logits: torch.Tensor, token_ids: Sequence[int], eps: float = 1e-8) -> torch.Tensor:
    """Per row: log p(refusal) - log(1 - p(refusal)), p the softmax mass of `token_ids` in float64."""
    probs = torch.softmax(last_logits.double(), dim=-1)
    p = probs[:, list(token_ids)].sum(dim=-1)
    return torch.log(p + eps) - torch.log(1 - p + eps)


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per row: KL(p || q) of the softmax distributions, in float64, with the reference's epsilon inside the logs."""
    p = torch.softmax(logits_p.double(), dim=-1)
    q = torch.softmax(logits_q.double(), dim=-1)
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(dim=-1)


def discard_reason(bypass: float, induce: float, kl: float, layer: int, n_layers: int, kl_threshold: float = 0.1,
                   induce_threshold: float = 0.0, prune_fraction: float = 0.2) -> Optional[str]:
    """Why the reference's filter drops a candidate (select_direction.filter_fn), or None when it is kept."""
    if any(math.isnan(v) for v in (bypass, induce, kl)):
        return "nan"
    if prune_fraction is not None and layer >= int(n_layers * (1.0 - prune_fraction)):
        return "late_layer"
    if kl_threshold is not None and kl > kl_threshold:
        return "kl"
    if induce_threshold is not None and induce < induce_threshold:
        return "induce"
    return None


def select_candidate(rows: Sequence[dict]) -> dict:
    """The kept candidate (discarded None) with the lowest bypass score; ties keep the earlier row."""
    kept = [r for r in rows if r.get("discarded") is None]
    if not kept:
        reasons = sorted({r.get("discarded") for r in rows})
        raise UserError("every refusal-direction candidate was filtered out (reasons: "
                        f"{', '.join(map(str, reasons))}); set model.layer (and model.position) to take one, set "
                        "model.if_all_filtered lowest_bypass, or loosen model.kl_threshold / model.induce_threshold")
    return min(kept, key=lambda r: r["bypass"])
