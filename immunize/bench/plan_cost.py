"""What a plan will cost at its real scale, for `immunize bench --plan`: per fit cell the predicted peak memory per
GPU (benchmarks/memory.py), its training steps and GPU-hours (benchmarks/flop_floor.py's FLOPs per step at an assumed
MFU), the size of the model it exports; for the plan the GPU-hours of training and the disk its exported models take
with keep_models true and (the largest held at once, running the cells in plan order) false.

Estimates, not measurements: the hours assume H100 bf16 dense peak (PEAK_TFLOPS) at MFU (SHARDED_MFU under FSDP2:
its weight traffic), count training only (evaluation and lm-eval time: results.json's eval_wall_time_s after a run),
and the steps come from trainer.max_steps or max_epochs x the data's row limits; FSDP2's weight traffic (LINK_GBPS) and a fixed load-and-export time per fit are added. The model's shapes come from a
local model folder's config.json or, for a hub id, from the published configs in benchmarks/shapes.py (HUB_SHAPES);
toy presets are not estimated. The prediction needs a source checkout (benchmarks/ is not installed with the wheel).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from immunize.bench.stages import REPO_ROOT

PEAK_TFLOPS = 989.0  # H100 SXM bf16 dense
MFU, SHARDED_MFU = 0.30, 0.20
LINK_GBPS = 200.0  # FSDP2: per GPU, the fp32 weights moved about three times per pass (two all-gathers, a reduce-scatter)
LOAD_EXPORT_S = 180.0  # loading the input model and writing the export, per fit
EXPORT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
METHODS = {"SEAM": "seam", "RepNoise": "repnoise", "Vaccine": "vaccine", "TVaccine": "t_vaccine", "Booster": "booster",
           "TAR": "tar", "AdversarialImmunization": "adversarial", "Panacea": "panacea", "Lisa": "lisa"}


def _benchmarks():
    """benchmarks.memory and benchmarks.flop_floor, or None outside a source checkout."""
    import sys

    if not (REPO_ROOT / "benchmarks" / "memory.py").is_file():
        return None
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from benchmarks import flop_floor, memory, shapes

    return memory, flop_floor, shapes


def root_source(cell) -> str:
    while not isinstance(cell.input, str):
        cell = cell.input
    return cell.input


def model_config(source: str, shapes) -> Optional[dict]:
    """The source's Hugging Face config as a dict: a local folder's config.json, a known hub id's published one."""
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    name = shapes.HUB_SHAPES.get(source)
    return dict(shapes.SHAPES[name]) if name else None


def method_of(cfg: dict) -> str:
    """The memory model's method name for a fit's config: its module class, else a fine-tuning callback, else SFT."""
    names = [str((cfg.get("model") or {}).get("class_path", "")).rsplit(".", 1)[-1]]
    callbacks = (cfg.get("trainer") or {}).get("callbacks") or []
    names += [str(c.get("class_path", "")).rsplit(".", 1)[-1] for c in callbacks if isinstance(c, dict)]
    return next((METHODS[n] for n in names if n in METHODS), "sft")


def _limits(data: dict) -> Optional[int]:
    """Rows per epoch from the training sources' limits (a list of sources: their sum; named sources such as
    SEAM's pairs and benign rows, read side by side: the largest; a harmful mix: its n); None when one has no limit."""
    if isinstance(data.get("n"), int):
        return data["n"]
    if isinstance(data.get("train"), list):
        limits = [s.get("limit") for s in data["train"] if isinstance(s, dict)]
        return sum(limits) if limits and None not in limits else None
    limits = [v.get("limit") for k, v in data.items() if isinstance(v, dict) and k not in ("eval", "val")]
    return max(limits) if limits and None not in limits else None


def steps_of(cfg: dict, gpus: int) -> Optional[int]:
    trainer = cfg.get("trainer") or {}
    if (trainer.get("max_steps") or -1) > 0:
        return int(trainer["max_steps"])
    data = ((cfg.get("data") or {}).get("init_args") or {})
    rows, epochs = _limits(data), trainer.get("max_epochs")
    batch = int(data.get("batch_size") or 1) * gpus * int(((cfg.get("model") or {}).get("init_args") or {}).get("accumulate") or 1)
    return None if rows is None or not epochs else int(epochs) * math.ceil(rows / batch)


def strategy_of(trainer: dict, gpus: int) -> str:
    strategy = trainer.get("strategy")
    name = str(strategy.get("class_path", "") if isinstance(strategy, dict) else strategy or "")
    if "FSDP" in name.upper() or "ModelParallel" in name:
        return "fsdp"
    return "ddp" if gpus > 1 or "ddp" in name else "single"


