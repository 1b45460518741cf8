"""Cost of one training step of a defense relative to plain SFT: time ratio and extra memory in parameter copies.

Each method in METHODS runs real Lightning training steps (optimizer and schedule included) on one fixed
batch of the same model. SFT trains on the harmful part of a (harmful, refusal, benign) triplet; SEAM on
the whole triplet, as in real use. Memory: on GPU torch.cuda.max_memory_allocated over the step; on CPU
the torch profiler's allocation events (running total of CPU-allocator bytes, profiled from the start
of training, its maximum inside the step) plus the parameters' bytes.
The methods are the registry's (immunize.bench.registry), each with its toy config's settings.
Usage: python benchmarks/step_cost.py [--json] [--steps N] [--rounds R] [--threads T] [--model toy:small] [--methods a,b]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from immunize.lightning_modules import SFT  # noqa: E402
from immunize.callbacks import Lisa, Panacea  # noqa: E402
from immunize.callbacks.antidote import antidote_prune  # noqa: E402
from benchmarks.flop_floor import RECIPES, StepShape, floor_in_sft_steps  # noqa: E402
from benchmarks.shapes import LLAMA_05B, SHAPES  # noqa: E402
from immunize.datamodules import Source  # noqa: E402
from immunize.bench import registry  # noqa: E402
from immunize.bench.stages import read_yaml  # noqa: E402
from immunize.bench.validate import import_class  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

@dataclass
class Method:
    """How to build a method's module (and callbacks) and which part of the triplet batch it trains on."""

    build: Callable[..., L.LightningModule]
    part: Optional[str] = "harmful"  # None: the whole {"harmful", "refusal", "benign"} batch
    callbacks: Callable[[], list] = field(default=list)


def _alignment_method(defense) -> Method:
    """A registered alignment defense with its toy config's settings, on the whole triplet batch."""
    init = dict(((read_yaml(REPO / defense.config, defense.name).get("model") or {}).get("init_args") or {}))
    for key in ("model", "lr", "optimizer", "scheduler", "warmup_ratio"):
        init.pop(key, None)
    cls = import_class(defense.class_path, defense.name)
    return Method(lambda _cls=cls, _init=init, **kw: _cls(**{**_init, **kw}), part=None)


# Fine-tuning-stage defenses that act every step, measured on the SFT step they hook; the others act once at fit end.
PER_STEP_CALLBACKS = {"panacea": lambda: [SameShapePanacea()], "lisa": lambda: [SameShapeLisa()]}
ONE_SHOT = {"antidote": "antidote_one_shot (pruning once after fine-tuning)",
            "random": "no step cost (one noise draw at fit end)",
            "safe_lora": "no step cost (one projection per LoRA module at fit end)"}


def registry_methods() -> dict[str, Method]:
    """Every registered defense, from immunize.bench.registry (the reference SFT step first)."""
    methods = {"sft": Method(lambda **kw: SFT(**kw))}
    for d in registry.DEFENSES:
        if d.class_path is None:
            continue
        if d.stage == registry.ALIGNMENT:
            methods[d.name] = _alignment_method(d)
        elif d.name in PER_STEP_CALLBACKS:
            methods[d.name] = Method(lambda **kw: SFT(**kw), callbacks=PER_STEP_CALLBACKS[d.name])
        elif d.name not in ONE_SHOT:
            raise SystemExit(f"step_cost: registered defense {d.name!r} has no step-cost measurement; add it")
    return methods


class SameShapePanacea(Panacea):
    """Panacea (rho 1, lam 1e-3) whose h batch is the step's own batch: same shape as the task batch, so the ratio
    counts passes, not sequence lengths; no clamp, so all three forward+backward passes always run (worst case)."""

    def __init__(self):
        super().__init__(loss_clamp=None, eps_file=None, harmful=Source(kind="toy", part="harmful", split="align", limit=8))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_batch = batch

    def next_batch(self, trainer, device):
        self.draws += 1
        return self._step_batch


