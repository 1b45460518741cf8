"""Several judges on every evaluated model: the bench's `eval.judges`.

The field has learned that one judge can make the same model read broken or robust, so the bench can score each
eval cell's generations with more judges than the one `immunize test` used (eval.judge) and report them side by
side with their agreement (immunize.bench.judge_results).

Each (eval cell, judge) is a "judge" cell: its input is the eval cell, its config the judge's spec, its run
`immunize judges <eval cell>/generations.jsonl --judge SPEC --out <cell>/judged` (immunize.judges.command), its
marker judged/agreement.json. So a judge's scores are cached per evaluated model and keyed like every cell: adding a
judge runs only its cells, a retrained model or a changed judge model (its local files) runs them again, and every
launcher runs them as it runs other cells (on the eval's accelerator; a judge without a model on the CPU). The
cell's name follows the judge's spec, not its label or the flag threshold (the report's). A judge cell records the
digest of the generations it scored (input.json): when its eval cell has been run again since, it is stale and
runs again; a killed judge cell resumes from `immunize judges`' per-answer cache.

A spec is a judge name or a mapping {name: ..., label: ..., **arguments} as `immunize judges --judge` takes it. A
judge that takes a device and a dtype and does not set them gets the eval's, as `immunize test` places its own judge
(CausalLMModule.judge_placement): "cuda" when the evaluation runs on a GPU, bfloat16 when it runs bf16.
"""
from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any, Optional

from immunize.bench.cells import Cell, read_json
from immunize.errors import UserError
from immunize.fingerprint import file_digest
from immunize.io import atomic_write_json

KIND = "judge"
OUT = "judged"  # the cell's `immunize judges --out`
MARKER = f"{OUT}/agreement.json"
INPUT = "input.json"  # the digest of the generations the cell scored
LABEL = "judge"  # the judge's name inside the cell's own files (the bench's label is the report's)
KEPT = f"{OUT}/scores"  # `immunize judges`' per-answer cache: kept when a killed judge cell runs again
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
        full = spec if isinstance(spec, dict) else {"name": spec}
        same = [l for l, other in out if (other if isinstance(other, dict) else {"name": other}) == full]
        if same:
            raise UserError(f"{where} is the same judge as {same[0]!r}; list each judge once")
        check_arguments(full, where)
        out.append((label, spec))
    return out


