"""Booster: alignment that attenuates the harmful perturbation (a simulated harmful fine-tuning step).

Per step, with h the CE on the harmful batch and L_align the CE on the refusals (paired by prompt):
  pass 1: g_h = grad h(w)                                  (all-reduced: every rank perturbs identically)
          w' = w - alpha * g_h / (|g_h| + 1e-7)            (one harmful step of fixed length)
  pass 2: g_h' = grad h(w'); restore w exactly (copied back from a backup, not subtracted)
  pass 3: update with grad L_align(w) + lam * (g_h - g_h')
i.e. the first-order gradient of L_align(w) + lam * (h(w) - h(w')): the model learns to make the harmful
step reduce the harmful loss as little as possible. (Panacea's step is the fine-tuning-stage mirror.)
Manual optimization on the MultiPassDefense base: the gradient is formed here, averaged over DDP ranks, then
accumulated, clipped (grad_clip) and applied by the base; DDP's own reducer is not involved, so ranks stay
identical.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from immunize.errors import UserError
from immunize.lightning_modules.functional.batch_parts import require_parts
from immunize.lightning_modules.functional.grad_math import all_reduce_mean_, global_norm, grads_of
from immunize.lightning_modules.multi_pass import MultiPassDefense
from immunize.lightning_modules.functional.perturbation import NORM_EPS, perturbed

Reduce = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]


def booster_gradient(harmful_loss: Callable[[], torch.Tensor], align_loss: Callable[[], torch.Tensor],
                     params: Sequence[torch.Tensor], alpha: float, lam: float,
                     reduce: Reduce = all_reduce_mean_) -> tuple[list[torch.Tensor], dict]:
    """grad L_align(w) + lam * (g_h(w) - g_h(w')), w' = w - alpha * g_h / (|g_h| + 1e-7), averaged over ranks.

    harmful_loss / align_loss evaluate the local (rank's) loss at the current weights. g_h is reduced before
    its norm is taken, so every rank moves to the same w'; g_h' and grad L_align enter the final reduce
    (the mean over ranks of local_align + lam * (g_h - local_g_h') is the formula on rank-averaged gradients),
    so 2 gradient-sized all-reduces per step. Weights are restored bit-exactly. Memory beyond the weights:
    g_h, the weight backup and g_h' (pass 2), then g_h - g_h' and the result (pass 3).
    Returns (fresh gradient tensors in fp32 or wider, stats with floats h, h_perturbed, harmful_grad_norm;
    empty when alpha or lam is 0: then the harmful passes are skipped and the result is grad L_align).
    """
    params = list(params)
    if alpha == 0 or lam == 0:  # w' = w or no weight on the term: the correction is 0, only L_align remains
        return list(reduce(grads_of(align_loss(), params))), {}
    h0 = harmful_loss()
    g_h = list(reduce(grads_of(h0, params)))
    norm = float(global_norm(g_h))
    stats = {"h": float(h0.detach()), "h_perturbed": float(h0.detach()), "harmful_grad_norm": norm}
    del h0
    if norm > 0 and math.isfinite(norm):
        with perturbed(params, g_h, -alpha / (norm + NORM_EPS)):  # w' = w - alpha * normalized(g_h)
            h1 = harmful_loss()
            g_moved = grads_of(h1, params)
            stats["h_perturbed"] = float(h1.detach())
            del h1
        with torch.no_grad():
            for a, b in zip(g_h, g_moved):
                a.sub_(b)  # g_h becomes g_h - g_h' (this rank's g_h')
        del g_moved
    else:  # a zero harmful gradient: no direction to step in, the correction is 0
        for a in g_h:
            a.zero_()
    total = grads_of(align_loss(), params)
    with torch.no_grad():
        for t, d in zip(total, g_h):
            t.add_(d, alpha=lam)
    del g_h
    return list(reduce(total)), stats


class Booster(MultiPassDefense):
    """Booster alignment (Huang et al., "Booster: Tackling Harmful Fine-tuning for Large Language Models via
    Attenuating Harmful Perturbation", ICLR 2025, Section 4, Eq. 3): the refusal CE plus lam times the harmful
    loss's drop under one simulated harmful step, through its first-order gradient (see booster_gradient).

    Args:
        lam: weight of the harmful-perturbation term (5 in the paper; 100 also used).
        alpha: length of the simulated harmful step, as a fraction of the normalised harmful gradient (0.1; 0.01).
        grad_clip, accumulate, **kwargs: MultiPassDefense and CausalLMModule (the reference trains with the HF
            Trainer's default clipping, 1.0).
    """

    precision_reason = ("it moves the weights by alpha * g/|g| (about 1e-6 per element on a 7B model) and computes "
                        "gradients without a loss scaler")

    def __init__(self, lam: float = 5.0, alpha: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("lam", lam), ("alpha", alpha)):
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"Booster {name} must be a finite number >= 0, got {value}")
        self.lam, self.alpha = float(lam), float(alpha)

    def needs_exact_params(self) -> bool:
        return self.alpha > 0 and self.lam > 0

    def step_gradient(self, batch):
        harmful, refusal = require_parts(batch, ("harmful", "refusal"), "Booster")
        params = self.trainable_parameters()
        w_h, w_r = self.token_weights(harmful, refusal)
        align = {}

        def align_loss():
            loss = self.ce(refusal)
            align["value"] = loss.detach()
            return self.check_finite(loss, "Booster alignment loss") * w_r

        def harmful_loss():
            return self.check_finite(self.ce(harmful), "Booster harmful loss") * w_h

        grads, stats = booster_gradient(harmful_loss, align_loss, params, self.alpha, self.lam)
        logs, loss = {"L_align": float(align["value"])}, float(align["value"])
        if stats:  # the harmful passes ran
            unweight = (lambda x: x / w_h) if w_h > 0 else (lambda x: x)
            h, h_moved = unweight(stats["h"]), unweight(stats["h_perturbed"])
            logs.update({"h": h, "h_perturbed": h_moved, "harmful_grad_norm": stats["harmful_grad_norm"]})
            loss += self.lam * (h - h_moved)
        logs["loss"] = loss
        return grads, logs
