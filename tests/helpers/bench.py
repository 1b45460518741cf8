"""Bench test helpers: the smallest bench configs, and `immunize bench` as a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]

# 4 cells: pretrain (2 steps) -> eval; attack (1 step) -> eval.
TINY = {
    "model": {"source": "toy:tiny", "pretrain": {
        "config": "configs/toy/pretrain.yaml",
        "data": {"init_args": {"batch_size": 8, "train": [{"kind": "toy", "part": "benign", "split": "pretrain", "limit": 16}]}},
        "trainer": {"max_epochs": 1}}},
    "defenses": [{"name": "undefended"}],
    "attack": {"lrs": [1.0e-3], "samples": [8]},
    "eval": {"n_harmful_per_category": 1, "n_per_task": 1, "max_new_tokens": 4},
    "trainer": {"threads": 1},
    "wandb": {"enabled": False},
}
TWO_CELLS = {**TINY, "attack": None}  # pretrain -> eval
TIMING = ("wall_time_s", "eval_wall_time_s")
RUN_SPECIFIC = ("disk", "provenance")  # results.json parts two identical runs may differ in (log sizes, the checkout)


def comparable(results: dict, drop: tuple = ()) -> dict:
    """results.json without what differs between two runs of the same cells: wall times and `drop` in every entry and
    row, and the disk and provenance sections (the disk section has its own test: tests/test_bench_keep_models.py)."""
    results = {k: v for k, v in results.items() if k not in RUN_SPECIFIC}
    return {**results, **{part: [{k: v for k, v in r.items() if k not in TIMING + tuple(drop)} for r in results[part]]
                          for part in ("results", "rows")}}


def write_config(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def bench_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}


def run_bench(cwd: Path, *args, env=None, python=sys.executable, timeout=600) -> subprocess.CompletedProcess:
    """`python -m immunize bench ARGS` in cwd (text output)."""
    return subprocess.run([python, "-m", "immunize", "bench", *args], cwd=cwd, env=env or bench_env(),
                          capture_output=True, text=True, timeout=timeout)
