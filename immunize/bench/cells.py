"""A cell: one stage run with one config, in its own directory named by a hash of that config.

The hash covers the cell's full semantic config, the toy world's code (world_fingerprint) and, in place of its
input model path, the hash of the cell that produced that model (or the model source itself), so a changed
upstream stage changes every downstream hash, and the same stage in another bench (or a rerun) finds the same
directory.

Layout of a cell directory:
    cell.yaml         the generated `immunize fit|test` config (absolute paths)
    log.txt           the subprocess output
    model/            fits: the exported model; model/stage.json is the completion marker
    model_removed.json  fits under keep_models: false, once the model was removed (its size; also a marker)
    metrics.json      tests: the completion marker (written atomically, after generations.jsonl)
    judged/           judge cells (another judge on an eval cell's generations, immunize.bench.judging): the
                      `immunize judges` outputs; judged/agreement.json is the completion marker
    train.json        fits: steps and epochs (written by the recorder callback at train end)
    run.json          wall time of the subprocess (written after it exits successfully)
"""
from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

import immunize.datamodules.toy
from immunize.fingerprint import COMPUTATION_VERSIONS, computation_versions, input_digests, path_digest  # noqa: F401

FORMAT = 2  # bump when what a cell computes from the same config changes
MODEL_KEY = "model.init_args.model"
MARKERS = {"fit": "model/stage.json", "test": "metrics.json", "judge": "judged/agreement.json"}
REMOVED_MODEL = "model_removed.json"  # a fit whose model keep_models: false removed (immunize.bench.disk) is finished
CELL_REF = "cell:"  # a callback argument "cell:<cell name>" is that cell's exported model, its path set at run time


@dataclass(eq=False)
class Cell:
    """kind: "fit", "test" or "judge"; stage: pretrain|align|defense|attack|benign|finetune|eval|judge.

    config: the stage config without its input model (set at run time); input: the Cell whose exported
    model this cell reads, or a model source string (toy:<preset>, hub id, local directory); a judge cell's input
    is the eval cell whose generations it scores.
    """

    kind: str
    stage: str
    label: str
    config: dict
    input: Union["Cell", str]
    meta: dict = field(default_factory=dict)
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = cell_digest(self.kind, self.stage, self.config, self.input)

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.digest}"

    def directory(self, cells_dir: Path) -> Path:
        return Path(cells_dir) / self.name

    def marker(self, cells_dir: Path) -> Path:
        return self.directory(cells_dir) / MARKERS[self.kind]

    def is_done(self, cells_dir: Path) -> bool:
        """Its marker exists (a fit whose model was removed after its readers finished counts as done)."""
        return self.marker(cells_dir).is_file() or (
            self.kind == "fit" and (self.directory(cells_dir) / REMOVED_MODEL).is_file())

    def input_path(self, cells_dir: Path) -> str:
        """The model this cell reads: the exported model of its input cell, or the source itself."""
        if isinstance(self.input, Cell):
            return str(self.input.directory(cells_dir) / "model")
        return self.input

    @property
    def fit_input(self) -> Optional["Cell"]:
        return self.input if isinstance(self.input, Cell) else None


def cell_ref(cell: Cell) -> str:
    """How a cell config names another cell's exported model (e.g. SafeLoRA's base_model): by the cell's name, which
    holds its digest, so the referring cell's digest follows it; `resolve_cell_refs` puts in the path at run time."""
    return f"{CELL_REF}{cell.name}"


def resolve_cell_refs(cfg: dict, cells_dir: Path) -> None:
    """Replace every "cell:<name>" argument of the config's trainer callbacks by that cell's model directory."""
    callbacks = (cfg.get("trainer") or {}).get("callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        args = cb.get("init_args") if isinstance(cb, dict) else None
        for key, value in (args or {}).items():
            if isinstance(value, str) and value.startswith(CELL_REF):
                args[key] = str(Path(cells_dir) / value[len(CELL_REF):] / "model")


def source_fingerprint(source: str) -> str:
    """What identifies a model source in a hash: a toy preset or hub id as is; a local directory by its absolute
    path and the content of its files (immunize.fingerprint: a re-export with other weights changes it, a copy
    with the same bytes does not)."""
    path = Path(source).expanduser()
    if source.startswith("toy:") or not path.is_dir():
        return source
    return json.dumps([str(path.resolve()), path_digest(path)])


@lru_cache(maxsize=1)
def world_fingerprint() -> str:
    """A hash of the toy world's source files: the data every toy cell trains or is evaluated on is a function of
    them, so a changed world changes every digest (instead of reusing cells made from other data)."""
    folder = Path(immunize.datamodules.toy.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + world_source(path))
    return digest.hexdigest()[:12]


def world_source(path: Path) -> bytes:
    """A toy-world module's bytes as the fingerprint reads them: the `immunize.` prefix of its imports dropped and a
    module that holds only a docstring counted as empty. Moving the world into the immunize namespace and documenting
    its package changed neither what it generates nor the names of the cells computed from it."""
    text = path.read_text()
    tree = ast.parse(text)
    if len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant):
        return b""
    return re.sub(r"\bimmunize\.(?=(datamodules|lightning_modules|callbacks)\b)", "", text).encode()


