"""The bench to Weights & Biases (offline by default: `wandb sync DIR/wandb/...` uploads later).

Two kinds of runs:
- one run per finished fit cell (`wandb.cell_runs`), named by the cell's label and grouped by bench and seed, with the
  training curves the cell logged (its csv/metrics.csv, one W&B step per logged step). A cell is logged once: its
  folder then holds wandb_run.json, so a rerun, or another bench that shares the cell, does not log it again.
- one run per bench: every report table as text (as the report shows it), the results as a table of numbers (one
  row per evaluated model: sortable and plottable in W&B), the figures, and results.json, report.md and the plots as
  an artifact.
Failures are reported as one warning line and do not fail the bench (the files on disk are complete).
"""
from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

from immunize.bench.cells import metrics_rows, read_json
from immunize.io import atomic_write_json

CELL_MARKER = "wandb_run.json"
NUMBER_COLUMNS = ("harmful_score", "capability", "over_refusal", "refusal", "steps", "wall_time_s", "eval_wall_time_s")


def _warn(what: str, err: Exception) -> None:
    print(f"immunize bench: warning: W&B logging of {what} failed ({type(err).__name__}: {err}); the files on disk are "
          "unaffected", file=sys.stderr)


def _number(text: str):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def curve_rows(metrics_csv: Path) -> list[tuple[int, dict]]:
    """(step, {metric: value}) per row of a Lightning CSVLogger file, numbers only, rows without a step skipped."""
    out = []
    for row in metrics_rows(metrics_csv):
        step = _number(row.get("step"))
        if step is None:
            continue
        values = {k: v for k, v in ((k, _number(v)) for k, v in row.items() if k not in ("step", "epoch"))
                  if v is not None}
        if row.get("epoch") not in (None, ""):
            values["epoch"] = _number(row["epoch"])
        if values:
            out.append((int(step), values))
    return out


def bench_name(spec, out_dir: Path) -> str:
    """The W&B name of a bench (its group, its artifact): the wandb block's name, else the output folder's."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", spec.name or Path(out_dir).resolve().name)


def log_cell_runs(spec, cells, cells_dir: Path, out_dir: Path) -> int:
    """One W&B run per finished fit cell not logged before; returns how many were logged."""
    os.environ.setdefault("WANDB_SILENT", "true")
    logged = 0
    todo = [c for c in cells if c.kind == "fit" and c.is_done(cells_dir)
            and not (c.directory(cells_dir) / CELL_MARKER).is_file()]
    if not todo:
        return 0
    try:
        import wandb
    except ImportError as err:
        _warn("the cells' training curves", err)
        return 0
    group_of = bench_name(spec, out_dir)
    for cell in todo:
        d = cell.directory(cells_dir)
        try:
            run = wandb.init(project=spec.project, name=cell.label, group=f"{group_of}/seed{cell.meta.get('seed', 0)}",
                             job_type=cell.stage, mode=spec.mode, dir=str(d), reinit="finish_previous",
                             config={"cell": cell.name, "stage": cell.stage, "seed": cell.meta.get("seed"),
                                     "defense": cell.meta.get("defense"), "config": cell.config},
                             settings=wandb.Settings(console="off"))
            rows = curve_rows(d / "csv" / "metrics.csv")
            for step, values in rows:
                run.log(values, step=step)
            run.summary.update({"wall_time_s": (read_json(d / "run.json") or {}).get("wall_time_s"),
                                "steps": (read_json(d / "train.json") or {}).get("steps")})
            run_id, run_dir = run.id, str(Path(getattr(run, "dir", "") or d).parent)
            run.finish()
        except Exception as err:  # noqa: BLE001 - W&B is a side channel
            _warn(f"cell {cell.name}", err)
            return logged
        atomic_write_json(d / CELL_MARKER, {"id": run_id, "dir": run_dir, "logged_rows": len(rows)})
        logged += 1
    return logged


def results_table(results: dict) -> tuple[list[str], list[list]]:
    """The results as numbers: one row per evaluated model with its interval bounds (None where absent)."""
    columns = ["cell", "defense", "stage", "seed", "attack", "finetune"]
    for key in NUMBER_COLUMNS:
        columns.append(key)
        if key in ("harmful_score", "capability", "over_refusal"):
            columns += [f"{key}_low", f"{key}_high"]
    rows = []
    for e in results.get("results", []):
        attack = e.get("attack") or {}
        finetune = e.get("finetune") or {}
        row = [e.get("cell"), e.get("defense"), e.get("stage"), e.get("seed"),
               ", ".join(f"{k}={v}" for k, v in attack.items()) or None,
               ", ".join(f"{k}={v}" for k, v in finetune.items()) or None]
        for key in NUMBER_COLUMNS:
            row.append(e.get(key))
            if key in ("harmful_score", "capability", "over_refusal"):
                low, high = ((e.get("intervals") or {}).get(key) or [None, None])[:2]
                row += [low, high]
        rows.append(row)
    return columns, rows


def log_report(spec, out_dir: Path, config: dict, tables, images: dict[str, list[str]], results: dict) -> str:
    """The bench's own W&B run (tables, numbers, figures, artifact); returns its directory ("" on failure)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb

        run = wandb.init(project=spec.project, name=spec.name, mode=spec.mode, dir=str(out_dir), config=config,
                         job_type="bench", group=bench_name(spec, out_dir), reinit="finish_previous",
                         settings=wandb.Settings(console="off"))
        payload = {f"tables/{t.key}": wandb.Table(columns=t.columns, data=[[str(c) for c in row] for row in t.rows])
                   for t in tables}
        columns, rows = results_table(results)
        payload["results"] = wandb.Table(columns=columns, data=rows)
        for names in images.values():
            for name in names:
                payload[f"plots/{Path(name).stem}"] = wandb.Image(str(Path(out_dir) / name))
        run.log(payload)
        artifact = wandb.Artifact(f"bench-{bench_name(spec, out_dir)}", type="bench-results")
        for name in ["results.json", "report.md"] + [n for names in images.values() for n in names]:
            if (Path(out_dir) / name).is_file():
                artifact.add_file(str(Path(out_dir) / name), name=name)
        run.log_artifact(artifact)
        run_dir = getattr(run, "dir", "")
        run.finish()
        return str(Path(run_dir).parent) if run_dir else ""
    except Exception as err:  # noqa: BLE001 - W&B is a side channel; the report files are the record
        _warn("the report", err)
        return ""
