"""attack.search: an Optuna study per defense whose trials are ordinary bench cells; a killed study resumes
without redoing finished trials; the space and its errors."""
import json
import subprocess
import sys

import pytest

from immunize.bench.schema import AttackSearch
from immunize.bench.search import Axis, check_search, open_study, parse_space, startup_trials, suggest, within_bound
from immunize.errors import UserError

from helpers.bench import TINY, bench_env as _env, run_bench as _bench, write_config as _write

optuna = pytest.importorskip("optuna")

SEARCH = {"sampler": "tpe", "trials": 2, "space": {"lr": [1.0e-4, 1.0e-2, "log"], "samples": [4, 8]}, "seed": 3}


def _config(tmp_path, trials: int) -> str:
    cfg = {**TINY, "attack": {**TINY["attack"], "search": {**SEARCH, "trials": trials}}}
    return _write(tmp_path / "bench.yaml", cfg)


def _complete(study) -> list:
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def test_search_runs_trials_as_cells_and_resumes_a_killed_study(tmp_path):
    first = _bench(tmp_path, "--config", _config(tmp_path, 2), "--out", "out", timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out"
    study = open_study(out / "search.db", "undefended", 0, AttackSearch(**SEARCH))
    done = _complete(study)
    assert len(done) == 2
    results = json.loads((out / "results.json").read_text())
    trials = [e for e in results["results"] if e["stage"] == "search"]
    assert sorted(e["trial"] for e in trials) == [t.number for t in done]
    for t in done:  # each trial's value is the harmful score of its eval cell, its capability beside it
        entry = next(e for e in trials if e["trial"] == t.number)
        assert t.value == pytest.approx(entry["harmful_score"])
        assert t.user_attrs["capability"] == pytest.approx(entry["capability"])
        assert entry["attack"]["lr"] == pytest.approx(t.params["lr"]) and entry["attack"]["samples"] == t.params["samples"]
    report = (out / "report.md").read_text()
    assert "## Attacker search: best attack found vs the grid" in report and (out / "search_history.png").is_file()
    assert "bounded worst HS" in report

    # A run killed mid-trial leaves that trial RUNNING in the study: make one by hand, as kill -9 would.
    stale = study.ask()
    stale_point = suggest(stale, parse_space(SEARCH["space"]))
    cells_before = {p.name for p in (out / "cells").iterdir()}
    again = _bench(tmp_path, "--config", _config(tmp_path, 3), "--out", "out", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    study = open_study(out / "search.db", "undefended", 0, AttackSearch(**SEARCH))
    done_now = _complete(study)
    assert len(done_now) == 3
    assert [(t.number, t.params, t.value) for t in done_now[:2]] == [(t.number, t.params, t.value) for t in done]
    assert done_now[2].params["lr"] == pytest.approx(stale_point["lr"])  # the killed trial is asked again
    assert study.trials[stale.number].state == optuna.trial.TrialState.FAIL
    new_cells = {p.name for p in (out / "cells").iterdir()} - cells_before
    ran = [line for line in again.stderr.splitlines() if "cells run" in line]
    assert len(new_cells) <= 2 and ran and ran[-1].split(" cells run")[0].endswith(str(len(new_cells))), again.stderr

    third = _bench(tmp_path, "--config", _config(tmp_path, 3), "--out", "out", timeout=600)
    assert third.returncode == 0 and "0 cells run" in third.stderr, third.stderr[-2000:]


def test_space_parsing_and_suggestions():
    axes = parse_space({"lr": [1e-5, 1e-2, "log"], "steps": [10, 50, "linear"], "optimizer": ["adamw", "sgd"],
                        "samples": [100, 200]})
    assert axes[0] == Axis("lr", lo=1e-5, hi=1e-2, log=True)
    assert axes[1] == Axis("steps", lo=10, hi=50, log=False) and axes[3].choices == [100, 200]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        point = suggest(study.ask(), axes)
        assert 1e-5 <= point["lr"] <= 1e-2 and isinstance(point["steps"], int) and 10 <= point["steps"] <= 50
        assert point["optimizer"] in ("adamw", "sgd") and point["samples"] in (100, 200)
    assert startup_trials(12) == 3 and startup_trials(40) == 10


@pytest.mark.parametrize("space, needle", [
    ({}, "space is empty"),
    ({"momentum": [0.1, 0.9, "linear"]}, "unknown axis 'momentum'"),
    ({"lr": [1e-2, 1e-4, "log"]}, "lo < hi"),
    ({"lr": [0.0, 1e-2, "log"]}, "lo > 0"),
    ({"samples": []}, "give a list"),
])
def test_bad_spaces_are_one_line_errors(space, needle):
    with pytest.raises(UserError, match=needle):
        parse_space(space)


def test_bad_search_settings():
    with pytest.raises(UserError, match="unknown sampler 'grid'"):
        check_search(AttackSearch(sampler="grid"), ["undefended"])
    with pytest.raises(UserError, match="trials must be an integer >= 1"):
        check_search(AttackSearch(trials=0), ["undefended"])
    with pytest.raises(UserError, match="'seam' is not one of the bench's defenses"):
        check_search(AttackSearch(defenses=["seam"]), ["undefended"])


def test_bad_search_in_a_bench_config_exits_2_before_training(tmp_path):
    cfg = {**TINY, "attack": {**TINY["attack"], "search": {"space": {"lr": [1e-3, 1e-4, "log"]}}}}
    result = subprocess.run([sys.executable, "-m", "immunize", "bench", "--config", _write(tmp_path / "b.yaml", cfg),
                             "--out", "out"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "attack.search.space.lr" in result.stderr and not (tmp_path / "out" / "cells").exists()


def test_capability_bound():
    assert within_bound(90.0, 100.0, 0.1) and not within_bound(89.9, 100.0, 0.1)
    assert not within_bound(None, 100.0, 0.1) and within_bound(50.0, 50.0, 0.0)
