"""The extension point for fine-tuning-stage defenses: Lightning callbacks that act on a user's fine-tune.

A subclass of FinetuneDefense gets, from this base:
- its own data (a datamodules Source: harmful answers, refusals, calibration text), encoded with the fit's
  tokenizer, prompt template and max_length, and drawn as seeded per-rank batches (`next_batch`): batch k of
  rank r is a pure function of (seed, k, r, world size), so a resumed fit draws what an unbroken one would and
  every rank's share of the global batch is disjoint;
- the trainer's forward context (`forward_context`: autocast under bf16-mixed) for its extra passes;
- one documented hook, `apply(trainer, pl_module)`, run exactly once at fit end with the module on the training
  device (Lightning's teardown moves it to the CPU first) - the perturbation, the pruning, the noise;
- the draw counter in the checkpoint (state_dict), for exact resume.
Panacea, random perturbation, Lisa and Antidote are such defenses; a new one overrides the Lightning hooks it needs
(e.g. on_before_optimizer_step) plus `apply`.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from immunize.datamodules.catalog import Source
from immunize.datamodules.collate import pad_right
from immunize.datamodules.drawn import draw_indices, encode_source
from immunize.errors import UserError
from immunize.io import atomic_write_json

USES = ("harmful", "refusal")


def named_trainable(pl_module, who: str) -> tuple[list[str], list[torch.nn.Parameter]]:
    """(names in pl_module.model, tensors) of the trainable parameters, or a UserError naming the defense."""
    params = pl_module.trainable_parameters()
    if not params:
        raise UserError(f"{who}: the model has no trainable parameters")
    name_of = {id(p): n for n, p in pl_module.model.named_parameters()}
    if any(id(p) not in name_of for p in params):
        raise UserError(f"{who}: a trainable parameter is not in pl_module.model; it cannot be named")
    return [name_of[id(p)] for p in params], params


class FinetuneDefense(L.Callback):
    """Base of fine-tuning-stage defenses (see the module docstring).

    Args:
        data: the defense's own records; None: the defense needs none.
        use: which side of paired records (Pairs) to train on: "harmful" answers or "refusal"s.
        batch_size: rows per rank of each drawn batch (None: the fit's datamodule's batch_size).
        template: prompt template of the encoding (None: the datamodule's, else "qa").
        max_length: token limit of the encoding (None: the datamodule's, else 256).
        seed: the draw order of `next_batch`.
    """

    def __init__(self, data: Optional[Source] = None, use: str = "harmful", batch_size: Optional[int] = None,
                 template: Optional[str] = None, max_length: Optional[int] = None, seed: int = 0):
        if use not in USES:
            raise UserError(f"{type(self).__name__}: use must be one of {list(USES)}, got {use!r}")
        if batch_size is not None and batch_size < 1:
            raise UserError(f"{type(self).__name__}: batch_size must be >= 1, got {batch_size}")
        self.data, self.use, self.batch_size = data, use, batch_size
        self.template, self.max_length, self.seed = template, max_length, seed
        self.draws = 0  # batches drawn so far (the same count on every rank)
        self.rows: list[dict] = []
        self._pad_id = 0
        self._rows_per_batch = 1
        self._applied = False

    # ----- the hook ------------------------------------------------------------------------------
    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """What the defense does once at fit end (default: nothing)."""

    # ----- data ------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._applied, self.draws = False, 0  # a resume restores the counter right after this
        dm = trainer.datamodule
        self._rows_per_batch = self.batch_size or getattr(dm, "batch_size", None) or 0
        if self.data is None:
            return
        if not self._rows_per_batch:
            raise UserError(f"{type(self).__name__}: set batch_size (the fit has no datamodule with a batch_size)")
        template = self.template or getattr(dm, "template", "qa")
        max_length = self.max_length or getattr(dm, "max_length", 256)
        self.rows = encode_source(self.data, self.use, pl_module.tokenizer, template, max_length)
        self._pad_id = pl_module.tokenizer.pad_token_id

    def next_batch(self, trainer: L.Trainer, device) -> dict:
        """This rank's next batch of the defense's data, on `device` (override to feed batches another way)."""
        idx = draw_indices(len(self.rows), self._rows_per_batch, self.draws, trainer.global_rank, trainer.world_size,
                           self.seed)
        self.draws += 1
        return self.collate([self.rows[i] for i in idx], device)

    def collate(self, rows: list[dict], device) -> dict:
        batch = pad_right(rows, self._pad_id)
        return {k: v.to(device) for k, v in batch.items()}

    @staticmethod
    def forward_context(trainer):
        """The trainer's precision context (autocast under bf16-mixed) for the defense's own passes."""
        plugin = getattr(trainer, "precision_plugin", None)
        return plugin.forward_context() if plugin is not None else contextlib.nullcontext()

    # ----- fit end -------------------------------------------------------------------------------
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._applied:
            return
        here = next(pl_module.parameters()).device
        device = trainer.strategy.root_device if trainer is not None else here  # teardown moved the module to CPU
        pl_module.to(device)
        try:
            self.apply(trainer, pl_module)
        finally:
            pl_module.to(here)
        self._applied = True

    @staticmethod
    def write_report(trainer, file_name: Optional[str], report: dict) -> None:
        """Write a defense's JSON report as <log dir>/file_name on rank 0 (nothing when file_name is None); every rank
        calls it, since the trainer's log_dir is a collective."""
        if file_name is None:
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            atomic_write_json(out_dir / file_name, report)

    # ----- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state_dict: dict) -> None:
        self.draws = int(state_dict.get("draws", 0))
