"""SEAM (self-destructive models): alignment after which harmful fine-tuning wrecks the model's capability.

L = L_ul + alpha L_up + beta L_sd on three batches per step (harmful, refusal on the same prompts,
benign); see the SEAM facts sheet. This module only orchestrates the gradient passes under manual
optimization; the math lives in grad_math, logit_lens, hessian_free and seam_math.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from immunize.errors import UserError
from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.grad_math import (all_reduce_mean_, dot, global_norm, grads_of, masked_ce, require_exact_params,
                                         require_fp32_master_precision)
from lightning_modules.hidden_hooks import lens_modules
from lightning_modules.hessian_free import exact_sd_grad, finite_difference_sd_grad
from lightning_modules.logit_lens import bounded_ascent, logit_lens_ce
from lightning_modules.optim import build_scheduler
from lightning_modules.seam_math import global_value, rank_weights

ESTIMATORS = ("finite_difference", "exact")
PARTS = ("harmful", "refusal", "benign")


class SEAM(CausalLMModule):
    """SEAM alignment with manual optimization: per step, gradients of L_ul and L_up plus beta * (L_sd estimate).

    Passes per step (finite_difference): harmful forward with all hidden states and two backwards
    (g_a and L_ul), refusal (L_up), benign (g_b), and g_a, g_b again at perturbed fp32 weights.
    DDP: every gradient is all-reduced before use, so all ranks perturb and update identically;
    per-rank losses are token-weighted so the update equals the single-process one on the global
    batch. Gradient accumulation (`accumulate`) and clipping (`grad_clip`, by global norm) are
    done here because Lightning's own flags do not apply to manual optimization.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.01, eps: float = 1e-3,
                 estimator: str = "finite_difference", use_unlearning: bool = True,
                 grad_clip: Optional[float] = None, accumulate: int = 1, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"SEAM {name} must be a finite number >= 0, got {value}")
        if not (eps > 0 and math.isfinite(eps)):
            raise UserError(f"SEAM eps (finite-difference step) must be > 0, got {eps}")
        if estimator not in ESTIMATORS:
            raise UserError(f"unknown SEAM estimator {estimator!r}; choose from {list(ESTIMATORS)}")
        if grad_clip is not None and not grad_clip > 0:
            raise UserError(f"grad_clip must be > 0 or null, got {grad_clip}")
        if int(accumulate) != accumulate or accumulate < 1:
            raise UserError(f"accumulate must be an integer >= 1, got {accumulate}")
        if alpha == 0 and beta == 0 and not use_unlearning:
            raise UserError("SEAM with alpha=0, beta=0 and use_unlearning=false has no loss term; enable one")
        self.alpha, self.beta, self.eps, self.estimator = float(alpha), float(beta), float(eps), estimator
        self.use_unlearning, self.grad_clip, self.accumulate = use_unlearning, grad_clip, int(accumulate)
        self.automatic_optimization = False
        if estimator == "exact":
            self.model.set_attn_implementation("eager")  # fused SDPA kernels have no double backward

    # ----- checks and set-up ---------------------------------------------------------------------
    def on_fit_start(self) -> None:
        require_fp32_master_precision(self.trainer.precision, "SEAM", "it needs fp32 master weights for its "
                                      "finite-difference step and computes gradients without a loss scaler "
                                      "(so no fp16 '16-mixed')")
        if self.beta > 0:
            require_exact_params(self.trainable_parameters())
        if self.estimator == "exact" and self.trainer.world_size > 1:
            raise UserError("SEAM estimator 'exact' is a single-process check (double backward, no all-reduce); "
                            "use estimator finite_difference under DDP")

    def configure_optimizers(self):
        """The base optimizer and schedule, with the schedule's length counted in optimizer steps."""
        config = super().configure_optimizers()
        if self.accumulate > 1:
            hp = self.hparams
            config["lr_scheduler"]["scheduler"] = build_scheduler(config["optimizer"], hp.scheduler,
                                                                  self._optimizer_steps(), hp.warmup_ratio)
        return config

    def _optimizer_steps(self) -> int:
        """Optimizer steps of the whole fit: micro-batches / accumulate per epoch, capped by max_steps."""
        trainer = self.trainer
        if trainer.max_epochs == -1 or trainer.num_training_batches == float("inf"):
            return max(1, int(trainer.max_steps))
        steps = math.ceil(trainer.num_training_batches / self.accumulate) * max(trainer.max_epochs, 1)
        return max(1, min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps)

    # ----- one step ------------------------------------------------------------------------------
    def _run(self, part: dict, hidden: bool = False):
        return self.model(input_ids=part["input_ids"], attention_mask=part["attention_mask"],
                          output_hidden_states=hidden, use_cache=False)

    def _ce(self, part: dict, weight: float) -> torch.Tensor:
        """Token-weighted response CE of one batch on the final logits (see seam_math.rank_weights)."""
        return masked_ce(self._run(part).logits, part["labels"]) * weight

    @staticmethod
    def _accumulate_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scale: float) -> None:
        """p.grad += scale * g, taking over g's buffer when p.grad is empty (no extra copy)."""
        with torch.no_grad():
            for p, g in zip(params, grads):
                if p.grad is None:
                    p.grad = g.mul_(scale).to(p.dtype)
                else:
                    p.grad.add_(g.to(p.dtype), alpha=scale)

    def training_step(self, batch, batch_idx):
        missing = [k for k in PARTS if k not in batch] if isinstance(batch, dict) else list(PARTS)
        if missing:
            raise UserError(f"SEAM needs batches with {list(PARTS)} (datamodules.AlignmentData with mode: triplets); "
                            f"missing {missing}")
        harmful, refusal, benign = (batch[k] for k in PARTS)
        params = self.trainable_parameters()
        scale = 1.0 / self.accumulate
        w_h, w_r, w_b = rank_weights([harmful["labels"], refusal["labels"], benign["labels"]])
        need_sd = self.beta > 0
        logs = {}

        # Harmful batch: one forward serves g_a and L_ul (logit lens over all hidden states). g_a's
        # backward goes first and keeps the graph; L_ul's backward then frees all of it.
        out = self._run(harmful, hidden=self.use_unlearning)
        g_a = None
        if need_sd:
            g_a = grads_of(masked_ce(out.logits, harmful["labels"]) * w_h, params, retain_graph=self.use_unlearning)
        if self.use_unlearning:
            lm_head, norm = lens_modules(self.model)
            lens = logit_lens_ce(out.hidden_states, out.logits, harmful["labels"], lm_head, norm)
            l_ul = self.check_finite(bounded_ascent(global_value(lens * w_h)), "SEAM L_ul")
            grad = grads_of(l_ul, params)
            logs["train/grad_norm/L_ul"] = global_norm(grad)
            self._accumulate_(params, grad, scale)
            del grad
            logs["train/L_ul"] = l_ul.detach()
            del lens, l_ul
        del out

        if self.alpha > 0:
            l_up = self.check_finite(global_value(self._ce(refusal, w_r)), "SEAM L_up")
            grad = grads_of(l_up, params)
            logs["train/grad_norm/L_up"] = global_norm(grad)
            self._accumulate_(params, grad, self.alpha * scale)
            del grad
            logs["train/L_up"] = l_up.detach()

        if need_sd:
            est, logs["train/cos_ab"], logs["train/est_norm"] = self._sd_gradient(params, harmful, benign, w_h, w_b, g_a)
            del g_a
            self._accumulate_(params, est, self.beta * scale)
            del est
            rest = float(logs.get("train/grad_norm/L_ul", 0.0)) + self.alpha * float(logs.get("train/grad_norm/L_up", 0.0))
            logs["train/sd_share"] = self.beta * float(logs["train/est_norm"]) / rest if rest > 0 else float("nan")

        loss = logs.get("train/L_ul", 0.0) + self.alpha * logs.get("train/L_up", 0.0)
        loss = torch.as_tensor(loss + self.beta * logs.get("train/cos_ab", 0.0), dtype=torch.float32)
        size = harmful["input_ids"].shape[0]
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in logs.items()}, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)

        if (batch_idx + 1) % self.accumulate == 0 or self.trainer.is_last_batch:
            self._optimizer_step(params)
        return loss

    def _sd_gradient(self, params, harmful, benign, w_h: float, w_b: float, g_a):
        """(estimate of grad L_sd, cos(g_a, g_b), estimate norm), all from all-reduced gradients.

        g_a: the local harmful gradient (reduced here in place). The estimator's extra passes run on
        the unwrapped HF model, so DDP's reducer never sees them.
        """
        all_reduce_mean_(g_a)
        g_b = all_reduce_mean_(grads_of(self._ce(benign, w_b), params))
        if self.estimator == "exact":
            cosine = dot(g_a, g_b) / (global_norm(g_a) * global_norm(g_b))
            del g_a, g_b
            est = exact_sd_grad(params, lambda: self._ce(harmful, w_h), lambda: self._ce(benign, w_b))
            return est, cosine, global_norm(est)
        est, stats = finite_difference_sd_grad(params, lambda: grads_of(self._ce(harmful, w_h), params),
                                               lambda: grads_of(self._ce(benign, w_b), params), g_a, g_b, self.eps)
        return est, stats["cosine"], stats["est_norm"]

    def _optimizer_step(self, params) -> None:
        """Average the accumulated gradient over ranks, clip, step, zero, advance the schedule."""
        opt = self.optimizers()
        grads = [p.grad for p in params if p.grad is not None]
        all_reduce_mean_(grads)
        if self.grad_clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