def fit_cost(cell, tools) -> Optional[dict]:
    """One fit cell's estimate (None when its model's shapes are unknown)."""
    memory, flop_floor, shapes = tools
    config = model_config(root_source(cell), shapes)
    if config is None:
        return None
    cfg, trainer = cell.config, cell.config.get("trainer") or {}
    args = ((cfg.get("model") or {}).get("init_args") or {})
    data = ((cfg.get("data") or {}).get("init_args") or {})
    gpus = int(trainer.get("devices") or 1) * int(trainer.get("num_nodes") or 1)
    method, precision = method_of(cfg), str(trainer.get("precision") or "32-true")
    length, batch = int(data.get("max_length") or 512), int(data.get("batch_size") or 1)
    shape = memory.ModelShape(**shapes.ModelShape.sizes(config))
    setup = memory.Setup(batch=batch, length=length, precision=precision if precision in (
        "bf16-mixed", "32-true", "bf16-true") else "bf16-mixed", lora=args.get("lora") or None,
        strategy=strategy_of(trainer, gpus), gpus=gpus)
    predicted = memory.predict(shape, method, setup)
    steps = steps_of(cfg, gpus)
    step_shape = flop_floor.StepShape.of(config, batch=batch, length=length, supervised=length)
    recipe = flop_floor.RECIPES.get(method, flop_floor.RECIPES["sft"])
    one_rank = recipe(step_shape, args) * (2 / 3 if setup.lora else 1)  # LoRA: no weight gradients of the base
    mfu = SHARDED_MFU if setup.strategy == "fsdp" else MFU
    step_s = one_rank / (PEAK_TFLOPS * 1e12 * mfu)
    if setup.strategy == "fsdp":  # passes per step (in SFT steps) x three moves of the fp32 weights
        passes = one_rank / flop_floor.RECIPES["sft"](step_shape, {})
        step_s += passes * 3 * 4 * shape.params() / (LINK_GBPS * 1e9)
    gpu_hours = None if steps is None else (steps * step_s + LOAD_EXPORT_S) * gpus / 3600
    dtype = args.get("export_dtype") or ("bfloat16" if "bf16" in precision else "float32")
    return {"cell": cell.name, "label": cell.label, "method": method, "params": shape.params(), "gpus": gpus,
            "strategy": setup.strategy, "peak_gib": None if "refused" in predicted else predicted["peak_bytes"] / 2**30,
            "steps": steps, "gpu_hours": gpu_hours, "mfu": mfu,
            "export_bytes": shape.params() * EXPORT_BYTES.get(dtype, 4), "export_dtype": dtype}


def disk_peak(cells, sizes: dict[str, int]) -> int:
    """The most bytes of exported models held at once when the cells run in order and each model is removed after
    its last reader (keep_models: false)."""
    last_reader = {}
    for i, cell in enumerate(cells):
        if cell.fit_input is not None:
            last_reader[cell.fit_input.name] = i
    held, peak = 0, 0
    for i, cell in enumerate(cells):
        if cell.kind == "fit":
            held += sizes.get(cell.name, 0)
            peak = max(peak, held)
        for name, last in last_reader.items():
            if last == i:
                held -= sizes.get(name, 0)
    return peak


def plan_cost(cells) -> Optional[dict]:
    """The plan's estimate, or None when nothing can be estimated (toy presets, unknown shapes, no checkout)."""
    tools = _benchmarks()
    if tools is None:
        return None
    fits = [c for c in cells if c.kind == "fit"]
    rows = [r for r in (fit_cost(c, tools) for c in fits) if r is not None]
    if not rows:
        return None
    sizes = {r["cell"]: r["export_bytes"] for r in rows}
    hours = [r["gpu_hours"] for r in rows]
    peaks = [r for r in rows if r["peak_gib"] is not None]
    return {"fits": rows, "estimated_fits": len(rows), "all_fits": len(fits),
            "gpu_hours": None if None in hours else sum(hours),
            "largest_peak": max(peaks, key=lambda r: r["peak_gib"]) if peaks else None,
            "disk_keep_models_bytes": sum(sizes.values()), "disk_no_keep_models_peak_bytes": disk_peak(cells, sizes),
            "assumptions": {"peak_tflops": PEAK_TFLOPS, "mfu": MFU, "sharded_mfu": SHARDED_MFU,
                            "link_gbps": LINK_GBPS, "load_export_s": LOAD_EXPORT_S, "counts": "fits only"}}


def cost_lines(cost: dict) -> list[str]:
    """What --plan prints: one line per estimated fit and a summary."""
    lines = []
    for r in cost["fits"]:
        peak = "refused by the memory model" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB per GPU"
        hours = "steps unknown" if r["gpu_hours"] is None else f"{r['steps']} steps, {r['gpu_hours']:.2f} GPU-h"
        lines.append(f"  cost {r['label']}: {r['method']}, {r['params'] / 1e9:.2f}B params on {r['gpus']} GPU(s) "
                     f"({r['strategy']}): {peak}; {hours}; exports {r['export_bytes'] / 1e9:.1f} GB ({r['export_dtype']})")
    hours = "unknown (a fit without max_steps or row limits)" if cost["gpu_hours"] is None else f"{cost['gpu_hours']:.1f}"
    big = cost["largest_peak"]
    lines.append(f"estimate ({cost['estimated_fits']}/{cost['all_fits']} fits; H100 bf16 at {MFU:.0%} MFU, "
                 f"{SHARDED_MFU:.0%} under FSDP2, its traffic, {LOAD_EXPORT_S / 60:.0f} min load + export per fit; "
                 f"evaluations not counted): {hours} GPU-hours of fits; largest memory "
                 + (f"{big['peak_gib']:.1f} GiB per GPU ({big['label']})" if big else "unknown")
                 + f"; exported models {cost['disk_keep_models_bytes'] / 1e9:.0f} GB with keep_models true, "
                   f"{cost['disk_no_keep_models_peak_bytes'] / 1e9:.0f} GB at most at once with false")
    return lines
