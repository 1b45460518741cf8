"""Teacher-forced benign loss along a fit (e.g. along a harmful fine-tuning attack), every k optimizer steps.

SEAM's claim is about this curve: a harmful fine-tune of a self-destructive model drives its benign loss up,
while an undefended model's stays flat. The callback measures the mean response CE per benign task on a fixed
held-out set (gold responses, no generation) at step 0, every `every_n_steps` steps and at the end, and writes
{"steps": [...], "loss": {task: [...]}, "mean": [...]} to out_file (atomically, on rank 0).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import torch

from immunize.datamodules.catalog import Source, load_eval_items
from immunize.datamodules.collate import encode_example, pad_right
from immunize.errors import UserError
from immunize.io import atomic_write_json
from immunize.lightning_modules.functional.grad_math import sequence_ce


class BenignLossCurve(L.Callback):
    """Benign loss every k steps of a fit.

    Args:
        source: evaluation source whose benign items (with gold responses) are scored; default the toy eval split.
        n_per_task: items per task (the first ones of the source).
        every_n_steps: measure every this many optimizer steps (and at step 0 and at the end).
        out_file: JSON file; a relative path is taken in the trainer's log dir. None: keep in memory only.
        template: prompt template (None: the fit's datamodule's, else "qa").
        batch_size: items per forward pass.
    """

    def __init__(self, source: Optional[Source] = None, n_per_task: int = 32, every_n_steps: int = 5,
                 out_file: Optional[str] = "loss_curve.json", template: Optional[str] = None, batch_size: int = 64):
        if every_n_steps < 1 or n_per_task < 1 or batch_size < 1:
            raise UserError(f"BenignLossCurve: every_n_steps, n_per_task and batch_size must be >= 1, got "
                            f"{every_n_steps}, {n_per_task}, {batch_size}")
        self.source = source or Source(kind="toy")
        self.n_per_task, self.every, self.out_file = n_per_task, every_n_steps, out_file
        self.template, self.batch_size = template, batch_size
        self.curve: dict = {"steps": [], "loss": {}, "mean": []}
        self._batches: list[tuple[list[str], dict]] = []
        self._last = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        template = self.template or getattr(trainer.datamodule, "template", "qa")
        items = [it for it in load_eval_items(self.source, 0, self.n_per_task)
                 if it.kind != "harmful" and it.response is not None]
        if not items:
            raise UserError("BenignLossCurve: the source has no benign items with a gold response")
        rows = [encode_example(pl_module.tokenizer, template, it.prompt, it.response, 256) for it in items]
        pad = pl_module.tokenizer.pad_token_id
        self._batches = [([it.kind for it in items[i:i + self.batch_size]], pad_right(rows[i:i + self.batch_size], pad))
                         for i in range(0, len(rows), self.batch_size)]
        self.curve, self._last = {"steps": [], "loss": {}, "mean": []}, -1

    @torch.no_grad()
    def measure(self, pl_module) -> dict[str, float]:
        """Mean response CE per task on the held-out items at the current weights (eval mode, no grad)."""
        model = pl_module.model
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        try:
            for kinds, batch in self._batches:
                batch = {k: v.to(pl_module.device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
                for kind, loss in zip(kinds, sequence_ce(logits, batch["labels"]).tolist()):
                    sums[kind] = sums.get(kind, 0.0) + loss
                    counts[kind] = counts.get(kind, 0) + 1
        finally:
            model.train(was_training)
        return {k: sums[k] / counts[k] for k in sums}

    def _record(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._last:
            return
        self._last = step
        losses = self.measure(pl_module)
        self.curve["steps"].append(step)
        for task, value in losses.items():
            self.curve["loss"].setdefault(task, []).append(round(value, 5))
        self.curve["mean"].append(round(sum(losses.values()) / len(losses), 5))

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)
        if self.out_file is None or not trainer.is_global_zero:
            return
        path = Path(self.out_file)
        if not path.is_absolute():
            path = Path(trainer.log_dir or trainer.default_root_dir) / path
        atomic_write_json(path, self.curve)
