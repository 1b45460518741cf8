"""The attacker that searches (attack.search): an Optuna study per (defense, seed) over the attack's hyper-parameters.

Each trial is an ordinary attack fit and eval cell of the bench (cached by its config digest, so a trial that
repeats a grid point or an earlier trial costs nothing). Objective: the harmful score, maximised subject to the
capability bound (the attacked model keeps at least (1 - report.capability_bound) x the defended model's
capability); TPE takes the bound as its constraint, so it learns where the feasible attacks are. The study is
stored in OUT/search.db (SQLite): a rerun loads it, re-asks the trials a killed run left running (their cells
are reused if they finished) and runs only the trials still missing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from immunize.bench.cells import Cell, read_json
from immunize.bench.schema import SEARCH_AXES, SEARCH_SAMPLERS, AttackSearch
from immunize.errors import UserError

INT_AXES = ("samples", "steps", "batch_size", "lora_rank")
RANGE_SCALES = ("log", "linear")
STUDY_FILE = "search.db"


@dataclass
class Axis:
    """One searched axis: a range (lo, hi, log) or a choice among `choices`."""

    name: str
    choices: Optional[list] = None
    lo: Optional[float] = None
    hi: Optional[float] = None
    log: bool = False


def parse_space(space: dict) -> list[Axis]:
    """attack.search.space -> axes; unknown axes, empty lists and bad ranges are UserErrors."""
    if not isinstance(space, dict) or not space:
        raise UserError("attack.search.space is empty; give at least one axis, e.g. {lr: [1e-5, 1e-2, log]}")
    axes = []
    for name, values in space.items():
        if name not in SEARCH_AXES:
            raise UserError(f"attack.search.space: unknown axis {name!r}; choose from {list(SEARCH_AXES)}")
        if not isinstance(values, (list, tuple)) or not values:
            raise UserError(f"attack.search.space.{name}: give a list: [lo, hi, log|linear] or the values to choose from")
        if len(values) == 3 and values[2] in RANGE_SCALES:
            lo, hi = values[0], values[1]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not lo < hi:
                raise UserError(f"attack.search.space.{name}: a range needs numbers lo < hi, got {list(values)}")
            if values[2] == "log" and lo <= 0:
                raise UserError(f"attack.search.space.{name}: a log range needs lo > 0, got {lo}")
            axes.append(Axis(name, lo=lo, hi=hi, log=values[2] == "log"))
        else:
            axes.append(Axis(name, choices=list(values)))
    return axes


def check_axis_values(axis: Axis) -> None:
    """Every value an axis can take is a valid attack setting: lr > 0; samples, steps, batch_size, lora_rank
    integers >= 1; optimizer, mode, kind and jailbreak_format among the known names (a range only for number
    axes)."""
    from immunize.bench.schema import ATTACK_KINDS, ATTACK_MODES, JAILBREAK_FORMAT_NAMES
    from immunize.lightning_modules.modeling.optim import OPTIMIZERS

    where = f"attack.search.space.{axis.name}"
    values = axis.choices if axis.choices is not None else [axis.lo, axis.hi]
    names = {"optimizer": OPTIMIZERS, "mode": ATTACK_MODES, "kind": ATTACK_KINDS,
             "jailbreak_format": JAILBREAK_FORMAT_NAMES}.get(axis.name)
    if names is not None:
        if axis.choices is None:
            raise UserError(f"{where}: give the values to choose from ({list(names)}), not a range")
        bad = [v for v in values if v not in names]
        if bad:
            raise UserError(f"{where}: unknown value {bad[0]!r}; choose from {list(names)}")
        return
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if axis.name == "lr":
        bad = [v for v in values if not number(v) or v <= 0]
        if bad:
            raise UserError(f"{where}: learning rates must be numbers > 0, got {bad[0]!r}")
    elif axis.name in INT_AXES:
        bad = [v for v in values if not number(v) or v < 1 or (axis.choices is not None and int(v) != v)]
        if bad:
            raise UserError(f"{where}: values must be integers >= 1, got {bad[0]!r}")


def check_search(search: AttackSearch, defenses: list[str]) -> None:
    """Every config error of attack.search, before anything runs."""
    if search.sampler not in SEARCH_SAMPLERS:
        raise UserError(f"attack.search.sampler: unknown sampler {search.sampler!r}; choose from {list(SEARCH_SAMPLERS)}")
    if isinstance(search.trials, bool) or not isinstance(search.trials, int) or search.trials < 1:
        raise UserError(f"attack.search.trials must be an integer >= 1, got {search.trials!r}")
    for axis in parse_space(search.space):
        check_axis_values(axis)
    unknown = [d for d in (search.defenses or []) if d not in defenses]
    if unknown:
        raise UserError(f"attack.search.defenses: {unknown[0]!r} is not one of the bench's defenses {defenses}")
    try:
        import optuna  # noqa: F401
    except ImportError as err:
        raise UserError("attack.search needs Optuna: pip install 'immunize[search]' (or pip install optuna)") from err


def suggest(trial, axes: list[Axis]) -> dict:
    """The trial's attack point: one value per axis (integer axes stay integers)."""
    point = {}
    for a in axes:
        if a.choices is not None:
            point[a.name] = trial.suggest_categorical(a.name, a.choices)
        elif a.name in INT_AXES:
            point[a.name] = trial.suggest_int(a.name, int(a.lo), int(a.hi), log=a.log)
        else:
            point[a.name] = trial.suggest_float(a.name, float(a.lo), float(a.hi), log=a.log)
    return point


