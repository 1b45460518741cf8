"""Lisa (Lazy safety alignment): bi-state optimization with a proximal term, inside a user's fine-tune.

The method (Huang et al., Lisa, NeurIPS 2024, Section 4; its public reference trainer): the fine-tune alternates two states,
`alignment_steps` optimizer steps on alignment data (harmful prompt -> refusal), then `user_steps` on the
user's data (e.g. 100 / 900), over and over, starting with alignment. Each state minimises its own loss plus
rho/2 |w - w_other|^2, where w_other is the other state's latest weights: the weights at the end of the
other state's last phase (the initial weights before the first switch).

How it is done here, inside the user's SFT fit under automatic optimization (one forward + backward per step,
as in the reference):
- Schedule: step s (trainer.global_step, i.e. optimizer steps) is an alignment step when
  s % (alignment_steps + user_steps) < alignment_steps (`lisa_phase`).
- Alignment step: on_train_batch_start swaps the contents of the user batch (a dict) for an alignment batch,
  so training_step's one pass computes the alignment loss. The reference trainer does the same: in the
  alignment state it discards the batch the user loader handed it and draws one from its own cycled
  alignment loader, so user batches falling on alignment steps are skipped. During those steps the
  module's `train/loss` is the alignment loss: `lisa/alignment_phase` (1 at alignment steps, logged every
  step) tells them apart, and `lisa/drift` is |w - w_anchor|.
- Proximal term, both states: on_before_optimizer_step (after backward, DDP's all-reduce and gradient
  unscaling, before clipping and the optimizer) adds rho * (w - w_anchor), the gradient of
  rho/2 |w - w_anchor|^2, to p.grad of every trainable tensor. So at an alignment step the optimizer gets
  grad f_align(w; alignment batch) + rho (w - w_anchor), at a user step grad g(w; user batch) +
  rho (w - w_anchor): the gradients of the two state objectives.
- Anchor: at the first step of each phase (before that step's update) the current weights, which are the
  weights at the end of the other phase, are copied into w_anchor (one copy of the trainable tensors).
- proximal_warmup (fraction of the fit's optimizer steps): the proximal term from the first step whose index is
  > proximal_warmup * total (0-based). The reference code waits 10% of the steps ("the proximal term hurts
  convergence on GSM8K early on"); the method as written has none (0, the default here).
Phases count optimizer steps (not micro-batches): with gradient accumulation every micro-batch of an
alignment step is an alignment batch. The optimizer, its state and the schedule are shared by both states.

Distributed (DDP): rank r draws alignment batch (draw, r) of one seeded stream (immunize.callbacks.base.draw_indices),
batch_size rows per rank like the user batch; the alignment gradients are all-reduced by DDP's own backward
hooks, as user gradients are, and the proximal term is a function of identical weights and anchors, so every
rank applies the same update.

Resume: the anchor, the phase it belongs to and the alignment-draw counter are in state_dict; the phase
itself is a function of global_step.
"""
from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Optional, Sequence

import lightning as L
import torch

from immunize.callbacks.base import FinetuneDefense, named_trainable
from immunize.datamodules.catalog import Source
from immunize.errors import UserError
from immunize.lightning_modules.modeling.sharding import any_sharded, local, shard_group, shard_sum

ALIGNMENT, USER = "alignment", "user"


# ----- plain functions (unit-tested alone) --------------------------------------------------------
def lisa_phase(step: int, alignment_steps: int, user_steps: int) -> str:
    """State of optimizer step `step`: alignment_steps alignment steps, then user_steps user steps, repeated."""
    return ALIGNMENT if step % (alignment_steps + user_steps) < alignment_steps else USER


@torch.no_grad()
def add_proximal_(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], rho: float) -> torch.Tensor:
    """p.grad += rho * (p - anchor) for every parameter (gradient of rho/2 |w - anchor|^2, difference in fp32).

    Returns |w - anchor| (one global L2 norm: the drift from the other state's weights; under FSDP summed over
    the shards of all ranks) as a 0-dim fp32 tensor on the parameters' device, so the step needs no host
    synchronisation.
    """
    sq = []
    for p, a in zip(params, anchor):
        diff = p.detach().float() - a.float()
        flat = local(diff).reshape(-1)  # an FSDP shard: this rank's part (the sum is completed below)
        sq.append(torch.dot(flat, flat))
        prox = diff.mul_(rho)
        if p.grad is None:
            p.grad = prox.to(p.dtype)
        else:
            p.grad.add_(prox.to(p.grad.dtype))
    total = torch.stack(sq).sum()
    if any_sharded(params):
        shard_sum(total, shard_group(params))
    return total.sqrt()


