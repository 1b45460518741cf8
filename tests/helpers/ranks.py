"""Test-only callbacks that subprocesses load by class path: each rank writes its state at fit end; a cell fails once."""
import os
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from callbacks import Panacea


class DumpParameters(L.Callback):
    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_fit_end(self, trainer, pl_module):
        tensors = {n: p.detach().cpu().contiguous() for n, p in pl_module.named_parameters() if p.requires_grad}
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(Path(self.dirpath) / f"rank{trainer.global_rank}.safetensors"))


class DumpState(L.Callback):
    """Test-only (used by the DDP subprocess): each rank writes its parameters and Panacea's eps at fit end."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        pan = next(cb for cb in trainer.callbacks if isinstance(cb, Panacea))
        state = {"params": {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}, "eps": {n: e.cpu() for n, e in pan.eps.items()}, "draws": pan.draws}
        torch.save(state, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


class FailOnce(L.Callback):
    """Test-only: the first run of the stage that carries it fails (as a crashed job would); later runs pass."""

    def __init__(self, flag: str):
        self.flag = flag

    def on_test_start(self, trainer, pl_module):
        self._maybe_fail()

    def on_train_start(self, trainer, pl_module):
        self._maybe_fail()

    def _maybe_fail(self):
        if not Path(self.flag).exists():
            Path(self.flag).write_text("failed once")
            raise RuntimeError("simulated failure of this cell's first run")
