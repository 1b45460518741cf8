"""Checks that run before any training; each failure is one UserError line.

Cheap checks first (grid, learning rates, paths), so a typo fails in a second; then the plan is built
(stage config files are read) and every class path the cells name is imported and its init_args keys
are checked against the constructor, so an unknown defense or a misspelt key fails before the first fit.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import math
import os
from typing import Any

from immunize.bench.schema import BenchConfig
from immunize.errors import UserError



def _looks_local(source: str) -> bool:
    """As immunize.lightning_modules.modeling.model_loading: a path unless it reads like a hub id "org/name"."""
    return os.path.isabs(source) or source.startswith(".") or os.path.exists(source) or source.count("/") != 1


def _unique(names: list[str], what: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise UserError(f"{what}: defense name {name!r} appears twice; names must be unique")
        seen.add(name)


def _count(value, what: str, low: int, none_ok: bool = True, meaning: str = "") -> None:
    """An integer >= low (or None where allowed), else a one-line UserError naming the field."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{what} must be an integer >= {low}{meaning}, got {value!r}")


def _number(value, what: str, low: float, high: float = math.inf, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low <= value \
        and (value < high if high_open else value <= high)
    if not ok:
        upper = ")" if high_open else "]"
        raise UserError(f"{what} must be a number in [{low}, {high}{upper}, got {value!r}")


def check_counts(b: BenchConfig) -> None:
    """Every count, size, step and ratio field of the bench config in range (one line naming the field)."""
    if not b.seeds:
        raise UserError("seeds is empty, so the bench would run no cell; give at least one seed (e.g. --seeds '[0]')")
    for seed in b.seeds:
        _count(seed, "seeds: each seed", 0, none_ok=False)
    if len(set(b.seeds)) != len(b.seeds):
        raise UserError(f"seeds {b.seeds} repeats a seed; each seed runs the whole pipeline once")
    e = b.eval
    for name in ("n_harmful_per_category", "n_per_task", "n_over_refusal"):
        _count(getattr(e, name), f"eval.{name}", 0, meaning=" (0 takes none; null keeps the eval config's)")
    _count(e.max_new_tokens, "eval.max_new_tokens", 1)
    _count(e.batch_size, "eval.batch_size", 1)
    _count(b.trainer.log_every_n_steps, "trainer.log_every_n_steps", 1, none_ok=False)
    _count(b.launcher.time_min, "launcher.time_min", 1, none_ok=False)
    r = b.report
    _number(r.threshold, "report.threshold (a harmful score in %)", 0.0, 100.0)
    _number(r.stability_tolerance, "report.stability_tolerance", 0.0)
    _number(r.finetune_tolerance, "report.finetune_tolerance", 0.0)
    for pair in r.pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise UserError(f"report.pairs: each entry must be [defense_a, defense_b], got {pair!r}")
    if b.attack is not None:
        a = b.attack
        _count(a.loss_curve_every, "attack.loss_curve_every", 0, none_ok=False, meaning=" (0: not measured)")
        window = a.window or {}
        unknown = sorted(set(window) - {"harm", "capability_drop"})
        if unknown:
            raise UserError(f"attack.window: unknown key {unknown[0]!r}; it takes harm and capability_drop")
        _number(window.get("harm", 50.0), "attack.window.harm", 0.0, 100.0)
        _number(window.get("capability_drop", 5.0), "attack.window.capability_drop", 0.0)
        lora_r = (a.lora or {}).get("r", 8)
        _count(lora_r, "attack.lora.r", 1, none_ok=False)


BENCH_MARKER = "bench.json"  # written into OUT when a bench starts: the folder is the bench's own from then on
OWN_FILES = (BENCH_MARKER, "plan.json", ".lock", "cells", "shrink")  # the bench's own names (--plan, the lock, the
# cells, the tiny models of --shrink)


def check_out(b: BenchConfig) -> None:
    """OUT (and cells_dir) must be folders the bench may write: new, empty, or an earlier bench's output (it holds
    bench.json); a file, or a folder of someone else's files whose results.json and report.md would be overwritten,
    is refused."""
    from pathlib import Path

    for what, value in (("--out", b.out), ("cells_dir", b.cells_dir)):
        if value is None:
            continue
        if not str(value).strip():
            raise UserError(f"{what} is empty; give a folder for the bench's output")
        path = Path(value).expanduser()
        if path.exists() and not path.is_dir():
            raise UserError(f"{what} {value!r} is a file, not a folder; give a new folder (e.g. runs/bench/mine)")
    out = Path(b.out).expanduser()
    foreign = [p for p in out.iterdir() if p.name not in OWN_FILES] if out.is_dir() else []
    if foreign and not (out / BENCH_MARKER).is_file():
        raise UserError(f"--out {b.out!r} holds files the bench did not write (no {BENCH_MARKER}), and the bench "
                        "writes results.json, report.md and plots there; give a new or empty folder")


def check_launcher(b: BenchConfig) -> None:
    """The launcher's scheduler is reachable from here: Slurm's sbatch for cluster slurm, submitit or Ray installed."""
    import importlib.util
    import shutil

    name = b.launcher.name
    if name == "slurm":
        if importlib.util.find_spec("submitit") is None:
            raise UserError("launcher slurm needs submitit: pip install 'immunize[cluster]' (or pip install submitit)")
        if b.launcher.cluster == "slurm" and shutil.which("sbatch") is None:
            raise UserError("launcher slurm: Slurm's sbatch is not on PATH here; run the bench on a Slurm login node, "
                            "or use --launcher.cluster local (submitit's local jobs) or --launcher local")
    if name == "ray" and importlib.util.find_spec("ray") is None:
        raise UserError("launcher ray needs Ray: pip install 'immunize[cluster]' (or pip install ray)")


def check_config(b: BenchConfig) -> None:
    """Checks that need no imports beyond the config itself."""
    check_counts(b)
    check_out(b)
    check_launcher(b)  # launcher, progress, wandb.mode, attack modes and optimizers: their types (schema) reject a bad choice
    if b.trainer.threads is not None and b.trainer.threads < 1:
        raise UserError(f"trainer.threads must be >= 1 or null, got {b.trainer.threads}")
    src = b.model.source
    if not src:
        raise UserError("model.source is empty; give toy:<preset>, a hub id or a local model directory")
    if not src.startswith("toy:") and _looks_local(src) and not os.path.isdir(src):
        raise UserError(f"model.source {src!r} does not exist; give an existing model directory, a hub id "
                        "(org/name) or toy:<preset>")
    if b.model.gguf_file and os.path.isdir(src) and not os.path.isfile(os.path.join(src, b.model.gguf_file)):
        raise UserError(f"model.gguf_file {b.model.gguf_file!r} not found in {src!r}")
    if not b.defenses:
        raise UserError("defenses is empty; give at least one (e.g. --defenses '[{name: undefended}]')")
    _unique([d.name for d in b.defenses], "defenses")
    for d in b.defenses:
        if d.callbacks:
            raise UserError(f"defense {d.name!r}: callbacks belong to fine-tuning-stage defenses (finetune.defenses); "
                            "put alignment-stage callbacks under trainer.callbacks")
    if b.attack is not None:
        a = b.attack
        for axis in ("lrs", "samples", "modes", "optimizers"):
            values = getattr(a, axis)
            if values is not None and len(values) == 0:
                raise UserError(f"attack.{axis} is empty, so the attack grid has no cells; give at least one value "
                                f"or null for the config's own (e.g. --attack.{axis} '[...]')")
        for lr in a.lrs:
            if not (lr > 0 and math.isfinite(lr)):
                raise UserError(f"attack.lrs: learning rate must be > 0, got {lr}")
        for n in a.samples or []:
            if n < 1:
                raise UserError(f"attack.samples: number of harmful samples must be >= 1, got {n}")
        check_attack_kinds(a)
    for d in b.defenses:
        check_attacked_on(d, b)
    if b.finetune is not None:
        f = b.finetune
        if not f.defenses:
            raise UserError("finetune.defenses is empty; give at least one (e.g. [{name: sft}]) or set finetune: null")
        _unique([d.name for d in f.defenses], "finetune.defenses")
        if not f.ratios:
            raise UserError("finetune.ratios is empty; give at least one harmful ratio p (e.g. [0.1])")
        for p in f.ratios:
            if not 0.0 <= p <= 1.0:
                raise UserError(f"finetune.ratios: harmful ratio p must be in [0, 1], got {p}")
    if not b.heldout_categories:
        raise UserError("heldout_categories is empty; the generalization condition needs at least one held-out category")


ATTACKED_ON_AXES = ("lrs", "loss_on", "data_from")


def check_attack_kinds(a) -> None:
    """attack.kinds and attack.jailbreak_formats name known kinds and formats; ablation and identity_shift are
    mappings."""
    from immunize.bench.schema import ATTACK_KINDS, JAILBREAK_FORMAT_NAMES

    for what, values, choices in (("kinds", a.kinds, ATTACK_KINDS),
                                  ("jailbreak_formats", a.jailbreak_formats, JAILBREAK_FORMAT_NAMES)):
        if not isinstance(values, list) or not values:
            raise UserError(f"attack.{what} must be a non-empty list of {', '.join(choices)}, got {values!r}")
        for value in values:
            if value not in choices:
                raise UserError(f"attack.{what}: unknown value {value!r}; choose from {', '.join(choices)}")
        if len(set(values)) != len(values):
            raise UserError(f"attack.{what} {values} repeats a value")
    for what in ("ablation", "identity_shift"):
        if not isinstance(getattr(a, what), dict):
            raise UserError(f"attack.{what} must be a mapping of init_args, got {getattr(a, what)!r}")


def check_attacked_on(d, b: BenchConfig) -> None:
    """A defense's attacked_on names axes of the attack grid and values the grid has."""
    if d.attacked_on is None:
        return
    if b.attack is None:
        raise UserError(f"defense {d.name!r}: attacked_on needs an attack grid; remove it or give attack")
    parts = d.attacked_on if isinstance(d.attacked_on, list) else [d.attacked_on]
    if not parts or not all(isinstance(part, dict) for part in parts):
        raise UserError(f"defense {d.name!r}: attacked_on must be a mapping {{axis: [values]}} over "
                        f"{', '.join(ATTACKED_ON_AXES)} (or a list of them), got {d.attacked_on!r}")
    for part in parts:
        for axis, values in part.items():
            if axis not in ATTACKED_ON_AXES:
                raise UserError(f"defense {d.name!r}: attacked_on axis {axis!r} is not one of "
                                f"{', '.join(ATTACKED_ON_AXES)}")
            grid = getattr(b.attack, axis)
            if not isinstance(values, list) or not values or any(v not in grid for v in values):
                raise UserError(f"defense {d.name!r}: attacked_on.{axis} must be a non-empty list of attack.{axis} "
                                f"values {grid}, got {values!r}")


# ----- class paths and their arguments -------------------------------------------------------------
def import_class(class_path: str, what: str):
    module_name, _, attr = class_path.rpartition(".")
    if not module_name:
        raise UserError(f"{what}: class_path {class_path!r} must be module.Class (e.g. immunize.lightning_modules.SEAM)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"{what}: cannot import {class_path!r} ({err})") from err
    if not hasattr(module, attr):
        raise UserError(f"{what}: cannot import {class_path!r}: module {module_name!r} has no {attr!r}")
    return getattr(module, attr)


def accepted_arguments(cls) -> set[str]:
    """Constructor argument names of cls, following **kwargs up the class hierarchy to the framework base."""
    names: set[str] = set()
    for klass in inspect.getmro(cls):
        if klass is object or klass.__module__.split(".")[0] in ("lightning", "pytorch_lightning", "torch", "builtins"):
            break
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def check_component(spec: Any, what: str) -> None:
    """A {class_path, init_args} dict: the class imports and takes every init_args key."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise UserError(f"{what}: expected a mapping with class_path (and init_args), got {spec!r}")
    cls = import_class(spec["class_path"], what)
    args = spec.get("init_args") or {}
    accepted = accepted_arguments(cls)
    for key in args:
        if key not in accepted:
            raise UserError(f"{what}: {spec['class_path']} has no argument {key!r}; it takes {sorted(accepted)}")


def check_trainer(trainer: dict, what: str) -> None:
    from lightning.pytorch import Trainer

    accepted = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    for key in trainer:
        if key not in accepted:
            raise UserError(f"{what}: trainer has no setting {key!r} (see `immunize fit --help`)")
    callbacks = trainer.get("callbacks") or []
    for i, cb in enumerate(callbacks if isinstance(callbacks, list) else [callbacks]):
        check_component(cb, f"{what}: trainer.callbacks[{i}]")


def check_model_values(spec: dict, what: str) -> None:
    """The counts, learning rate and schedule values of a CausalLMModule section (its constructor's checks, without
    loading the model)."""
    from immunize.lightning_modules.causal_lm import CausalLMModule, check_module_args
    from immunize.lightning_modules.modeling.optim import check_training_args

    cls = import_class(spec["class_path"], what)
    if not (inspect.isclass(cls) and issubclass(cls, CausalLMModule)):
        return
    accepted = {"max_new_tokens", "diagnostic_items", *inspect.signature(check_training_args).parameters}
    args = {k: v for k, v in (spec.get("init_args") or {}).items() if k in accepted}
    try:
        check_module_args(**args)
    except UserError as err:
        raise UserError(f"{what}: {err}") from err


def check_built(spec: dict, what: str, cache: dict) -> None:
    """Build a datamodule or a callback from its section as `immunize fit` would (jsonargparse; constructors only:
    no data is read, no model loaded), so its constructor's checks (sizes, counts, steps, ratios, a mix whose
    rounding empties a part) run now, before any cell."""
    import json

    key = json.dumps(spec, sort_keys=True, default=str)
    if key in cache:
        return
    cache[key] = True
    from jsonargparse import ArgumentParser

    cls = import_class(spec["class_path"], what)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--component", type=cls)
    try:
        parser.instantiate_classes(parser.parse_object({"component": copy.deepcopy(spec)}))  # the cell's own stays
    except UserError as err:
        raise UserError(f"{what}: {err}") from err
    except Exception as err:  # noqa: BLE001 - jsonargparse reports a bad type or value here
        from immunize.errors import find_user_error, summarize_parser_error

        found = find_user_error(err)
        raise UserError(f"{what}: {found if found is not None else summarize_parser_error(str(err))}") from err


def check_cells(plan, bench: BenchConfig) -> None:
    """Import every class the cells name and check their arguments and values (each distinct config once)."""
    from immunize.cli import check_trainer_counts

    seen: set[str] = set()
    built: dict = {}
    for cell in plan.cells:
        if cell.digest in seen or cell.kind == "judge":  # a judge cell's spec was checked when it was planned
            continue
        seen.add(cell.digest)
        check_component(cell.config.get("model"), f"{cell.label}: model")
        check_model_values(cell.config["model"], f"{cell.label}: model")
        if cell.config.get("data") is not None:
            check_component(cell.config["data"], f"{cell.label}: data")
            check_built(cell.config["data"], f"{cell.label}: data", built)
        check_trainer(cell.config.get("trainer") or {}, cell.label)
        callbacks = (cell.config.get("trainer") or {}).get("callbacks") or []
        for i, cb in enumerate(callbacks if isinstance(callbacks, list) else [callbacks]):
            check_built(cb, f"{cell.label}: trainer.callbacks[{i}]", built)
        try:
            check_trainer_counts(cell.config.get("trainer"))
        except UserError as err:
            raise UserError(f"{cell.label}: {err}") from err
    from immunize.bench.heldout import check_heldout

    check_heldout(bench.heldout_categories, [cell.config for cell in plan.evals])


def validate(bench: BenchConfig, transform=None):
    """All checks; returns the plan (building it reads and checks every stage config; `transform` rewrites each
    cell's config, as --shrink does)."""
    from immunize.bench.planner import build_plan

    check_config(bench)
    plan = build_plan(bench, transform)
    check_cells(plan, bench)
    if bench.attack is not None and bench.attack.search is not None:
        from immunize.bench.search import check_search

        check_search(bench.attack.search, list(plan.planner.models[bench.seeds[0]]))
    if bench.eval.lm_eval is not None:  # unknown keys or task names (and a missing eval extra) fail before any fit
        from immunize.lightning_modules.evaluation.lm_eval_bridge import check_lm_eval_spec, resolve_tasks

        spec = check_lm_eval_spec(bench.eval.lm_eval)
        resolve_tasks(spec["tasks"], spec["include_path"])
    if not 0.0 <= bench.report.capability_bound < 1.0:
        raise UserError(f"report.capability_bound must be in [0, 1) (a relative capability drop), got "
                        f"{bench.report.capability_bound}")
    return plan
