"""The bench in W&B: one run per fit cell with its training curves (grouped by bench and seed, logged once), and the
bench's run with the results as a table of numbers and its files as an artifact."""
import json

import pytest

from helpers.bench import TINY, run_bench, write_config
from immunize.bench.wandb_log import curve_rows, results_table


def test_curve_rows_keep_numbers_per_logged_step(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss,train/sd_share,val/x\n0,4,2.5,0.1,\n0,9,nan,0.2,\n,,,,7\n1,14,1.5,,\n")
    assert curve_rows(path) == [(4, {"train/loss": 2.5, "train/sd_share": 0.1, "epoch": 0.0}),
                                (9, {"train/sd_share": 0.2, "epoch": 0.0}), (14, {"train/loss": 1.5, "epoch": 1.0})]
    assert curve_rows(tmp_path / "missing.csv") == []


def test_results_table_holds_numbers_and_interval_bounds():
    results = {"results": [
        {"cell": "eval-a", "defense": "seam", "stage": "attack", "seed": 1, "attack": {"lr": 1e-3, "mode": "full"},
         "finetune": None, "harmful_score": 12.5, "capability": 60.0, "over_refusal": None, "refusal": 80.0,
         "steps": 14, "wall_time_s": 3.5, "eval_wall_time_s": 2.0,
         "intervals": {"harmful_score": [8.0, 17.0], "capability": [55.0, 65.0]}}]}
    columns, rows = results_table(results)
    row = dict(zip(columns, rows[0]))
    assert row["attack"] == "lr=0.001, mode=full" and row["finetune"] is None and row["seed"] == 1
    assert (row["harmful_score"], row["harmful_score_low"], row["harmful_score_high"]) == (12.5, 8.0, 17.0)
    assert (row["capability_low"], row["over_refusal"], row["over_refusal_low"]) == (55.0, None, None)
    assert all(isinstance(row[k], (int, float)) for k in ("harmful_score", "capability", "steps", "wall_time_s"))


@pytest.mark.slow
def test_bench_logs_each_fit_cell_once_and_a_numeric_results_table(tmp_path):
    cfg = write_config(tmp_path / "b.yaml", {**TINY, "trainer": {"threads": 1, "log_every_n_steps": 1},
                                                    "wandb": {"enabled": True, "mode": "offline", "name": "tiny"}})
    first = run_bench(tmp_path, "--config", cfg, "--out", "out")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "W&B logging" not in first.stderr  # no warning: every run and the artifact were written
    cells = tmp_path / "out" / "cells"
    markers = sorted(cells.glob("*/wandb_run.json"))
    assert sorted(m.parent.name.split("-")[0] for m in markers) == ["attack", "pretrain"]
    for marker in markers:
        record = json.loads(marker.read_text())
        steps = curve_rows(marker.parent / "csv" / "metrics.csv")
        assert record["logged_rows"] == len(steps) > 0
        run_dir = marker.parent / "wandb"
        run = next(run_dir.glob("offline-run-*"))
        assert record["id"] in run.name and list(run.glob("*.wandb"))
    bench_runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(bench_runs) == 1
    table = json.loads(next(bench_runs[0].glob("files/media/table/results_*.table.json")).read_text())
    hs = table["columns"].index("harmful_score")
    assert len(table["data"]) == 2 and all(isinstance(row[hs], (int, float)) for row in table["data"])

    stamps = {m: m.stat().st_mtime_ns for m in markers}
    again = run_bench(tmp_path, "--config", cfg, "--out", "out")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {m: m.stat().st_mtime_ns for m in markers} == stamps  # each cell logged once
    assert all(len(list((m.parent / "wandb").glob("offline-run-*"))) == 1 for m in markers)
