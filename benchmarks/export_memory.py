"""Peak extra CPU memory of exporting a LoRA model merged: the per-layer writer against a deep copy + merge_and_unload.

Each way runs in its own spawned process (glibc's mmap threshold pinned, so freed tensors leave RSS) on a random
Llama with LoRA on every linear layer of its decoder; a thread samples the RSS every millisecond while the export
runs. Reported: the parameter bytes, each way's peak RSS above the RSS just before export (MB and in copies of the
parameter bytes), and their ratio.
    "deepcopy":  copy.deepcopy(peft model).merge_and_unload().save_pretrained(...)  (the export before issue 27)
    "per_layer": CausalLMModule.export (lightning_modules/modeling/export_weights.py)
Usage: python benchmarks/export_memory.py [--hidden 512] [--layers 8] [--vocab 16000] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

WAYS = ("deepcopy", "per_layer")


def _build(hidden: int, layers: int, vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from immunize.lightning_modules import CausalLMModule
    from immunize.lightning_modules.modeling.lora import apply_lora

    module = CausalLMModule(model="toy:tiny")  # its tokenizer; the model is replaced by a larger random Llama
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    module.model = apply_lora(model, {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"})
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return module, sum(p.numel() * p.element_size() for p in model.parameters())


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure(way: str, hidden: int, layers: int, vocab: int) -> dict:
    """One way's peak RSS above the RSS just before export (in this process)."""
    import copy

    import torch

    torch.set_num_threads(1)
    module, param_bytes = _build(hidden, layers, vocab)
    out = tempfile.mkdtemp(prefix="export_memory_")
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    before = _rss()
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start = time.perf_counter()
    if way == "deepcopy":
        merged = copy.deepcopy(module.model).merge_and_unload()
        merged.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
        module.tokenizer.save_pretrained(os.path.join(out, "model"))
        del merged
    else:
        module.export(os.path.join(out, "model"))
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    peak[0] = max(peak[0], _rss())
    return {"way": way, "param_bytes": param_bytes, "extra_bytes": peak[0] - before, "seconds": seconds}


def run(hidden: int, layers: int, vocab: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    rows = {}
    for way in WAYS:
        code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                f"from export_memory import measure; print(json.dumps(measure({way!r}, {hidden}, {layers}, {vocab})))")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        rows[way] = json.loads(proc.stdout.strip().splitlines()[-1])
    params = rows[WAYS[0]]["param_bytes"]
    result = {"param_mb": params / 1e6}
    for way, row in rows.items():
        result[f"{way}_extra_mb"] = row["extra_bytes"] / 1e6
        result[f"{way}_extra_in_param_copies"] = row["extra_bytes"] / params
        result[f"{way}_seconds"] = row["seconds"]
    result["per_layer_over_deepcopy_extra"] = rows["per_layer"]["extra_bytes"] / max(1, rows["deepcopy"]["extra_bytes"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.hidden, args.layers, args.vocab)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:36s} {value:10.3f}")


if __name__ == "__main__":
    main()
