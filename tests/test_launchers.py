"""The bench beyond one process: cells as submitit jobs (its local executor, no Slurm needed) and as Ray tasks (a
local Ray started by the test), each on a two-cell bench, with a resume after one cell failed; the plan as data; and
a wheel installed in a fresh environment running a bench from an empty directory (no source checkout)."""
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from helpers.bench import TWO_CELLS, comparable, run_bench as _bench

NAMES = ("cell", "cells", "model_cell")  # the failing run's eval config differs (it carries FailOnce): other digests


def _numbers(results: dict) -> dict:
    return comparable(results, NAMES)


def _config(tmp_path: Path, fail_flag: Path = None) -> str:
    cfg = json.loads(json.dumps(TWO_CELLS))
    if fail_flag is not None:  # the eval cell fails on its first run
        eval_cfg = yaml.safe_load((REPO / "configs" / "eval" / "toy.yaml").read_text())
        eval_cfg["trainer"]["callbacks"] = [{"class_path": "tests.helpers.ranks.FailOnce",
                                             "init_args": {"flag": str(fail_flag)}}]
        (tmp_path / "eval.yaml").write_text(yaml.safe_dump(eval_cfg))
        cfg["eval"]["config"] = str(tmp_path / "eval.yaml")
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def local_results(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("local")
    result = _bench(cwd, "--config", _config(cwd), "--out", "out")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((cwd / "out" / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [["--launcher", "slurm", "--launcher.cluster", "local"], ["--launcher", "ray"]],
                         ids=["submitit-local", "ray-local"])
def test_launcher_gives_the_local_results_and_resumes_after_a_failed_cell(tmp_path, local_results, launcher):
    cfg = _config(tmp_path, fail_flag=tmp_path / "failed_once")
    first = _bench(tmp_path, "--config", cfg, "--out", "out", *launcher)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "failed under" in first.stderr and "log" in first.stderr.strip().splitlines()[-1]
    cells = tmp_path / "out" / "cells"
    pretrain = next(cells.glob("pretrain-*"))
    assert (pretrain / "model" / "stage.json").is_file()  # the finished cell stays finished
    stamp = (pretrain / "run.json").read_text()
    again = _bench(tmp_path, "--config", cfg, "--out", "out", *launcher)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 cells run, 1 reused" in again.stderr  # only the failed cell is submitted again
    assert (pretrain / "run.json").read_text() == stamp
    got = json.loads((tmp_path / "out" / "results.json").read_text())
    assert _numbers(got) == _numbers(local_results)


def test_plan_is_data_with_states_and_resources(tmp_path):
    result = _bench(tmp_path, "--config", _config(tmp_path), "--out", "out", "--plan")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())["cells"]
    assert [(c["kind"], c["state"]) for c in plan] == [("fit", "todo"), ("test", "todo")]
    assert plan[1]["needs"] == [plan[0]["cell"]] and plan[0]["resources"]["accelerator"] == "cpu"
    assert not (tmp_path / "out" / "cells").exists()  # nothing ran


@pytest.mark.slow
def test_a_wheel_in_a_fresh_environment_runs_the_bench_from_an_empty_directory(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True).stdout.strip()
    # the dependencies come from this environment's site-packages (a plain path entry: its editable-install hooks,
    # which would map `immunize` back to the checkout, are not run); immunize itself only from the wheel
    import torch

    (Path(site) / "deps.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(next(wheels.glob("*.whl")))],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run([str(python), "-c", "import immunize; print(immunize.__file__)"], cwd=empty,
                           capture_output=True, text=True)
    assert str(REPO) not in where.stdout and site in where.stdout, where.stdout + where.stderr
    (empty / "bench.yaml").write_text(yaml.safe_dump(TWO_CELLS))  # relative configs/... paths: the installed ones
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = _bench(empty, "--config", "bench.yaml", "--out", "out", env={**env, "PYTHONWARNINGS": "ignore"},
                    python=str(python))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (empty / "out" / "results.json").is_file() and not (empty / "configs").exists()
    plan = _bench(empty, "--out", "q", "--plan", "--wandb.enabled", "false", env=env, python=str(python))
    assert plan.returncode == 0 and "pretrain toy:tiny" in plan.stdout  # the default quickstart, packaged
