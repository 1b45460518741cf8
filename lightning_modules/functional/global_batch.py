"""Small DDP helpers for SEAM: make per-rank batch means add up to the global-batch mean exactly.

Under DDP each rank sees part of the global batch. Averaging per-rank token means equals the
global token mean only when every rank holds the same number of response tokens, and
averaging gradients of a nonlinear function of a mean (SEAM's -log(1 + S)) is not the
gradient of that function of the global mean. These two helpers fix both, so SEAM's update
does not depend on how the global batch is split across ranks.
"""
from __future__ import annotations

from typing import Sequence

import torch

from immunize.lightning_modules.functional.grad_math import IGNORE, all_reduce_mean_


def active_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of supervised next-token positions (labels[:, 1:] != -100), as masked_ce counts them."""
    return (labels[:, 1:] != IGNORE).sum()


def rank_weights(label_batches: Sequence[torch.Tensor]) -> list[float]:
    """Per-batch weights w = local tokens / mean over ranks of local tokens (1.0 when not distributed).

    A rank's masked-CE mean times w, averaged over ranks, is the token mean of the global batch.
    One small all-reduce for all batches together.
    """
    return count_weights([active_tokens(y) for y in label_batches])


def count_weights(counts: Sequence[torch.Tensor]) -> list[float]:
    """Per-count weights w = local count / mean over ranks of that count (1.0 when not distributed, or when the
    mean is 0): a rank's mean over its own count, times w and averaged over ranks, is the global-batch mean.
    One small all-reduce for all counts together."""
    local = torch.stack([torch.as_tensor(c).to(torch.float64) for c in counts])
    mean = all_reduce_mean_([local.clone()])[0]
    return [float(c / m) if m > 0 else 1.0 for c, m in zip(local.tolist(), mean.tolist())]


def global_value(local: torch.Tensor) -> torch.Tensor:
    """Straight-through all-reduce: the value is the mean over ranks, the gradient is the local one.

    f(global_value(x)) then has gradient f'(mean x) * dx locally, and the DDP average of those
    gradients is the gradient of f(mean x): exact for nonlinear f such as SEAM's bounded ascent.
    """
    mean = all_reduce_mean_([local.detach().clone()])[0]
    return local + (mean - local.detach())
