"""The callback every bench fit cell runs with: progress lines for the bench and train.json at the end."""
from __future__ import annotations

import logging
import time
from typing import Optional

import lightning as L

from immunize.io import atomic_write_json

PREFIX = "      | "  # the bench forwards lines starting with this in "lines" progress mode


def _loss(trainer) -> Optional[float]:
    metrics = trainer.callback_metrics
    keys = ["train/loss"] + sorted(k for k in metrics if "loss" in k and k != "train/loss")
    for key in keys:
        if key in metrics:
            try:
                return float(metrics[key])
            except (TypeError, ValueError):
                continue
    return None


class CellRecorder(L.Callback):
    """Prints "step s/S loss x (r it/s)" lines `updates` times per fit and writes out_file (steps, epochs,
    seconds) at train end. quiet: silence Lightning's info lines (accelerator, tips), so a bench showing
    the progress bars of its cells shows little else."""

    def __init__(self, out_file: Optional[str] = None, updates: int = 4, quiet: bool = False):
        self.out_file, self.updates = out_file, updates
        if quiet:
            for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
                logging.getLogger(name).setLevel(logging.WARNING)
        self._t0 = 0.0
        self._total = 0
        self._next = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.monotonic()
        total = trainer.estimated_stepping_batches
        self._total = int(total) if total != float("inf") else 0
        self._next = 1
        if self.updates and trainer.is_global_zero:
            print(f"{PREFIX}training: {self._total} steps, {trainer.max_epochs} epoch(s)", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.updates or not trainer.is_global_zero or not self._total:
            return
        step = trainer.global_step
        if step >= self._next * self._total / self.updates:
            self._next += 1
            rate = step / max(1e-9, time.monotonic() - self._t0)
            loss = _loss(trainer)
            loss_text = f" loss {loss:.3f}" if loss is not None else ""
            print(f"{PREFIX}step {step}/{self._total}{loss_text} ({rate:.1f} it/s)", flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.out_file:
            loss = _loss(trainer)
            atomic_write_json(self.out_file, {"steps": int(trainer.global_step), "epochs": int(trainer.current_epoch),
                                              "train_seconds": round(time.monotonic() - self._t0, 2),
                                              "final_loss": loss})
