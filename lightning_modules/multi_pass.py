"""The extension point for defenses whose step takes several gradient passes (manual optimization).

A subclass implements one hook:

    def step_gradient(self, batch) -> tuple[list[torch.Tensor], dict]:
        '''(a gradient for every tensor of self.trainable_parameters(), values to log) for this micro-batch;
        the mean of the gradients over DDP ranks must be the method's gradient (an already rank-averaged
        gradient qualifies: every rank then returns the same tensors).'''

and gets, from this base, everything Lightning's automatic optimization would otherwise do and does not do
under manual optimization: accumulation over `accumulate` micro-batches, ONE all-reduce of the accumulated
gradient per optimizer step, clipping by global norm (`grad_clip`), the optimizer step, the schedule counted in
optimizer steps, the precision check (fp32 master weights; `needs_exact_params()` refuses bf16/fp16 weights for
methods that move the weights), logging of every returned value under train/<name>, and the finite check of the
returned "loss". Under FSDP2 (immunize.strategies.FSDP2) the same hook works unchanged when it takes its gradients
with grads_of and its norms with global_norm/dot: those return shards that are already rank means and full reductions
(immunize.lightning_modules.modeling.sharding); a hook must not backward one forward twice there. Helpers for the hook: `token_weights(*parts)` (DDP token weights), `ce(part, weight)` (one
token-weighted response CE pass), `run(part, hidden)` (a forward of a batch part). SEAM, Booster and TAR are
such defenses.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from immunize.errors import UserError
from immunize.lightning_modules.functional.batch_parts import batch_size
from immunize.lightning_modules.causal_lm import CausalLMModule
from immunize.lightning_modules.functional.grad_math import (all_reduce_mean_, require_exact_params,
                                         require_fp32_master_precision)
from immunize.lightning_modules.modeling.optim import build_scheduler
from immunize.lightning_modules.functional.global_batch import rank_weights
from immunize.lightning_modules.functional.supervised_ce import response_ce


class MultiPassDefense(CausalLMModule):
    """Manual-optimization base of multi-pass methods (see the module docstring).

    Args:
        grad_clip: clip the applied (rank-averaged, accumulated) gradient to this global L2 norm; None: no clipping.
            Lightning's trainer.gradient_clip_val does not apply under manual optimization.
        accumulate: micro-batches per optimizer step (Lightning's accumulate_grad_batches does not apply either).
        **kwargs: CausalLMModule's arguments (model, optimizer, lr, schedule, ...).
    """

    precision_reason = "it computes its gradients without a loss scaler and needs fp32 master weights"

    def __init__(self, grad_clip: Optional[float] = None, accumulate: int = 1, **kwargs):
        super().__init__(**kwargs)
        if grad_clip is not None and not grad_clip > 0:
            raise UserError(f"grad_clip must be > 0 or null, got {grad_clip}")
        if int(accumulate) != accumulate or accumulate < 1:
            raise UserError(f"accumulate must be an integer >= 1, got {accumulate}")
        self.grad_clip, self.accumulate = grad_clip, int(accumulate)
        self.automatic_optimization = False

    # ----- the hook --------------------------------------------------------------------------------
    def step_gradient(self, batch) -> tuple[list[torch.Tensor], dict]:
        raise NotImplementedError(f"{type(self).__name__} must implement step_gradient(batch) -> (grads, logs)")

    def needs_exact_params(self) -> bool:
        """Whether the method moves the weights by small steps (then bf16/fp16 weights are refused)."""
        return True

    # ----- helpers for the hook ------------------------------------------------------------------
    @staticmethod
    def token_weights(*parts: dict) -> list[float]:
        return rank_weights([part["labels"] for part in parts])

    def run(self, part: dict, hidden: bool = False):
        return self.model(input_ids=part["input_ids"], attention_mask=part["attention_mask"],
                          output_hidden_states=hidden, use_cache=False)

    def ce(self, part: dict, weight: float = 1.0) -> torch.Tensor:
        """Token-weighted response CE of one batch part on the final logits."""
        return response_ce(self.model, part) * weight

    # ----- what the base does ----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        name = type(self).__name__
        require_fp32_master_precision(self.trainer.precision, name, self.precision_reason)
        if self.needs_exact_params():
            require_exact_params(self.trainable_parameters())

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

    @staticmethod
    def _accumulate_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scale: float) -> None:
        """p.grad += scale * g, taking over g's buffer when p.grad is empty (no extra copy)."""
        with torch.no_grad():
            for p, g in zip(params, grads):
                if p.grad is None:
                    p.grad = (g.mul_(scale) if scale != 1.0 else g).to(p.dtype)
                else:
                    p.grad.add_(g.to(p.dtype), alpha=scale)

    def training_step(self, batch, batch_idx):
        params = self.trainable_parameters()
        grads, logs = self.step_gradient(batch)
        if len(grads) != len(params):
            raise ValueError(f"{type(self).__name__}.step_gradient returned {len(grads)} gradients for "
                             f"{len(params)} trainable tensors")
        self._accumulate_(params, grads, 1.0 / self.accumulate)
        del grads
        loss = torch.as_tensor(logs.pop("loss"), dtype=torch.float32)
        self.check_finite(loss, f"{type(self).__name__} loss")
        size = batch_size(batch)
        self.log_dict({f"train/{k}": torch.as_tensor(v, dtype=torch.float32) for k, v in logs.items()},
                      batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if (batch_idx + 1) % self.accumulate == 0 or self.trainer.is_last_batch:
            self._optimizer_step(params)
        return loss

    def _optimizer_step(self, params) -> None:
        """Average the accumulated gradient over ranks, clip, step, zero, advance the schedule."""
        opt = self.optimizers()
        all_reduce_mean_([p.grad for p in params if p.grad is not None])
        if self.grad_clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

