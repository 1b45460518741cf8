"""Test-only callback: each rank writes its trainable parameters at fit end, to compare ranks."""
from pathlib import Path

import lightning as L
from safetensors.torch import save_file


class DumpParameters(L.Callback):
    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_fit_end(self, trainer, pl_module):
        tensors = {n: p.detach().cpu().contiguous() for n, p in pl_module.named_parameters() if p.requires_grad}
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(Path(self.dirpath) / f"rank{trainer.global_rank}.safetensors"))
