"""Several judges on every evaluated model: the bench's `eval.judges`.

The field has learned that one judge can make the same model read broken or robust, so the bench can score each
eval cell's generations with more judges than the one `immunize test` used (eval.judge) and report them side by
side with their agreement (immunize.bench.judge_results).

Each (eval cell, judge) is a "judge" cell: its input is the eval cell, its config the judge's spec, its run
`immunize judges <eval cell>/generations.jsonl --judge SPEC --out <cell>/judged` (immunize.judges.command), its
marker judged/agreement.json. So a judge's scores are cached per evaluated model and keyed like every cell: adding a
judge runs only its cells, a retrained model or a changed judge model (its local files) runs them again, and every
launcher runs them as it runs other cells (on the eval's accelerator).

A spec is a judge name or a mapping {name: ..., label: ..., **arguments} as `immunize judges --judge` takes it. When
the evaluation runs on a GPU, a judge that takes a device and does not set one gets "cuda", and bfloat16 when the
trainer runs bf16, as `immunize test` places its own judge (CausalLMModule.judge_placement).
"""
from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any, Optional

from immunize.bench.cells import Cell, read_json
from immunize.errors import UserError

KIND = "judge"
OUT = "judged"  # the cell's `immunize judges --out`
MARKER = f"{OUT}/agreement.json"
GPU_ACCELERATORS = ("gpu", "cuda")


def eval_judge_label(eval_cfg: dict) -> str:
    """The name the eval's own judge (eval.judge, else the eval config's) has in the tables: "<name> (eval)"."""
    spec = ((eval_cfg.get("model") or {}).get("init_args") or {}).get("judge")
    name = spec.get("name") if isinstance(spec, dict) else spec
    return f"{name or 'judge'} (eval)"


def judge_specs(judges: Optional[list], threshold: float) -> list[tuple[str, Any]]:
    """(label, spec) per entry of eval.judges, checked: known names, unique labels, a threshold in (0, 1]; a one-line
    UserError naming the entry otherwise."""
    from immunize.judges import known_judges

    if not judges:
        return []
    if not isinstance(judges, list):
        raise UserError(f"eval.judges must be a list of judges (names or {{name: ..., label: ...}}), got {judges!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise UserError(f"eval.judge_threshold must be a number in (0, 1], got {threshold!r}")
    out: list[tuple[str, Any]] = []
    for i, spec in enumerate(judges):
        where = f"eval.judges[{i}]"
        if isinstance(spec, dict):
            spec = copy.deepcopy(spec)
            name = spec.get("name")
            label = str(spec.pop("label", name))
        elif isinstance(spec, str):
            name = label = spec
        else:
            raise UserError(f"{where} must be a judge name or a mapping with a 'name', got {spec!r}")
        if name not in known_judges():
            raise UserError(f"{where}: unknown judge {name!r}; use one of {known_judges()}")
        if label in (l for l, _ in out) or label.endswith(" (eval)"):
            raise UserError(f"{where}: label {label!r} is taken; give each judge its own 'label'")
        if isinstance(spec, dict):
            check_arguments(spec, where)
        out.append((label, spec))
    return out


def check_arguments(spec: dict, where: str) -> None:
    """Every key of a judge spec is an argument of its judge (where the judge's signature lists them), so a typo fails
    before the bench runs rather than in its first judge cell."""
    from immunize.judges.base import _REGISTRY

    factory = _REGISTRY[spec["name"]]
    target = factory.judge_class() if hasattr(factory, "judge_class") else factory
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(spec) - {"name"} - set(params))
    if unknown:
        known = sorted(n for n in params if n != "self")
        raise UserError(f"{where}: judge {spec['name']!r} takes no argument {unknown[0]!r}; it takes {known}")


def placed(spec: Any, eval_cfg: dict) -> Any:
    """The spec with the eval's device and dtype where the judge takes them and does not set them (GPU evals only:
    on a CPU the judges' own default, the CPU in float32, is what `immunize test` would use too)."""
    from immunize.judges.base import _REGISTRY, accepts

    trainer = eval_cfg.get("trainer") or {}
    if str(trainer.get("accelerator", "")).lower() not in GPU_ACCELERATORS:
        return spec
    full = {"name": spec} if isinstance(spec, str) else dict(spec)
    factory = _REGISTRY[full["name"]]
    bf16 = str(trainer.get("precision", "")).startswith("bf16")
    added = {key: value for key, value in (("device", "cuda"), ("dtype", "bfloat16" if bf16 else None))
             if value is not None and key not in full and accepts(factory, key)}
    return {**full, **added} if added else spec


def judge_cell(evaluated: Cell, label: str, spec: Any, threshold: float) -> Cell:
    """The judge cell of one eval cell and one judge."""
    from immunize.judges.command import JUDGES_CODE_VERSION

    trainer = evaluated.config.get("trainer") or {}
    config = {"judge": placed(spec, evaluated.config), "label": label, "threshold": threshold,
              "code_version": JUDGES_CODE_VERSION,  # the judges' prompts, parsers and scoring
              "trainer": {"accelerator": trainer.get("accelerator", "auto"), "devices": 1}}  # where a launcher puts it
    return Cell(KIND, KIND, f"judge {label}: {evaluated.label}", config, evaluated,
                {**evaluated.meta, "judge": label, "eval_cell": evaluated.name})


def judge_argv(cell: Cell, cells_dir: Path) -> list[str]:
    """The `immunize judges` command line of a judge cell."""
    spec = cell.config["judge"]
    spec = {**spec, "label": cell.config["label"]} if isinstance(spec, dict) else {"name": spec,
                                                                                    "label": cell.config["label"]}
    generations = cell.input.directory(cells_dir).resolve() / "generations.jsonl"
    return ["judges", str(generations), "--judge", json.dumps(spec), "--out",
            str(cell.directory(cells_dir).resolve() / OUT), "--threshold", str(cell.config["threshold"])]


def judged_scores(cell: Cell, cells_dir: Path) -> Optional[dict[tuple[str, str], Optional[float]]]:
    """{(prompt, answer): score or None (unparseable)} of a finished judge cell, or None when it has not finished."""
    d = cell.directory(cells_dir) / OUT
    if read_json(d / "agreement.json") is None:
        return None
    label = cell.config["label"]
    out = {}
    for line in (d / "judge_scores.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[(row["prompt"], row["answer"])] = row["scores"].get(label)
    return out


def summary(cell: Cell, cells_dir: Path) -> str:
    """The bench's one-line summary of a finished judge cell: the judge's harmful score of that model."""
    result = read_json(cell.directory(cells_dir) / MARKER) or {}
    mean = ((result.get("judges") or {}).get(cell.config["label"]) or {}).get("mean_score")
    return f"{cell.config['label']}: harmful {mean:.1f}%" if mean is not None else ""
