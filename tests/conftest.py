"""Shared fixtures: offline mode, quiet warnings, and helpers to run the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m immunize ARGS` in cwd; returns the completed process (text output)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "immunize", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def one_thread():
    """Toy models on 2 shared cores: one intra-op thread is fastest and leaves the other core free."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli(tmp_path):
    """Call the CLI inside a temporary working directory."""
    return lambda *args, timeout=600: run_cli(*args, cwd=tmp_path, timeout=timeout)


@pytest.fixture(scope="session")
def toy_tokenizer():
    from immunize.datamodules.toy.tokenizer import build_toy_tokenizer

    return build_toy_tokenizer()


@pytest.fixture(scope="session")
def cli_server():
    """A warm `immunize` command server (helpers.cli_server): each run is a forked process, without the imports."""
    from helpers.cli_server import CliServer

    server = CliServer(REPO)
    yield server
    server.close()
