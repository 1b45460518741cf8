"""Response cross-entropy computed only where it is supervised, and the vocabulary projection in chunks.

A masked CE on a [B, T, V] logit tensor pays the lm_head matmul and a V-way softmax at every position, including
prompt and padding positions whose labels are -100. Here the hidden states of the supervised positions are picked
first (`supervised_rows`), and only those rows are projected:
- `supervised_ce`: the CE of the final hidden state's rows (plain autograd, so double backward works);
- `chunked_head_ce_sum`: the summed CE of many rows (the logit lens: every hidden state's rows stacked) through
  a bias-free linear head, `chunk_rows` rows at a time. Its gradient is formed chunk by chunk during the forward
  (d CE / d logits = softmax - onehot is known there), so no [rows, V] tensor outlives its chunk; the backward
  only scales the stored gradients by the incoming factor. It is exact (not an approximation) and costs the
  same three matmuls per row as autograd would, but cannot be differentiated twice.
`response_forward` runs the decoder without the head, so no full-logit tensor is formed at all.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from immunize.lightning_modules.modeling.sharding import is_fsdp_model
from immunize.lightning_modules.functional.grad_math import IGNORE, masked_ce
from immunize.lightning_modules.modeling.hidden_hooks import decoder, unwrap

# Model families whose logits are exactly lm_head(final hidden state) (no soft-capping or logit scaling).
PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "smollm3")
CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB in fp32): rows per chunk = CHUNK_ELEMENTS // vocab


def supervised_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices into the flattened [B * T] positions whose next label is supervised, those next labels).

    Position t of row b predicts labels[b, t + 1]; it is supervised when that label is not -100.
    """
    following = torch.full_like(labels, IGNORE)
    following[:, :-1] = labels[:, 1:]
    following = following.reshape(-1)
    rows = (following != IGNORE).nonzero().squeeze(1)
    return rows, following.index_select(0, rows)


def pick_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H] -> the [len(rows), H] rows at the flattened positions `rows`."""
    return hidden.reshape(-1, hidden.size(-1)).index_select(0, rows)


def supervised_ce(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Mean CE of head(hidden) over the supervised positions, in fp32; 0 (attached) when there are none.

    Equal to masked_ce(head(hidden), labels) without projecting the other positions.
    """
    rows, targets = supervised_rows(labels)
    logits = head(pick_rows(hidden, rows))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, reduction="sum") / max(int(rows.numel()), 1)


class _ChunkedLinearCE(torch.autograd.Function):
    """sum_i CE(x_i W^T, y_i) with the gradient formed chunk by chunk in the forward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        wide = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        grad_w = torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=wide, device=x.device)
        for start in range(0, x.size(0), chunk_rows):
            xc, yc = x[start:start + chunk_rows], targets[start:start + chunk_rows]
            logits = (xc @ weight.t()).to(wide)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc.unsqueeze(1)).squeeze(1)).sum()
            if need_x or need_w:
                d_logits = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                d_logits[torch.arange(yc.numel(), device=yc.device), yc] -= 1.0
                d_logits = d_logits.to(weight.dtype)
                if need_x:
                    grad_x[start:start + chunk_rows] = d_logits @ weight
                if need_w:
                    if d_logits.dtype == wide and xc.dtype == wide:
                        # accumulates in the GEMM (no [V, H] temporary); the out= form is what FLOP counters see
                        torch.addmm(grad_w, d_logits.t(), xc, out=grad_w)
                    else:
                        grad_w.add_((d_logits.t() @ xc).to(wide))
            del logits
        ctx.save_for_backward(grad_x, grad_w)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        grad_x, grad_w = ctx.saved_tensors
        dx = grad_x * grad_total.to(grad_x.dtype) if grad_x is not None else None
        dw = grad_w * grad_total if grad_w is not None else None
        return dx, dw, None, None


def chunked_head_ce_sum(x: torch.Tensor, targets: torch.Tensor, head: nn.Module,
                        chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Summed CE of head(x) over the rows of x [N, H] against targets [N], `chunk_rows` rows at a time.

    A bias-free nn.Linear head (Llama's lm_head, tied or not) takes the chunked path; any other head (a bias, a
    LoRA-wrapped head) is projected by ordinary autograd in chunks of the same size (exact, more memory).
    """
    if x.size(0) == 0:
        return x.sum() * 0.0
    vocab = head.weight.shape[0] if hasattr(head, "weight") else CHUNK_ELEMENTS
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // vocab)
    if type(head) is nn.Linear and head.bias is None and torch.is_grad_enabled():
        return _ChunkedLinearCE.apply(x, head.weight, targets, rows)
    wide = torch.promote_types(x.dtype, torch.float32)
    return sum(F.cross_entropy(head(x[s:s + rows]).to(wide), targets[s:s + rows], reduction="sum")
               for s in range(0, x.size(0), rows))


def has_plain_head(model: nn.Module) -> bool:
    """Whether the model's logits are exactly lm_head(final hidden state), so the head may be applied to chosen rows."""
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "model_type", None) in PLAIN_HEAD_TYPES


def response_forward(model: nn.Module, part: dict, hidden: bool = False):
    """(mean response CE of a batch part, its hidden states or None) from one forward.

    With a plain head the decoder runs without the head and only the supervised positions are projected; other
    models, and FSDP2-sharded ones (whose root unit gathers the embeddings and head only in the whole model's
    forward), run their own forward (full logits, masked CE): the same value either way.
    """
    if has_plain_head(model) and not is_fsdp_model(model):
        out = decoder(model)(input_ids=part["input_ids"], attention_mask=part["attention_mask"],
                             output_hidden_states=hidden, use_cache=False)
        ce = supervised_ce(out.last_hidden_state, part["labels"], unwrap(model).get_output_embeddings())
    else:
        out = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], output_hidden_states=hidden,
                    use_cache=False)
        ce = masked_ce(out.logits, part["labels"])
    return ce, (tuple(out.hidden_states) if hidden else None)


def response_ce(model: nn.Module, part: dict) -> torch.Tensor:
    """Mean response CE of a batch part (see response_forward)."""
    return response_forward(model, part)[0]
