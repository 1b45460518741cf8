"""Checks that run before any training; each failure is one UserError line.

Cheap checks first (grid, learning rates, paths), so a typo fails in a second; then the plan is built
(stage config files are read) and every class path the cells name is imported and its init_args keys
are checked against the constructor, so an unknown defense or a misspelt key fails before the first fit.
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
from typing import Any

from immunize.bench.schema import ATTACK_MODES, LAUNCHERS, PROGRESS_MODES, BenchConfig
from immunize.errors import UserError

WANDB_MODES = ("offline", "online", "disabled")


def _looks_local(source: str) -> bool:
    """As lightning_modules.model_loading: a path unless it reads like a hub id "org/name"."""
    return os.path.isabs(source) or source.startswith(".") or os.path.exists(source) or source.count("/") != 1


def _unique(names: list[str], what: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise UserError(f"{what}: defense name {name!r} appears twice; names must be unique")
        seen.add(name)


def check_config(b: BenchConfig) -> None:
    """Checks that need no imports beyond the config itself."""
    if b.launcher.name not in LAUNCHERS:
        raise UserError(f"launcher must be one of {list(LAUNCHERS)}, got {b.launcher.name!r}")
    if b.launcher.name == "slurm" and b.launcher.cluster not in ("slurm", "local", "debug"):
        raise UserError(f"launcher.cluster must be slurm, local or debug, got {b.launcher.cluster!r}")
    if b.progress not in PROGRESS_MODES:
        raise UserError(f"progress must be one of {list(PROGRESS_MODES)}, got {b.progress!r}")
    if b.wandb.mode not in WANDB_MODES:
        raise UserError(f"wandb.mode must be one of {list(WANDB_MODES)}, got {b.wandb.mode!r}")
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
        if d.init_from not in ("aligned", "base"):
            raise UserError(f"defense {d.name!r}: init_from must be 'aligned' or 'base', got {d.init_from!r}")
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
        for mode in a.modes:
            if mode not in ATTACK_MODES:
                raise UserError(f"attack.modes: unknown mode {mode!r}; choose from {list(ATTACK_MODES)}")
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


# ----- class paths and their arguments -------------------------------------------------------------
def import_class(class_path: str, what: str):
    module_name, _, attr = class_path.rpartition(".")
    if not module_name:
        raise UserError(f"{what}: class_path {class_path!r} must be module.Class (e.g. lightning_modules.SEAM)")
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


def check_cells(plan, bench: BenchConfig) -> None:
    """Import every class the cells name and check their arguments (each distinct config once)."""
    seen: set[str] = set()
    for cell in plan.cells:
        if cell.digest in seen:
            continue
        seen.add(cell.digest)
        check_component(cell.config.get("model"), f"{cell.label}: model")
        if cell.config.get("data") is not None:
            check_component(cell.config["data"], f"{cell.label}: data")
        check_trainer(cell.config.get("trainer") or {}, cell.label)
    if bench.attack is not None and bench.attack.optimizers:
        from lightning_modules.optim import OPTIMIZERS

        for name in bench.attack.optimizers:
            if name not in OPTIMIZERS:
                raise UserError(f"attack.optimizers: unknown optimizer {name!r}; choose from {list(OPTIMIZERS)}")
    from datamodules.toy import lexicon

    for cat in bench.heldout_categories:
        if cat not in lexicon.CATEGORIES:
            raise UserError(f"heldout_categories: unknown category {cat!r}; choose from {list(lexicon.CATEGORIES)}")


def validate(bench: BenchConfig):
    """All checks; returns the plan (building it reads and checks every stage config)."""
    from immunize.bench.planner import build_plan

    check_config(bench)
    plan = build_plan(bench)
    check_cells(plan, bench)
    if bench.attack is not None and bench.attack.search is not None:
        from immunize.bench.search import check_search

        check_search(bench.attack.search, list(plan.planner.models[bench.seeds[0]]))
    if bench.eval.lm_eval is not None:  # unknown keys or task names (and a missing eval extra) fail before any fit
        from lightning_modules.lm_eval_bridge import check_lm_eval_spec, resolve_tasks

        spec = check_lm_eval_spec(bench.eval.lm_eval)
        resolve_tasks(spec["tasks"], spec["include_path"])
    if not 0.0 <= bench.report.capability_bound < 1.0:
        raise UserError(f"report.capability_bound must be in [0, 1) (a relative capability drop), got "
                        f"{bench.report.capability_bound}")
    return plan
