"""`keep_models: false`: a fit cell's model is removed once every cell reading it has finished, the results stay
those of the run that kept them, the report states disk per cell, finished cells stay finished, and a new reader of
a removed model has it made again first."""
import json

from helpers.bench import TINY, run_bench, write_config


def _models(out):
    return sorted(p.parent.parent.name.split("-")[0] for p in (out / "cells").glob("*/model/stage.json"))


def _removed(out):
    return sorted(p.parent.name.split("-")[0] for p in (out / "cells").glob("*/model_removed.json"))


def _scores(results):
    return [(e["cell"], e["harmful_score"], e["capability"]) for e in results["results"]]


def _fits(results):
    return {r["stage"]: r for r in results["disk"]["cells"] if r["kind"] == "fit"}


def test_keep_models_false_removes_read_models_and_keeps_results(tmp_path):
    out = tmp_path / "out"
    kept = run_bench(tmp_path, "--config", write_config(tmp_path / "kept.yaml", TINY), "--out", "out")
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert _models(out) == ["attack", "pretrain"] and _removed(out) == []
    kept_results = json.loads((out / "results.json").read_text())

    pruned_cfg = write_config(tmp_path / "pruned.yaml", {**TINY, "keep_models": False})
    pruned = run_bench(tmp_path, "--config", pruned_cfg, "--out", "out")  # the same cells, now without their models
    assert pruned.returncode == 0 and "0 cells run, 4 reused" in pruned.stderr, pruned.stderr[-3000:]
    assert "keep_models: false removed" in pruned.stderr
    assert _models(out) == [] and _removed(out) == ["attack", "pretrain"]
    results = json.loads((out / "results.json").read_text())
    assert _scores(results) == _scores(kept_results)
    before, after = _fits(kept_results), _fits(results)
    for stage in ("pretrain", "attack"):
        assert after[stage]["model_removed"] and not before[stage]["model_removed"]
        assert after[stage]["model_bytes"] == before[stage]["model_bytes"] > 10_000  # recorded when removed
        assert after[stage]["bytes"] < before[stage]["bytes"] - 0.9 * before[stage]["model_bytes"]
    assert results["disk"]["models_removed"] == 2 and kept_results["disk"]["models_removed"] == 0
    report = (out / "report.md").read_text()
    assert "## Disk per cell" in report and "2 removed here" in report

    again = run_bench(tmp_path, "--config", pruned_cfg, "--out", "out")  # finished cells stay finished
    assert again.returncode == 0 and "0 cells run, 4 reused" in again.stderr, again.stderr[-2000:]

    grown_cfg = {**TINY, "keep_models": False, "attack": {"lrs": [1.0e-3, 2.0e-3], "samples": [8]}}
    grown = run_bench(tmp_path, "--config", write_config(tmp_path / "grown.yaml", grown_cfg), "--out", "out")
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert "3 cells run, 3 reused" in grown.stderr  # the pretrain model made again, then the new attack and its eval
    assert _models(out) == [] and _removed(out) == ["attack", "attack", "pretrain"]
    grown_results = json.loads((out / "results.json").read_text())
    assert _scores(grown_results)[:2] == _scores(results)