_NAMESPACED = re.compile(r"^immunize\.(lightning_modules|datamodules|callbacks)\.")


def canonical_class_paths(config: Any) -> Any:
    """The config with every class_path of the three class packages in one spelling, `lightning_modules.SEAM`, the
    name they had before they moved into the immunize namespace: a cell's name depends on what it computes, not on
    how its config spells a class (and cells computed before the move keep their names)."""
    if isinstance(config, dict):
        return {k: (_NAMESPACED.sub(r"\1.", v) if k == "class_path" and isinstance(v, str) else canonical_class_paths(v))
                for k, v in config.items()}
    if isinstance(config, list):
        return [canonical_class_paths(v) for v in config]
    return config


def cell_digest(kind: str, stage: str, config: dict, input: Union[Cell, str]) -> str:
    """The cell's name: a hash of its config, its input model (upstream cell or source), the toy world's code and
    the content of the files its config names (data files, include paths; immunize.fingerprint), so a changed data
    file reruns the cell and everything downstream of it."""
    upstream = f"cell:{input.digest}" if isinstance(input, Cell) else f"source:{source_fingerprint(input)}"
    payload = {"format": FORMAT, "world": world_fingerprint(), "kind": kind, "stage": stage, "input": upstream,
               "config": canonical_class_paths(config)}
    inputs = input_digests(config)
    if inputs:  # only when the config names files, so the toy world's cells keep their names
        payload["inputs"] = inputs
    versions = computation_versions(config)
    if versions:  # only for cells whose computation changed since their name was first computed
        payload["computations"] = versions
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def read_json(path: Path) -> Optional[dict]:
    """A JSON file's content, or None when it is missing or unreadable (e.g. cut off by a crash)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def cell_jsonl(cell: Cell, cells_dir: Path, name: str) -> Optional[list[dict]]:
    """The rows of the first file called `name` under the cell's folder, or None when there is none."""
    path = next(iter(sorted(cell.directory(cells_dir).rglob(name))), None)
    if path is None:
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_items(cell: Cell, cells_dir: Path) -> Optional[list[dict]]:
    """An eval cell's per-item rows (generations.jsonl), sorted by (kind, prompt) so seeds line up."""
    rows = cell_jsonl(cell, cells_dir, "generations.jsonl")
    return None if rows is None else sorted(rows, key=lambda r: (r["kind"], r["prompt"]))


def cell_info(cell: Cell, cells_dir: Path) -> dict:
    """Steps and wall time recorded for a finished cell (None where not recorded)."""
    d = cell.directory(cells_dir)
    run = read_json(d / "run.json") or {}
    train = read_json(d / "train.json") or {}
    return {"steps": train.get("steps"), "wall_time_s": run.get("wall_time_s")}


def metrics_rows(path: Path) -> list[dict]:
    """The rows of a Lightning CSVLogger file (a fit cell's csv/metrics.csv) as dicts of strings; [] when missing."""
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


TRAIN_SUMMARY = ("train/sd_share", "train/est_norm", "train/cos_ab", "train/bf16_unmoved_share")


def train_means(directory: Path) -> dict:
    """The mean over logged steps of each TRAIN_SUMMARY column in a fit cell's csv/metrics.csv (SEAM's gradient
    share and estimate norm), keyed without "train/"; {} when the cell logged none."""
    rows = metrics_rows(Path(directory) / "csv" / "metrics.csv")
    out = {}
    for column in TRAIN_SUMMARY:
        values = [float(r[column]) for r in rows if r.get(column) not in (None, "")]
        values = [v for v in values if math.isfinite(v)]
        if values:
            out[column[len("train/"):]] = sum(values) / len(values)
    return out


def cell_state(cell: Cell, cells_dir: Path) -> str:
    """"done" (its marker exists), "incomplete" (a run started and did not finish: killed or failed) or "todo"."""
    if cell.is_done(cells_dir):
        return "done"
    return "incomplete" if cell.directory(cells_dir).is_dir() else "todo"


def cell_resources(cell: Cell, threads: Optional[int] = None) -> dict:
    """What running the cell takes, from its trainer section: accelerator, devices, nodes, strategy, CPU threads."""
    trainer = cell.config.get("trainer") or {}
    return {"accelerator": trainer.get("accelerator", "auto"), "devices": trainer.get("devices", 1),
            "num_nodes": trainer.get("num_nodes", 1), "strategy": trainer.get("strategy", "auto"), "threads": threads}


def plan_graph(cells: list[Cell], cells_dir: Path, threads: Optional[int] = None) -> list[dict]:
    """The plan as data: one row per cell in run order, with the cells it needs, its state and its resources
    (any launcher executes this graph)."""
    return [{"cell": c.name, "label": c.label, "kind": c.kind, "stage": c.stage,
             "needs": [c.fit_input.name] if c.fit_input is not None else [], "state": cell_state(c, cells_dir),
             "resources": cell_resources(c, threads)} for c in cells]