def within_bound(capability: Optional[float], before: Optional[float], bound: float) -> bool:
    """Whether an attacked model kept at least (1 - bound) x the defended model's capability."""
    return capability is not None and before is not None and capability >= (1.0 - bound) * before


def startup_trials(trials: int) -> int:
    """Random trials before TPE models the results: a quarter of the budget, at least 3 (fixed before any run)."""
    return max(3, trials // 4)


def make_sampler(search: AttackSearch):
    import optuna

    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=search.seed)
    kwargs = {} if hasattr(optuna.trial.Trial, "set_constraint") else {  # Optuna < 5: the constraint via a function
        "constraints_func": lambda t: [t.user_attrs.get("constraint", 1.0)]}
    return optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=startup_trials(search.trials), **kwargs)


def study_name(defense: str, seed: int) -> str:
    return f"attack {defense} seed={seed}"


def open_study(storage_path: Path, defense: str, seed: int, search: AttackSearch):
    """Create or load the study; trials a killed run left RUNNING are closed as failed and asked again."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_path.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=study_name(defense, seed), storage=f"sqlite:///{storage_path.resolve()}",
                                direction="maximize", sampler=make_sampler(search), load_if_exists=True)
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if t.params:
            study.enqueue_trial(dict(t.params))
    return study


def _metrics(cell: Cell, cells_dir: Path) -> dict:
    return read_json(cell.directory(cells_dir) / "metrics.json") or {}


def run_search(planner, cells_dir: Path, out: Path, bound: float, run_cells: Callable[[list[Cell]], Any]) -> dict:
    """Run (or resume) every study of attack.search; the trials' cells join the plan (stage "search").

    run_cells(cells) runs the cells that are not done (the bench's runner or launcher) and returns its counts
    {"run", "skipped"}; the sum over the trials run now is returned.
    """
    import optuna

    bench = planner.bench
    search = bench.attack.search
    axes = parse_space(search.space)
    counts = {"run": 0, "skipped": 0}
    for seed in bench.seeds:
        models = planner.models[seed]
        for defense in search.defenses or list(models):
            before_cell = next(c for c in planner.plan.evals if c.meta.get("stage") == "defended"
                               and c.meta.get("defense") == defense and c.meta.get("seed") == seed)
            before = _metrics(before_cell, cells_dir).get("capability")
            study = open_study(out / STUDY_FILE, defense, seed, search)
            complete = optuna.trial.TrialState.COMPLETE
            for t in study.get_trials(deepcopy=False, states=(complete,)):  # finished trials: cells into the plan
                planner.search_trial(seed, defense, {a.name: t.params[a.name] for a in axes}, t.number)
            while len(study.get_trials(deepcopy=False, states=(complete,))) < search.trials:
                trial = study.ask()
                point = suggest(trial, axes)
                cells = planner.search_trial(seed, defense, point, trial.number)
                try:
                    done = run_cells(list(cells))
                except KeyboardInterrupt:  # asked again on the rerun (its finished cells are reused)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    study.enqueue_trial(point)
                    raise
                except BaseException:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    raise
                m = _metrics(cells[1], cells_dir)
                hs, cap = m.get("harmful_score"), m.get("capability")
                if hs is None or cap is None or math.isnan(hs) or math.isnan(cap):
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    raise UserError(f"attack.search: trial {trial.number} on {defense!r} gave no harmful score or "
                                    f"capability (see {cells[1].directory(cells_dir)})")
                constraint = (1.0 - bound) * before - cap if before is not None else 0.0
                trial.set_user_attr("constraint", float(constraint))  # <= 0: within the capability bound
                if hasattr(trial, "set_constraint"):
                    trial.set_constraint("capability_bound", float(constraint))
                trial.set_user_attr("capability", float(cap))
                trial.set_user_attr("cells", [c.name for c in cells])
                study.tell(trial, float(hs))
                counts = {k: counts[k] + done.get(k, 0) for k in counts}
    return counts
