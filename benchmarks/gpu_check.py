"""The GPU check: what only a GPU can measure, in one run of at most ~8 minutes on one H100 or H200.

Prints (a table, or one JSON object with --json):
- each registered method's step time over SFT's on a real shape (a random Llama built on the GPU from the shape's
  config: a GPU machine here has no network), bf16 autocast over fp32 weights, one fixed triplet batch;
- SFT's model FLOP utilisation: the analytic FLOPs of its step (benchmarks/flop_floor.py, 3 forwards' worth) over
  its median step time and the device's dense bf16 peak (PEAK_BF16_FLOPS, by device name);
- each method's peak memory (torch.cuda.max_memory_allocated over its second step) against benchmarks/memory.py's
  prediction for the same shape, batch, precision and hparams (one process, strategy "single");
- FSDP2 peak memory per rank when the machine has two GPUs or more (Lightning launches the ranks; the strategy of
  configs/trainer/gpu_fsdp.yaml), else a line saying it was not measured;
- batched greedy generation throughput (new tokens per second) of the same model in bf16 with a KV cache.
It imports torch, lightning, transformers, peft, torchmetrics and this repository, not datasets, wandb or
jsonargparse (the GPU image lacks them; immunize imports scipy only where it computes an interval). `--device cpu --shape llama-tiny` runs the same code path on a
CPU (tests/test_benchmarks_gpu_check.py; there the step times include the
memory profiler's overhead, so they only show the code runs).
Usage: python benchmarks/gpu_check.py [--shape llama-0.5b] [--batch 8] [--length 256] [--steps 4]
       [--methods a,b] [--gen_batch 32] [--gen_tokens 128] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import memory, step_cost  # noqa: E402
from benchmarks.flop_floor import RECIPES  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched in order on the device name.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
GPU_FSDP_PRESET = step_cost.REPO / "configs" / "trainer" / "gpu_fsdp.yaml"


def peak_flops(device_name: str) -> Optional[float]:
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in device_name), None)


def _cuda() -> bool:
    return torch.cuda.is_available()


def method_step(name: str, shape: dict, batch: dict, steps: int, precision: str) -> dict:
    """Median step seconds (steps after the first), the second step's peak bytes, supervised positions and the
    module's hparams, from one fit of `steps` + 1 steps."""
    spec = step_cost.METHODS[name]
    module = step_cost.build(name, step_cost.SHAPE_TOKENIZER, shape, seed=0)
    timer, peak = step_cost.StepTimer(), step_cost.StepPeakMemory()
    part = batch if spec.part is None else batch[spec.part]
    step_cost.run_steps(module, part, steps + 1, [timer, peak, *spec.callbacks()], precision)
    out = {"seconds": statistics.median(timer.seconds[1:]), "peak_bytes": peak.peaks[1],
           "step_shape": step_cost.step_shape(module, batch), "hparams": dict(module.hparams)}
    del module
    if _cuda():
        torch.cuda.empty_cache()
    return out


def predicted_peak(shape: dict, name: str, batch_size: int, length: int, step: dict, precision: str) -> Optional[int]:
    setup = memory.Setup(batch_size, length, step["step_shape"].supervised, precision, strategy="single",
                         device="cuda" if _cuda() else "cpu", hparams=step["hparams"])
    prediction = memory.predict(memory.ModelShape.of(shape), name, setup)
    return prediction.get("peak_bytes")


def generation_throughput(shape: dict, batch_size: int, prompt: int, new_tokens: int) -> dict:
    """New tokens per second of batched greedy decoding (KV cache, bf16 on a GPU, fp32 on a CPU), every row forced
    to generate new_tokens (a random model would stop at a random EOS)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if _cuda() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16 if _cuda() else torch.float32).eval()
    ids = torch.randint(3, shape["vocab_size"], (batch_size, prompt), device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up: kernels, cache allocation
        step_cost._sync()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        step_cost._sync()
    seconds = time.perf_counter() - start
    made = (out.shape[1] - prompt) * batch_size
    del model
    return {"batch": batch_size, "prompt": prompt, "new_tokens": made, "seconds": round(seconds, 3),
            "tokens_per_second": round(made / seconds, 1)}


def fsdp_child(shape: dict, batch: dict, out_dir: str) -> None:
    """One rank of an FSDP2 fit of SFT over every GPU (Lightning re-runs this script for the other ranks): the
    second step's peak bytes of this rank into out_dir."""
    import lightning as L
    from torch.utils.data import DataLoader

    from immunize.bench.stages import read_yaml
    from immunize.bench.validate import import_class

    spec = read_yaml(GPU_FSDP_PRESET, "FSDP2 trainer preset")["trainer"]["strategy"]
    strategy = import_class(spec["class_path"], "FSDP2 strategy")(**(spec.get("init_args") or {}))
    module = step_cost.build("sft", step_cost.SHAPE_TOKENIZER, shape, seed=0)
    peak = step_cost.StepPeakMemory()
    trainer = L.Trainer(max_steps=2, accelerator="cuda", devices=torch.cuda.device_count(), precision="bf16-mixed",
                        strategy=strategy, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[peak])
    trainer.fit(module, train_dataloaders=DataLoader(step_cost.FixedBatch(batch["harmful"], 2), batch_size=None))
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps({"peak_bytes": peak.peaks[-1]}))


