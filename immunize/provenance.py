"""Where a result came from: the code (immunize version, git commit and whether the tree had local changes), the
packages that computed it, the machine that collected it, and the trainer every cell shared (precision, devices,
nodes, strategy). Written into results.json as its "provenance" block, so a number can be traced to what made it."""
from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Optional

PACKAGES = ("torch", "lightning", "transformers", "peft", "datasets", "tokenizers", "safetensors", "numpy", "scipy",
            "lm-eval")
TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "precision", "strategy")
REPO = Path(__file__).resolve().parents[1]


def _version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code() -> dict:
    """immunize's version, and the git commit and dirty flag of the checkout it runs from (None when installed
    from a wheel, outside a git tree)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"immunize": _version("immunize"), "commit": commit, "dirty": None if status is None else bool(status)}


def machine() -> dict:
    """The machine that collected the results (cells may have run elsewhere: a Slurm or Ray launcher)."""
    gpus = []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(), "gpus": gpus}


def world_size(trainer: dict) -> Optional[int]:
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    return devices * nodes if isinstance(devices, int) and isinstance(nodes, int) else None


def provenance(trainer: Optional[dict] = None) -> dict:
    """The provenance block (module doc); trainer: the trainer settings every cell shares."""
    trainer = trainer or {}
    shared = {k: trainer[k] for k in TRAINER_KEYS if k in trainer}
    return {**code(), "packages": {name: _version(name) for name in PACKAGES}, "machine": machine(),
            "trainer": shared, "world_size": world_size(trainer)}
