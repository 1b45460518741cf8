"""Mechanism diagnostics measured on a model after training (plain functions; the test loop calls them)."""
from __future__ import annotations

from typing import Sequence

import torch

from immunize.lightning_modules.functional.grad_math import dot, global_norm, grads_of
from immunize.lightning_modules.functional.supervised_ce import response_ce


def round_robin_tasks(items: Sequence) -> list:
    """Items reordered task by task in turn (first item of every task, then the second, ...)."""
    by_task: dict[str, list] = {}
    for it in items:
        by_task.setdefault(it.kind, []).append(it)
    longest = max((len(v) for v in by_task.values()), default=0)
    return [v[i] for i in range(longest) for v in by_task.values() if i < len(v)]


def gradient_cosine(model: torch.nn.Module, params: Sequence[torch.Tensor], batch_a: dict, batch_b: dict) -> float:
    """cos(grad CE(batch_a), grad CE(batch_b)) over `params` (response-only CE on the final logits).

    SEAM trains this cosine (harmful batch a, benign batch b) towards -1; measured on held-out items it says
    whether a defended model's harmful and benign gradients really point against each other. The model's
    parameters are not changed and no .grad is left behind.
    """
    def grad(batch):
        return grads_of(response_ce(model, batch), params)

    g_a, g_b = grad(batch_a), grad(batch_b)
    denom = float(global_norm(g_a) * global_norm(g_b))
    return float(dot(g_a, g_b)) / denom if denom > 0 else 0.0