# ----- the callback -------------------------------------------------------------------------------
class Lisa(FinetuneDefense):
    """Lisa during a user's fine-tune (see the module docstring).

    Huang et al., "Lisa: Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning Attack"
    (NeurIPS 2024), Section 4 (Bi-State Optimization with the proximal term, Eq. 4-5).

    Args:
        alignment: alignment data (default: toy harmful prompts -> refusals of split "align"; Pairs give their
            refusal, Examples are used as they are).
        rho: proximal weight (the paper's 1).
        alignment_steps, user_steps: phase lengths in optimizer steps (the paper's 100 / 900; the defaults 2 / 8
            keep that proportion at the toy's scale).
        batch_size: alignment rows per rank and step (None: the datamodule's batch_size).
        proximal_warmup: fraction of the fit's steps before the proximal term starts.
        template, max_length: encoding of the alignment samples (None: the datamodule's).
        seed: alignment draw order.
    """

    def __init__(self, alignment: Optional[Source] = None, rho: float = 1.0, alignment_steps: int = 2,
                 user_steps: int = 8, batch_size: Optional[int] = None, proximal_warmup: float = 0.0,
                 template: Optional[str] = None, max_length: Optional[int] = None, seed: int = 0):
        if not rho >= 0:
            raise UserError(f"Lisa: rho must be >= 0, got {rho}")
        if alignment_steps < 0 or user_steps < 0 or alignment_steps + user_steps < 1:
            raise UserError(f"Lisa: need alignment_steps >= 0, user_steps >= 0 and at least one step per cycle, "
                            f"got {alignment_steps} / {user_steps}")
        if batch_size is not None and batch_size < 1:
            raise UserError(f"Lisa: batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= proximal_warmup < 1.0:
            raise UserError(f"Lisa: proximal_warmup must be in [0, 1), got {proximal_warmup}")
        super().__init__(alignment or Source(kind="toy", part="pairs", split="align"), "refusal", batch_size,
                         template, max_length, seed)
        self.rho, self.alignment_steps, self.user_steps = float(rho), alignment_steps, user_steps
        self.proximal_warmup = float(proximal_warmup)
        self.anchor: Optional[dict[str, torch.Tensor]] = None  # name -> weights at the end of the other phase
        self.anchor_phase: Optional[str] = None  # the phase the anchor serves
        self.last_drift: Optional[torch.Tensor] = None  # |w - w_anchor| at the last proximal step
        self._prox_from = 0

    @property
    def alignment(self) -> Source:
        return self.data

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rho=self.rho, alignment_steps=self.alignment_steps, user_steps=self.user_steps)

    def phase(self, step: int) -> str:
        return lisa_phase(step, self.alignment_steps, self.user_steps)

    # ----- setup ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.anchor, self.anchor_phase, self.last_drift = None, None, None  # a resume restores them next
        if self.batch_size is None and getattr(trainer.datamodule, "batch_size", None) is None:
            raise UserError("Lisa: set batch_size (the fit has no datamodule with a batch_size to copy)")
        if self.alignment_steps == 0:  # no alignment batch is ever drawn
            self._applied, self.draws = False, 0
            return
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:
        self._prox_from = 0
        if self.proximal_warmup > 0:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise UserError("Lisa: proximal_warmup needs a known number of steps; set trainer.max_steps")
            self._prox_from = math.floor(self.proximal_warmup * total) + 1  # the reference: step > warmup * total

    # ----- alignment steps: the step's batch becomes an alignment batch ------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.phase(trainer.global_step) != ALIGNMENT:
            return
        if not isinstance(batch, MutableMapping) or "input_ids" not in batch:
            raise UserError(f"Lisa swaps the batch for an alignment batch at alignment steps and needs dict batches with "
                            f"input_ids/attention_mask/labels (an SFT fit); got {type(batch).__name__}")
        aligned = dict(self.next_batch(trainer, pl_module.device))  # a copy: never clear what we insert
        batch.clear()
        batch.update(aligned)

    # ----- both states: the proximal term --------------------------------------------------------
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        phase = self.phase(step)
        names, params = named_trainable(pl_module, "Lisa")
        if self.anchor is None or self.anchor_phase != phase:
            # first step of a phase: the weights (not yet updated by this step) are the other phase's last weights
            self.anchor = {n: p.detach().clone() for n, p in zip(names, params)}
            self.anchor_phase = phase
        missing = [n for n in names if n not in self.anchor]
        if missing:
            raise UserError(f"Lisa: the anchor has no tensor for {missing[0]}; the model changed since it was taken")
        anchor = []
        for n, p in zip(names, params):
            a = self.anchor[n]
            if a.device != p.device or a.dtype != p.dtype:  # restored from a checkpoint (CPU)
                a = self.anchor[n] = a.to(device=p.device, dtype=p.dtype)
            anchor.append(a)
        if self.rho > 0 and step >= self._prox_from:
            drift = add_proximal_(params, anchor, self.rho)
            pl_module.log("lisa/drift", drift, on_step=True, on_epoch=False)
            self.last_drift = drift
        pl_module.log("lisa/alignment_phase", float(phase == ALIGNMENT), on_step=True, on_epoch=False)

    # ----- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        anchor = None if self.anchor is None else {n: a.detach().cpu().clone() for n, a in self.anchor.items()}
        return {**super().state_dict(), "anchor": anchor, "anchor_phase": self.anchor_phase}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.anchor = state_dict.get("anchor")
        self.anchor_phase = state_dict.get("anchor_phase")