class SameShapeLisa(Lisa):
    """Lisa (rho 1, 2 alignment / 8 user steps) whose alignment batch is the step's own batch: one pass per step
    either way, plus the proximal term on every step and an anchor copy at each phase switch."""

    def __init__(self):
        super().__init__(alignment=Source(kind="toy", part="pairs", split="align", limit=8), batch_size=1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_batch = dict(batch)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def next_batch(self, trainer, device):
        self.draws += 1
        return self._step_batch


METHODS: dict[str, Method] = {}
SHAPE_TOKENIZER = "toy:tiny"  # a shape run builds the module on this source, then swaps in the shaped random model


def antidote_one_shot(model: str, batch: dict, sft_step_seconds: float) -> dict:
    """Antidote has no per-step cost (it prunes once, after fine-tuning): the wall time of that one-shot pruning
    (dense_ratio 0.1, layer by layer, one calibration batch of the step's shape), also in SFT steps."""
    module = build("sft", model, None, seed=0)
    start = time.perf_counter()
    antidote_prune(module.model, [batch], 0.1, sequential=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "in_sft_steps": round(seconds / sft_step_seconds, 3), "calibration_batches": 1}


class FixedBatch(Dataset):
    """The same batch `steps` times (batch_size=None in the loader: no collation)."""

    def __init__(self, batch, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i):
        return self.batch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(L.Callback):
    """Wall time of each whole training step (batch start to batch end: passes, optimizer, schedule).

    Also the process CPU time of the step: on a CPU shared with other jobs it counts this process's
    work only, so it is the steadier ratio there (wall time is the headline figure).
    """

    def __init__(self):
        self.seconds, self.cpu_seconds = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _sync()
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync()
        self.seconds.append(time.perf_counter() - self._t0)
        self.cpu_seconds.append(time.process_time() - self._c0)


class StepFlops(L.Callback):
    """Matmul FLOPs of each whole training step, counted by torch's FlopCounterMode (what our code really runs)."""

    def __init__(self):
        self.flops = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from torch.utils.flop_counter import FlopCounterMode

        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._mode.__exit__(None, None, None)
        self.flops.append(self._mode.get_total_flops())


class StepPeakMemory(L.Callback):
    """Peak bytes allocated during each step (see the module docstring for how, per device).

    CPU: one profiler session over the whole fit (the profiler drops frees of blocks allocated
    before it started, so it must see gradients and optimizer state being created); a step's peak
    is the parameters' bytes plus the highest running allocation total inside the step's window.
    """

    def __init__(self):
        self.peaks, self._windows = [], []

    def on_train_start(self, trainer, pl_module):
        if not torch.cuda.is_available():
            self._base = sum(p.untyped_storage().nbytes() for p in pl_module.parameters())
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self._prof.start()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._t0 = time.time_ns()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync()
        if torch.cuda.is_available():
            self.peaks.append(torch.cuda.max_memory_allocated())
        self._windows.append((self._t0, time.time_ns()))

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            return
        self._prof.stop()
        self.peaks += window_peaks(_allocation_events(self._prof), self._windows, self._base)


def window_peaks(events: list[tuple[int, int]], windows: list[tuple[int, int]], base: int) -> list[int]:
    """Per (start, end) window in ns: base plus the highest running allocation total seen in it (the total carried
    in from before the window counts)."""
    peaks = []
    for t0, t1 in windows:
        before = [total for t, total in events if t < t0]
        inside = [total for t, total in events if t0 <= t <= t1]
        peaks.append(base + max(before[-1:] + inside, default=0))
    return peaks


def _allocation_events(prof) -> list[tuple[int, int]]:
    """(time in ns, CPU bytes allocated since the profiler started, net of frees), in time order.

    The profiler's running total carries over from earlier profiling sessions in the process, so
    it is taken relative to its value just before the first event.
    """
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and str(event.extra_fields.device) == "cpu":
            fields = event.extra_fields
            events.append((event.start_time_ns, fields.total_allocated, fields.alloc_size))
        stack.extend(event.children)
    events.sort()
    offset = events[0][1] - events[0][2] if events else 0
    return [(t, total - offset) for t, total, _ in events]


def run_steps(module: L.LightningModule, batch, steps: int, callbacks=(), precision: str = "32-true") -> L.Trainer:
    """Fit `module` for `steps` real training steps on one fixed batch, with the given extra callbacks."""
    trainer = L.Trainer(max_steps=steps, accelerator="auto", devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=DataLoader(FixedBatch(batch, steps), batch_size=None))
    return trainer


def make_batch(vocab: int, batch_size: int, length: int, prompt: int, seed: int = 0) -> dict:
    """A triplet of fixed-length random batches with response-only labels (same shape for every part)."""
    gen = torch.Generator().manual_seed(seed)
    parts = {}
    for name in ("harmful", "refusal", "benign"):
        ids = torch.randint(3, vocab, (batch_size, length), generator=gen)
        labels = ids.clone()
        labels[:, :prompt] = -100
        parts[name] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return parts


def step_shape(module: L.LightningModule, batch: dict) -> StepShape:
    """The shapes the FLOP floor is computed from: the module's model config and one batch part."""
    part = batch["harmful"]
    supervised = int((part["labels"][:, 1:] != -100).sum())
    return StepShape.of(module.model.config, *part["input_ids"].shape, supervised)


def build(name: str, model: str, llama: Optional[dict], seed: int) -> L.LightningModule:
    """The method's module on `model` (or, with `llama`, on a seeded random Llama of that config)."""
    module = METHODS[name].build(model=model, lr=1e-5, optimizer="adamw")
    if llama is not None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            module.model = LlamaForCausalLM(LlamaConfig(**llama))
    return module


def _rss_child(name: str, model: str, llama: Optional[dict], batch: dict, precision: str, threads: int, queue) -> None:
    """In a fresh process: two steps of `name`, then the process's peak resident memory (bytes) into `queue`.

    The peak is Linux's VmHWM, reset first (/proc/self/clear_refs "5"): a spawned child starts as a fork of the
    parent, and its ru_maxrss would carry the parent's resident size.
    """
    torch.set_num_threads(threads)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    METHODS.update(registry_methods())
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    method = METHODS[name]
    module = build(name, model, llama, seed=0)
    run_steps(module, batch if method.part is None else batch[method.part], 2, method.callbacks(), precision)
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    queue.put(int(status["VmHWM"].split()[0]) * 1024)


def rss_peak(name: str, model: str, llama: Optional[dict], batch: dict, precision: str) -> int:
    """Peak RSS of a spawned process that builds the method and runs two steps (CPU memory without the profiler).

    glibc's mmap threshold is pinned at 64 KiB in the child, so every large tensor is its own mapping, returned to
    the system when freed: RSS then follows live tensor memory. Same process recipe for every method, so the
    difference of two peaks is the difference of their steps' peaks (weights, gradients, optimizer state alike).
    """
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_rss_child, args=(name, model, llama, batch, precision, torch.get_num_threads(), queue))
    child.start()
    peak = queue.get()
    child.join()
    return peak


