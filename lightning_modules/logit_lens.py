"""Logit-lens cross-entropy over all hidden states and the log-bounded ascent loss (SEAM's L_ul, RepNoise)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from lightning_modules.grad_math import masked_ce


def logit_lens_ce(hidden_states: Sequence[torch.Tensor], final_logits: torch.Tensor, labels: torch.Tensor,
                  lm_head: Callable[[torch.Tensor], torch.Tensor],
                  final_norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Honest mean of masked CEs: lm_head(final_norm(h_k)) for every hidden state but the last, plus the real logits.

    With HF Llama (transformers 5.x) `output_hidden_states=True` gives the embedding output, the
    outputs of layers 1..L-1, and as the LAST entry the final layer's output already passed through
    model.norm, so lm_head(hidden_states[-1]) are the real logits: that term is the CE of
    `final_logits` and is not normalised again. With L layers that is L + 1 terms, divided by L + 1.
    (The reference code normalises the last state a second time and divides the L + 1 terms by L:
    an off-by-one we do not copy.)
    """
    if len(hidden_states) < 1:
        raise ValueError("logit_lens_ce: need at least one hidden state")
    terms = [masked_ce(lm_head(final_norm(h)), labels) for h in hidden_states[:-1]]
    terms.append(masked_ce(final_logits, labels))
    return torch.stack(terms).mean()


def bounded_ascent(ce_mean: torch.Tensor) -> torch.Tensor:
    """-log(1 + CE): minimising it raises the CE, and the log keeps the ascent bounded."""
    return -torch.log1p(ce_mean)
