"""Booster: alignment that attenuates the harmful perturbation (a simulated harmful fine-tuning step).

Per step, with h the CE on the harmful batch and L_align the CE on the refusals (paired by prompt):
  pass 1: g_h = grad h(w)                                  (all-reduced: every rank perturbs identically)
          w' = w - alpha * g_h / (|g_h| + 1e-7)            (one harmful step of fixed length)
  pass 2: g_h' = grad h(w'); restore w exactly (copied back from a backup, not subtracted)
  pass 3: update with grad L_align(w) + lam * (g_h - g_h')
i.e. the first-order gradient of L_align(w) + lam * (h(w) - h(w')): the model learns to make the harmful
step reduce the harmful loss as little as possible. (Panacea's step is the fine-tuning-stage mirror.)
Manual optimization: gradients are formed here, averaged over DDP ranks (grad_math.all_reduce_mean_),
then clipped (grad_clip) and applied; DDP's own reducer is not involved, so ranks stay identical.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from immunize.errors import UserError
from lightning_modules.batch_parts import batch_size, require_parts
from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.grad_math import (EXACT_DTYPES, add_scaled_, all_reduce_mean_, global_norm, grads_of, masked_ce,
                                         require_fp32_master_precision)
from lightning_modules.seam_math import rank_weights

NORM_EPS = 1e-7  # as in the reference: w' = w - alpha * g / (|g| + 1e-7)
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
        backup = [p.detach().clone() for p in params]
        try:
            add_scaled_(params, g_h, -alpha / (norm + NORM_EPS))
            h1 = harmful_loss()
            g_moved = grads_of(h1, params)
            stats["h_perturbed"] = float(h1.detach())
            del h1
        finally:
            with torch.no_grad():
                for p, saved in zip(params, backup):
                    p.copy_(saved)
        del backup
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


class Booster(CausalLMModule):
    """Booster alignment: lam (5 in the paper; 100 also used), alpha (0.1; 0.01 also used).

    grad_clip: clip the applied gradient to this global norm (the reference trains with the HF Trainer's
    default 1.0); Lightning's trainer.gradient_clip_val does not apply under manual optimization.
    """

    def __init__(self, lam: float = 5.0, alpha: float = 0.1, grad_clip: Optional[float] = None, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("lam", lam), ("alpha", alpha)):
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"Booster {name} must be a finite number >= 0, got {value}")
        if grad_clip is not None and not grad_clip > 0:
            raise UserError(f"grad_clip must be > 0 or null, got {grad_clip}")
        self.lam, self.alpha, self.grad_clip = float(lam), float(alpha), grad_clip
        self.automatic_optimization = False

    def on_fit_start(self) -> None:
        require_fp32_master_precision(self.trainer.precision, "Booster", "it moves the weights by alpha * g/|g| "
                                      "(about 1e-6 per element on a 7B model) and computes gradients without a "
                                      "loss scaler")
        wide = [p for p in self.trainable_parameters() if p.dtype not in EXACT_DTYPES]
        if wide and self.alpha > 0 and self.lam > 0:
            raise UserError(
                f"Booster needs fp32 trainable parameters, found {wide[0].dtype}: its harmful step "
                "alpha * g/|g| rounds away in bf16/fp16 weights. Load the model in float32 (train with "
                "bf16-mixed), or train LoRA adapters (they stay fp32) over a bfloat16 base")

    def _ce(self, part: dict) -> torch.Tensor:
        out = self.model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], use_cache=False)
        return masked_ce(out.logits, part["labels"])

    def training_step(self, batch, batch_idx):
        harmful, refusal = require_parts(batch, ("harmful", "refusal"), "Booster")
        params = self.trainable_parameters()
        w_h, w_r = rank_weights([harmful["labels"], refusal["labels"]])
        align = {}

        def align_loss():
            loss = self._ce(refusal)
            align["value"] = loss.detach()
            return self.check_finite(loss, "Booster alignment loss") * w_r

        def harmful_loss():
            return self.check_finite(self._ce(harmful), "Booster harmful loss") * w_h

        grads, stats = booster_gradient(harmful_loss, align_loss, params, self.alpha, self.lam)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
        del grads
        self._optimizer_step()

        size = batch_size(refusal)
        logs, loss = {"train/L_align": float(align["value"])}, float(align["value"])
        if stats:  # the harmful passes ran
            unweight = (lambda x: x / w_h) if w_h > 0 else (lambda x: x)
            h, h_moved = unweight(stats["h"]), unweight(stats["h_perturbed"])
            logs.update({"train/h": h, "train/h_perturbed": h_moved, "train/harmful_grad_norm": stats["harmful_grad_norm"]})
            loss += self.lam * (h - h_moved)
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in logs.items()}, batch_size=size)
        loss = torch.as_tensor(loss, dtype=torch.float32)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def _optimizer_step(self) -> None:
        """Clip (p.grad is already rank-averaged), step, zero, advance the schedule."""
        opt = self.optimizers()
        if self.grad_clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