def measure(model: str, batch: dict, steps: int, rounds: int, precision: str, llama: Optional[dict] = None,
            memory_mode: str = "profiler") -> dict:
    """Median step time and peak step memory per method; rounds alternate methods to share machine noise."""
    times = {name: [] for name in METHODS}
    cpu_times = {name: [] for name in METHODS}
    peaks, n_params = {}, 0
    for _ in range(rounds):
        for name, method in METHODS.items():
            module = build(name, model, llama, seed=0)
            timer = StepTimer()
            part = batch if method.part is None else batch[method.part]
            run_steps(module, part, steps + 1, [timer, *method.callbacks()], precision)
            times[name] += timer.seconds[1:]  # the first step builds optimizer state and warms caches
            cpu_times[name] += timer.cpu_seconds[1:]
            del module
    if rounds:  # the timing, before the (slower) memory and FLOP passes
        print(json.dumps({"median_step_seconds": {k: statistics.median(v) for k, v in times.items()}}),
              file=sys.stderr, flush=True)
    floors, counted, shape = {}, {}, None
    for name, method in METHODS.items():
        part = batch if method.part is None else batch[method.part]
        if memory_mode == "rss" and not torch.cuda.is_available():
            peaks[name] = rss_peak(name, model, llama, batch, precision)
            module = build(name, model, llama, seed=0)
        else:
            module = build(name, model, llama, seed=0)
            memory = StepPeakMemory()
            run_steps(module, part, 2, [memory, *method.callbacks()], precision)
            peaks[name] = memory.peaks[-1]  # second step: optimizer state exists, as in the rest of training
        shape = step_shape(module, batch)
        n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        floors[name] = floor_in_sft_steps(name, shape, dict(module.hparams))
        flops = StepFlops()
        run_steps(module, part, 1, [flops, *method.callbacks()], precision)
        counted[name] = flops.flops[-1]
        del module
    param_bytes = 4 * n_params
    median = {name: statistics.median(ts) if ts else float("nan") for name, ts in times.items()}
    cpu_median = {name: statistics.median(ts) if ts else float("nan") for name, ts in cpu_times.items()}
    result = {"model": model if llama is None else llama, "precision": precision, "n_params": n_params,
              "batch": list(batch["harmful"]["input_ids"].shape), "steps_timed": len(times["sft"]),
              "median_step_seconds": median, "peak_bytes": peaks,
              "memory_method": "torch.cuda.max_memory_allocated" if torch.cuda.is_available()
              else "peak RSS of a spawned process per method (2 steps)" if memory_mode == "rss"
              else "torch profiler CPU allocation events (whole fit) + parameter bytes"}
    result["sft_step_flops"] = {"floor": RECIPES["sft"](shape, {}), "counted": counted["sft"]}
    for name in METHODS:
        if name != "sft":
            if floors[name] is not None:
                result[f"{name}_flop_floor_in_sft_steps"] = round(floors[name], 3)
            result[f"{name}_counted_flops_in_sft_steps"] = round(counted[name] / counted["sft"], 3)
            result[f"{name}_over_sft_time"] = round(median[name] / median["sft"], 3)
            if not torch.cuda.is_available():
                result[f"{name}_over_sft_cpu_time"] = round(cpu_median[name] / cpu_median["sft"], 3)
            result[f"{name}_extra_memory_in_param_copies"] = round((peaks[name] - peaks["sft"]) / param_bytes, 3)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--model", default="toy:small",
                        help=f"model source for the CPU run, or a real model's shape with random weights: {sorted(SHAPES)}")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method and round")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (0: memory and FLOPs only)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the registry (sft is always in)")
    parser.add_argument("--memory", choices=("profiler", "rss"), default="profiler",
                        help="CPU memory: profiler allocation events (exact, slow and memory-hungry on real shapes) "
                             "or the peak RSS of one spawned process per method")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = registry_methods()
    if args.methods:
        wanted = {"sft", *(m.strip() for m in args.methods.split(","))}
        unknown = wanted - set(methods)
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}; choose from {sorted(methods)}")
        methods = {k: v for k, v in methods.items() if k in wanted}
    METHODS.update(methods)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    source, shape = (SHAPE_TOKENIZER, SHAPES[args.model]) if args.model in SHAPES else (args.model, None)
    probe = build("sft", source, shape, 0)
    vocab = probe.model.config.vocab_size
    del probe
    batch = make_batch(vocab, args.batch_size, args.length, prompt=args.length // 4)
    result = measure(source, batch, args.steps, args.rounds, "32-true", shape, args.memory)
    if shape is not None:
        result["model"] = args.model
    if (not args.methods or "antidote" in args.methods) and shape is None:
        result["antidote_one_shot"] = antidote_one_shot(args.model, batch["harmful"], result["median_step_seconds"]["sft"])
    if torch.cuda.is_available():  # real-scale shape: ~0.5B Llama, bf16 autocast over fp32 weights, 8 x 256
        big = make_batch(LLAMA_05B["vocab_size"], 8, 256, prompt=64)
        result = {"cpu_or_small": result, "gpu_0.5b": measure("toy:tiny", big, 5, 1, "bf16-mixed", LLAMA_05B)}
        for key in ("seam_over_sft_time", "seam_extra_memory_in_param_copies"):
            result[key] = result["gpu_0.5b"][key]
    if args.json:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
