"""Test-only callbacks that subprocesses load by class path: each rank writes its state at fit end; a cell fails once."""
import json
import os
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from immunize.callbacks import Panacea
from immunize.lightning_modules.modeling.sharding import is_sharded, local


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (an FSDP shard is gathered: a collective, so every rank calls this in order)."""
    return (t.full_tensor() if is_sharded(t) else t).detach().cpu().contiguous()


class DumpParameters(L.Callback):
    """Each rank writes its full trainable parameters at fit end (gathered under FSDP)."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_fit_end(self, trainer, pl_module):
        tensors = {n: full(p) for n, p in pl_module.named_parameters() if p.requires_grad}
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(Path(self.dirpath) / f"rank{trainer.global_rank}.safetensors"))


class GradientBytes(L.Callback):
    """Each rank records the bytes this rank holds of the gradient-sized tensors: the applied gradient (p.grad)
    and every buffer a multi-pass method's step_gradient returns, their maxima written as JSON at fit end."""

    def __init__(self, dirpath: str):
        self.dirpath, self.peak = dirpath, {"applied": 0, "step_gradient": 0}

    @staticmethod
    def _bytes(tensors) -> int:
        return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)

    def on_fit_start(self, trainer, pl_module):
        inner = getattr(pl_module, "step_gradient", None)
        if inner is None:
            return

        def recorded(batch):
            grads, logs = inner(batch)
            self.peak["step_gradient"] = max(self.peak["step_gradient"], self._bytes(grads))
            return grads, logs
        pl_module.step_gradient = recorded

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.trainable_parameters()]
        self.peak["applied"] = max(self.peak["applied"], self._bytes(grads))

    def on_fit_end(self, trainer, pl_module):
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        (Path(self.dirpath) / f"bytes{trainer.global_rank}.json").write_text(json.dumps(self.peak))


class DumpState(L.Callback):
    """Test-only (used by the DDP subprocess): each rank writes its parameters and Panacea's eps at fit end."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        pan = next(cb for cb in trainer.callbacks if isinstance(cb, Panacea))
        state = {"params": {n: full(p) for n, p in pl_module.model.named_parameters()},
                 "eps": {n: full(e) for n, e in pan.eps.items()}, "draws": pan.draws}
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


def assert_ranks_identical(dump) -> dict:
    """The two ranks' dumped weights (DumpParameters' rank0/rank1.safetensors) are the same tensors, bit for bit;
    returns rank 0's."""
    from pathlib import Path

    from safetensors.torch import load_file

    ranks = [load_file(str(Path(dump) / f"rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert max(float((ranks[0][k] - ranks[1][k]).abs().max()) for k in ranks[0]) == 0.0
    return ranks[0]
