"""eval.judges in results.json and the report: every judge's harmful score of every evaluated model, side by side
with the eval's own judge, and how far the judges agree on the same answers.

results.json gets, per entry and per row, "judges": {label: harmful score} (rows: {label: {harmful_score,
interval, per_seed, unparseable}}; the same statistic and interval as the row's own HS, immunize.statistics), and a
top-level "judges": the labels, the flag threshold, and immunize.judges.agreement over every harmful answer of every
evaluated model that all judges scored (share flagged per judge, pairwise agreement, Cohen's kappa; items of one
model's prompt group count as one cluster).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from immunize import statistics
from immunize.bench.cells import read_items
from immunize.bench.judging import KIND, eval_judge_label, judged_scores
from immunize.bench.rows import NONE, Table, _ci, attack_points, fmt, fmt_ci, rows_of, where_label
from immunize.judges.agreement import agreement

HS_STATISTIC = "pooled"  # as the row's own harmful score (immunize.bench.results.METRICS)


def _harmful(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["kind"] == "harmful"]


def _scores(judged: dict, harmful: list[dict]) -> np.ndarray:
    """One judge's scores in the order of the eval's harmful rows (NaN: unparseable or not scored)."""
    values = [judged.get((r["prompt"] or "", r["answer"] or "")) for r in harmful]
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def collect_judges(plan, cells_dir: Path, entries: list[dict], rows: list[dict]) -> Optional[dict]:
    """Add "judges" to the entries and rows; returns results.json's "judges" (None when eval.judges is empty)."""
    judge_cells = [c for c in plan.cells if c.kind == KIND]
    if not judge_cells:
        return None
    labels = list(dict.fromkeys(c.meta["judge"] for c in judge_cells))
    threshold = plan.planner.bench.eval.judge_threshold
    own = eval_judge_label(plan.evals[0].config)
    by_eval: dict[str, dict] = {}
    for c in judge_cells:
        by_eval.setdefault(c.input.name, {})[c.meta["judge"]] = c
    evals = {c.name: c for c in plan.evals}
    pooled: dict[str, list] = {label: [] for label in [own, *labels]}
    groups: list = []
    arrays: dict[str, dict] = {}
    unscored = 0
    pooled_cells: set[str] = set()
    for e in entries:
        harmful = _harmful(read_items(evals[e["cell"]], cells_dir) or [])
        if not harmful:
            continue
        strata = [r.get("category") or "unknown" for r in harmful]
        clusters = [r.get("group") for r in harmful]
        per: dict[str, tuple] = {}
        for label in labels:
            cell = by_eval.get(e["cell"], {}).get(label)
            judged = judged_scores(cell, cells_dir) if cell is not None else None
            if judged is None:
                unscored += 1
                continue
            per[label] = (_scores(judged, harmful), strata, clusters)
        arrays[e["cell"]] = per
        e["judges"] = {label: _percent(values) for label, (values, _, _) in per.items()}
        if len(per) == len(labels) and e["cell"] not in pooled_cells:  # one eval cell may stand in two rows
            pooled_cells.add(e["cell"])
            pooled[own] += [np.nan if r.get("judge_score") is None else float(r["judge_score"]) for r in harmful]
            for label, (values, _, _) in per.items():
                pooled[label] += list(values)
            groups += [None if g is None else f"{e['cell']}:{g}" for g in clusters]
    for row in rows:
        row["judges"] = _row_judges(row, labels, arrays)
    return {"eval_judge": own, "labels": labels, "threshold": threshold, "unscored": unscored,
            "agreement": agreement(pooled, threshold, groups) if groups else None}


def _percent(values: np.ndarray) -> Optional[float]:
    return None if np.isnan(values).all() else round(100.0 * float(np.nanmean(values)), 4)


def _row_judges(row: dict, labels: list[str], arrays: dict[str, dict]) -> dict:
    """{label: {harmful_score, interval, per_seed, unparseable}} over the row's seeds (the interval only when every
    seed was scored on the same number of items)."""
    out = {}
    for label in labels:
        per_seed = [arrays.get(cell, {}).get(label) for cell in row["cells"]]
        if not per_seed or any(p is None for p in per_seed):
            continue
        seeds = [_percent(values) for values, _, _ in per_seed]
        unparseable = int(sum(np.isnan(values).sum() for values, _, _ in per_seed))
        value = _mean(seeds)
        interval = None
        if len({len(values) for values, _, _ in per_seed}) == 1 and value is not None:
            stacked = np.stack([values for values, _, _ in per_seed])
            ci = statistics.interval(stacked, per_seed[0][1], per_seed[0][2], HS_STATISTIC)
            value, interval = round(ci.value, 4), [round(ci.low, 4), round(ci.high, 4)]
        out[label] = {"harmful_score": value, "interval": interval, "per_seed": seeds, "unparseable": unparseable}
    return out


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return round(sum(values) / len(values), 4) if values else None


def judge_tables(results: dict) -> list[Table]:
    """The harmful score of every evaluated model under every judge, and the judges' agreement; [] without
    eval.judges."""
    info = results.get("judges")
    if not info:
        return []
    labels, own = info["labels"], info["eval_judge"]
    points = attack_points(results)
    scores = Table("judges", "Harmful score by judge",
                   f"Each evaluated model's harmful score (%) under the eval's own judge ({own}) and under each judge "
                   "of eval.judges, on the same answers; intervals as the row's own HS (over items and seeds). A "
                   "defense that reads robust under one judge and broken under another is not settled by either.",
                   ["defense", "where", f"{own} HS"] + [f"{label} HS" for label in labels])
    for r in rows_of(results):
        judged = r.get("judges") or {}
        cells = [fmt_ci(j["harmful_score"], j["interval"], per_seed=j["per_seed"]) if j else NONE
                 for j in (judged.get(label) for label in labels)]
        scores.rows.append([r["defense"], where_label(r, points), _ci(r, "harmful_score")] + cells)
    tables = [scores]
    result = info.get("agreement")
    if result:
        flags = Table("judge_flags", "Judges: share of answers flagged",
                      f"Over all {result['items']} harmful answers of the evaluated models every judge scored: how "
                      f"many each judge could read, the share it flags (score >= {fmt(info['threshold'])}) and its "
                      "mean score, 95% intervals over items (one model's prompt group is one cluster).",
                      ["judge", "scored", "unparseable", "flagged %", "mean score %"])
        for name, j in result["judges"].items():
            flags.rows.append([name, j["scored"], j["unparseable"], fmt_ci(*_split(j["flagged"])), fmt(j["mean_score"])])
        pairs = Table("judge_agreement", "Judges: pairwise agreement",
                      "On the answers both judges scored: the share given the same flag, and Cohen's kappa (0: the "
                      "agreement two judges with these shares reach by chance, 1: perfect).",
                      ["judges", "items", "agreement %", "kappa"])
        for p in result["pairs"]:
            pairs.rows.append([f"{p['a']} vs {p['b']}", p["items"], fmt_ci(*_split(p["agreement"])),
                               NONE if p["kappa"] is None else f"{p['kappa']:.2f}"])
        tables += [flags, pairs]
    return tables


def _split(interval: Optional[list]) -> tuple:
    """agreement's [value, low, high] as fmt_ci's (value, [low, high])."""
    return (None, None) if not interval else (interval[0], interval[1:])
