"""Logit-lens cross-entropy over all hidden states and the log-bounded ascent loss (SEAM's L_ul, RepNoise).

Only the supervised positions are projected, and the intermediate states' projections go through the chunked
head (supervised_ce.chunked_head_ce_sum): the lens never holds a [tokens, vocab] tensor per hidden state, and
its gradient is formed one chunk at a time. Because the lens is a mean of per-token CEs, and SEAM's
-log(1 + S) a scalar function of that mean, the gradient of the whole loss is a known factor times the sum of
the per-chunk gradients; autograd applies that factor when it calls the chunked head's backward.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from immunize.lightning_modules.functional.supervised_ce import chunked_head_ce_sum, pick_rows, supervised_ce, supervised_rows

LENS_MEANS = ("honest", "reference")


def logit_lens_ce(hidden_states: Sequence[torch.Tensor], labels: torch.Tensor, lm_head: torch.nn.Module,
                  final_norm: Callable[[torch.Tensor], torch.Tensor], final_ce: Optional[torch.Tensor] = None,
                  chunk_rows: Optional[int] = None, mean: str = "honest") -> torch.Tensor:
    """Honest mean of the response CEs of lm_head(final_norm(h_k)) for every hidden state but the last, and of
    the real logits lm_head(h_last).

    With HF Llama (transformers 5.x) `output_hidden_states=True` gives the embedding output, the outputs of
    layers 1..L-1, and as the LAST entry the final layer's output already passed through model.norm, so
    lm_head(hidden_states[-1]) are the real logits: that term is not normalised again. With L layers that is
    L + 1 terms, divided by L + 1 (mean "honest"). The SEAM and RepNoise reference code also passes the last state
    through the lens (normalised a second time) and divides those L + 2 terms by L + 1: mean "reference".

    Args:
        final_ce: the response CE of the real logits when the caller already has it (it is the last term).
        chunk_rows: rows per chunk of the vocabulary projection (default: about 8M logits per chunk).
        mean: "honest" or "reference" (above).
    """
    if mean not in LENS_MEANS:
        raise ValueError(f"logit_lens_ce: mean must be one of {LENS_MEANS}, got {mean!r}")
    if len(hidden_states) < 1:
        raise ValueError("logit_lens_ce: need at least one hidden state")
    if final_ce is None:
        final_ce = supervised_ce(hidden_states[-1], labels, lm_head)
    rows, targets = supervised_rows(labels)
    early = hidden_states[:-1] if mean == "honest" else hidden_states
    divisor = len(hidden_states)
    if not early or rows.numel() == 0:
        return final_ce / divisor  # no lens rows (no layers, or no supervised token: every term is 0)
    stacked = final_norm(torch.cat([pick_rows(h, rows) for h in early]))
    lens_sum = chunked_head_ce_sum(stacked, targets.repeat(len(early)), lm_head, chunk_rows)
    return (lens_sum / rows.numel() + final_ce) / divisor


def bounded_ascent(ce_mean: torch.Tensor) -> torch.Tensor:
    """-log(1 + CE): minimising it raises the CE, and the log keeps the ascent bounded."""
    return -torch.log1p(ce_mean)