def check_arguments(spec: dict, where: str) -> None:
    """A judge spec gives what its judge needs (a preset's model) and nothing it does not take (where the judge's
    signature lists its arguments), so a gap or a typo fails before the bench runs rather than in a judge cell."""
    from immunize.judges.base import _REGISTRY

    factory = _REGISTRY[spec["name"]]
    target = factory.judge_class() if hasattr(factory, "judge_class") else factory
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(spec) - {"name"} - set(params))
        if unknown:
            known = sorted(n for n in params if n != "self")
            raise UserError(f"{where}: judge {spec['name']!r} takes no argument {unknown[0]!r}; it takes {known}")
    given = (set(spec) - {"name"}) | set(getattr(factory, "settings", None) or {})  # a preset fills its format in
    missing = [n for n, p in params.items() if n != "self" and p.default is p.empty and n not in given
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        example = getattr(factory, "example_model", "") if missing[0] == "model" else ""
        hint = f" (published: {example})" if example else ""
        raise UserError(f"{where}: judge {spec['name']!r} needs {missing[0]!r}{hint}; write it as {{name: "
                        f"{spec['name']}, {missing[0]}: ...}}")


def placed(spec: Any, eval_cfg: dict) -> Any:
    """The spec with the eval's device and dtype where the judge takes them and does not set them, as `immunize
    test` places its own judge: "cuda" on a GPU eval (on a CPU the judges' default device is the CPU already), and
    bfloat16 when the eval runs bf16."""
    from immunize.judges.base import _REGISTRY, accepts

    trainer = eval_cfg.get("trainer") or {}
    full = {"name": spec} if isinstance(spec, str) else dict(spec)
    factory = _REGISTRY[full["name"]]
    gpu = str(trainer.get("accelerator", "")).lower() in GPU_ACCELERATORS
    bf16 = str(trainer.get("precision", "")).startswith("bf16")
    added = {key: value for key, value in (("device", "cuda" if gpu else None), ("dtype", "bfloat16" if bf16 else None))
             if value is not None and key not in full and accepts(factory, key)}
    return {**full, **added} if added else spec


def judge_cell(evaluated: Cell, label: str, spec: Any) -> Cell:
    """The judge cell of one eval cell and one judge. Its name follows the judge's spec and the eval cell, not the
    label or the flag threshold (naming and flagging are the report's), so neither reruns a judge."""
    from immunize.judges.command import JUDGES_CODE_VERSION

    judge = placed(spec, evaluated.config)
    trainer = evaluated.config.get("trainer") or {}
    accelerator = trainer.get("accelerator", "auto") if takes_device(judge) else "cpu"  # a keyword judge needs no GPU
    config = {"judge": judge, "code_version": JUDGES_CODE_VERSION,  # the judges' prompts, parsers and scoring
              "trainer": {"accelerator": accelerator, "devices": 1}}  # where a launcher puts it
    return Cell(KIND, KIND, f"judge {label}: {evaluated.label}", config, evaluated,
                {**evaluated.meta, "judge": label, "eval_cell": evaluated.name})


def takes_device(spec: Any) -> bool:
    """Whether the judge runs a model (its class takes a device)."""
    from immunize.judges.base import _REGISTRY, accepts

    return accepts(_REGISTRY[spec["name"] if isinstance(spec, dict) else spec], "device")


def generations(cell: Cell, cells_dir: Path) -> Path:
    """The generations file a judge cell scores (its eval cell's)."""
    return cell.input.directory(cells_dir).resolve() / "generations.jsonl"


def judge_argv(cell: Cell, cells_dir: Path) -> list[str]:
    """The `immunize judges` command line of a judge cell (its spec as JSON, which `immunize judges` reads as is)."""
    spec = cell.config["judge"]
    spec = {**spec, "label": LABEL} if isinstance(spec, dict) else {"name": spec, "label": LABEL}
    return ["judges", str(generations(cell, cells_dir)), "--judge", json.dumps(spec), "--out",
            str(cell.directory(cells_dir).resolve() / OUT)]


def record_input(cell: Cell, cells_dir: Path) -> None:
    """After a judge cell ran: the digest of the generations it scored (a rerun eval cell makes it stale)."""
    digest = file_digest(generations(cell, cells_dir))
    atomic_write_json(cell.directory(cells_dir) / INPUT, {"generations_sha256": digest})


def is_stale(cell: Cell, cells_dir: Path) -> bool:
    """A finished judge cell whose eval cell has since written other generations (it was rerun)."""
    recorded = read_json(cell.directory(cells_dir) / INPUT)
    path = generations(cell, cells_dir)
    return recorded is not None and path.is_file() and recorded.get("generations_sha256") != file_digest(path)


def refresh(cells: list[Cell], cells_dir: Path) -> None:
    """Mark the stale judge cells among `cells` unfinished (their marker removed), so they run again."""
    for cell in cells:
        if cell.kind == KIND and cell.is_done(cells_dir) and is_stale(cell, cells_dir):
            cell.marker(cells_dir).unlink()


def judged_scores(cell: Cell, cells_dir: Path) -> Optional[dict[tuple[str, str], Optional[float]]]:
    """{(prompt, answer): score or None (unparseable)} of a finished, current judge cell; None otherwise."""
    d = cell.directory(cells_dir) / OUT
    if read_json(d / "agreement.json") is None or is_stale(cell, cells_dir):
        return None
    out = {}
    for line in (d / "judge_scores.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[(row["prompt"], row["answer"])] = row["scores"].get(LABEL)
    return out


def summary(cell: Cell, cells_dir: Path) -> str:
    """The bench's one-line summary of a finished judge cell: the judge's harmful score of that model."""
    result = read_json(cell.directory(cells_dir) / MARKER) or {}
    mean = ((result.get("judges") or {}).get(LABEL) or {}).get("mean_score")
    return f"{cell.meta['judge']}: harmful {mean:.1f}%" if mean is not None else ""
