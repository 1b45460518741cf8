"""Finished eval cells -> results.json: one entry per evaluated model, in plan order.

Entry: cell (the eval cell's directory name), model_cell, defense, stage ("defended": the defense's
model before any attack; "attack"; "benign": after the benign fine-tune; "finetune": a fine-tuning-
stage defense), attack {lr, samples, mode, optimizer} or null, finetune {ratio, model_from} or null,
harmful_score (%), harmful_scores {category: %}, capability (% mean benign task accuracy), accuracy
{task: %}, steps and wall_time_s of the fit that made the model, eval_wall_time_s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from immunize.bench.cells import Cell, cell_info, read_json

VERSION = 1
HARM, ACC = "harmful_score/", "accuracy/"


def entry(cell: Cell, cells_dir: Path) -> Optional[dict]:
    metrics = read_json(cell.directory(cells_dir) / "metrics.json")
    if metrics is None:
        return None
    model_cell = cell.fit_input
    fit = cell_info(model_cell, cells_dir) if model_cell is not None else {"steps": None, "wall_time_s": None}
    return {
        "cell": cell.name,
        "model_cell": model_cell.name if model_cell is not None else None,
        "defense": cell.meta.get("defense"),
        "stage": cell.meta.get("stage"),
        "attack": cell.meta.get("attack"),
        "finetune": cell.meta.get("finetune"),
        "harmful_score": metrics.get("harmful_score"),
        "harmful_scores": {k[len(HARM):]: v for k, v in sorted(metrics.items()) if k.startswith(HARM)},
        "capability": metrics.get("capability"),
        "accuracy": {k[len(ACC):]: v for k, v in sorted(metrics.items()) if k.startswith(ACC)},
        "steps": fit["steps"],
        "wall_time_s": fit["wall_time_s"],
        "eval_wall_time_s": cell_info(cell, cells_dir)["wall_time_s"],
    }


def collect(plan, cells_dir: Path, heldout: list[str], threshold: float) -> dict:
    """results.json content: metadata the report needs, and one entry per finished eval cell."""
    defenses = list(dict.fromkeys(c.meta.get("defense") for c in plan.evals if c.meta.get("stage") != "finetune"))
    finetune = list(dict.fromkeys(c.meta.get("defense") for c in plan.evals if c.meta.get("stage") == "finetune"))
    rows = [e for e in (entry(c, cells_dir) for c in plan.evals) if e is not None]
    return {"version": VERSION, "reference": plan.reference, "defenses": defenses, "finetune_defenses": finetune,
            "heldout_categories": list(heldout), "threshold": threshold, "results": rows}