def fsdp_per_rank(args, shape: dict) -> dict:
    """SFT's FSDP2 peak per rank and memory.py's prediction, or why it was not measured."""
    gpus = torch.cuda.device_count() if _cuda() else 0
    if gpus < 2:
        return {"not_measured": f"{gpus} GPU(s): FSDP2 per-rank memory needs two or more"}
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, __file__, "--fsdp_child", out, "--shape", args.shape, "--batch", str(args.batch),
                   "--length", str(args.length)]
        subprocess.run(command, check=True)
        peaks = [json.loads(p.read_text())["peak_bytes"] for p in sorted(Path(out).glob("rank*.json"))]
    batch = _batch(shape, args)
    supervised = int((batch["harmful"]["labels"][:, 1:] != -100).sum())
    setup = memory.Setup(args.batch, args.length, supervised, "bf16-mixed", strategy="fsdp", gpus=gpus)
    return {"gpus": gpus, "peak_bytes_per_rank": peaks,
            "predicted_bytes": memory.predict(memory.ModelShape.of(shape), "sft", setup).get("peak_bytes")}


def _batch(shape: dict, args) -> dict:
    return step_cost.make_batch(shape["vocab_size"], args.batch, args.length, prompt=args.length // 4)


def check(args) -> dict:
    shape = dict(SHAPES[args.shape], max_position_embeddings=max(args.length + args.gen_tokens + 64,
                                                                  SHAPES[args.shape]["max_position_embeddings"]))
    precision = "bf16-mixed"
    step_cost.METHODS.update(step_cost.registry_methods())
    names = ["sft"] + [m for m in (args.methods.split(",") if args.methods else step_cost.METHODS) if m != "sft"]
    unknown = [m for m in names if m not in step_cost.METHODS]
    if unknown:
        raise SystemExit(f"gpu_check: unknown method {unknown[0]!r}; choose from {sorted(step_cost.METHODS)}")
    device = torch.cuda.get_device_name() if _cuda() else "cpu"
    batch = _batch(shape, args)
    rows, sft_shape = {}, None
    for name in names:
        step = method_step(name, shape, batch, args.steps, precision)
        sft_shape = sft_shape or step["step_shape"]
        rows[name] = {"seconds": round(step["seconds"], 4), "peak_bytes": step["peak_bytes"],
                      "predicted_bytes": predicted_peak(shape, name, args.batch, args.length, step, precision)}
        print(json.dumps({name: rows[name]}), file=sys.stderr, flush=True)
    sft = rows["sft"]["seconds"]
    for row in rows.values():
        row["over_sft_time"] = round(row["seconds"] / sft, 3)
        row["predicted_over_measured"] = (round(row["predicted_bytes"] / row["peak_bytes"], 3)
                                          if row["predicted_bytes"] and row["peak_bytes"] else None)
    flops = RECIPES["sft"](sft_shape, {})
    peak = peak_flops(device)
    return {"device": device, "torch": torch.__version__, "shape": args.shape, "batch": [args.batch, args.length],
            "precision": precision, "methods": rows,
            "sft_model_flops_per_step": flops, "sft_tflops_per_second": round(flops / sft / 1e12, 2),
            "sft_mfu": round(flops / sft / peak, 4) if peak else None,
            "fsdp2": fsdp_per_rank(args, shape),
            "generation": generation_throughput(shape, args.gen_batch, 64, args.gen_tokens)}


def format_table(result: dict) -> str:
    gib = 1 << 30
    lines = [f"{result['device']}, torch {result['torch']}, {result['shape']} (random weights), batch "
             f"{result['batch'][0]} x {result['batch'][1]}, {result['precision']}",
             f"{'method':<12}{'step s':>9}{'over SFT':>10}{'peak GiB':>10}{'predicted GiB':>15}{'pred/meas':>11}"]
    for name, r in result["methods"].items():
        predicted = f"{r['predicted_bytes'] / gib:>15.2f}" if r["predicted_bytes"] else f"{'—':>15}"
        ratio = f"{r['predicted_over_measured']:>11.2f}" if r["predicted_over_measured"] else f"{'—':>11}"
        lines.append(f"{name:<12}{r['seconds']:>9.4f}{r['over_sft_time']:>10.2f}{r['peak_bytes'] / gib:>10.2f}"
                     f"{predicted}{ratio}")
    mfu = f"{100 * result['sft_mfu']:.1f}%" if result["sft_mfu"] is not None else "— (no bf16 peak known for this device)"
    gen = result["generation"]
    fsdp = result["fsdp2"]
    lines += [f"SFT: {result['sft_tflops_per_second']} TFLOP/s of model FLOPs, MFU {mfu}",
              f"generation: {gen['tokens_per_second']} new tokens/s (batch {gen['batch']}, {gen['new_tokens']} tokens "
              f"in {gen['seconds']} s)",
              "FSDP2: " + (fsdp["not_measured"] if "not_measured" in fsdp else
                           f"{fsdp['gpus']} GPUs, peak per rank GiB "
                           + ", ".join(f"{p / gib:.2f}" for p in fsdp["peak_bytes_per_rank"])
                           + (f" (predicted {fsdp['predicted_bytes'] / gib:.2f})" if fsdp["predicted_bytes"] else ""))]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per method (after one warm-up step)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the registry (sft is always in)")
    parser.add_argument("--gen_batch", type=int, default=32)
    parser.add_argument("--gen_tokens", type=int, default=128)
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu: hide the GPUs (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--fsdp_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read when CUDA initialises, which nothing has done yet
    if args.fsdp_child:
        step_cost.METHODS.update(step_cost.registry_methods())
        shape = dict(SHAPES[args.shape], max_position_embeddings=max(args.length, SHAPES[args.shape]["max_position_embeddings"]))
        fsdp_child(shape, _batch(shape, args), args.fsdp_child)
        return 0
    result = check(args)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
