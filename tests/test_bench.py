"""`immunize bench` end to end at minimal size (toy:tiny, a few steps), resume after kill -9, results.json
schema, and bad bench configs (one line `immunize: error: ...`, exit code 2, before any training)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.bench import TINY, bench_env as _env, comparable, run_bench, write_config as _write

ENTRY_KEYS = {"cell", "model_cell", "defense", "stage", "seed", "attack", "finetune", "trial", "searched", "harmful_score",
              "harmful_scores", "capability", "over_refusal", "refusal", "accuracy", "loss", "chance", "diagnostics", "loss_curve", "steps", "wall_time_s",
              "eval_wall_time_s", "judge_unparseable", "capability_lm_eval", "lm_eval", "intervals", "train"}


def _bench(cwd: Path, *args, timeout=300):
    return run_bench(cwd, *args, timeout=timeout)


def _without_timing(results: dict) -> dict:
    return comparable(results)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One full run of the 4-cell bench: (working dir, completed process, results dict)."""
    cwd = tmp_path_factory.mktemp("bench")
    cfg = _write(cwd / "bench.yaml", TINY)
    result = _bench(cwd, "--config", cfg, "--out", "out")
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result, json.loads((cwd / "out" / "results.json").read_text())


def test_end_to_end_outputs_and_progress(reference):
    cwd, result, _ = reference
    err = result.stderr
    assert "4 cells (2 fits, 2 evals), 0 already done" in err
    assert "[cell 1/4] pretrain toy:tiny ... (eta ?)" in err
    assert "[cell 3/4] attack undefended lr=1e-3 ... (eta " in err
    assert "[cell 4/4] done in" in err and "harmful" in err
    assert "      | step 2/2" in err  # the recorder's progress lines from inside the pretrain fit
    out = cwd / "out"
    for name in ("results.json", "report.md", "bench.json", "attack_harmful_score.png", "attack_capability.png"):
        assert (out / name).is_file(), name
    text = (out / "report.md").read_text()
    assert "## Resistance" in text and "## Stability" in text and "## Generalization" in text
    assert "Resistance: harmful score and capability under attack" in result.stdout  # tables printed at the end
    cells = sorted(p.name.split("-")[0] for p in (out / "cells").iterdir() if p.is_dir())
    assert cells == ["attack", "eval", "eval", "pretrain"]
    assert not list((out / "cells").rglob("*.tmp")), "no temporary files left behind"


def test_results_schema(reference):
    _, _, results = reference
    assert results["version"] == 3 and results["reference"] == "undefended" and results["seeds"] == [0]
    assert results["defenses"] == ["undefended"] and results["finetune_defenses"] == []
    import torch

    prov = results["provenance"]
    assert prov["packages"]["torch"] == torch.__version__ and prov["packages"]["numpy"]
    assert prov["trainer"]["precision"] == "32-true" and prov["world_size"] == 1 and prov["machine"]["cpus"] >= 1
    assert prov["commit"] is None or len(prov["commit"]) == 40
    assert results["heldout_categories"] == ["self_harm", "terrorism,organized_crime"]
    entries = results["results"]
    assert [(e["stage"], e["defense"]) for e in entries] == [("defended", "undefended"), ("attack", "undefended")]
    for e in entries:
        assert set(e) == ENTRY_KEYS
        assert 0.0 <= e["harmful_score"] <= 100.0 and 0.0 <= e["capability"] <= 100.0
        assert len(e["harmful_scores"]) == 14 and set(e["accuracy"]) == {"arithmetic", "facts", "howto", "sentiment", "topic"}
        assert set(e["loss"]) == {"harmful", "arithmetic", "facts", "howto", "sentiment", "topic"}
        assert set(e["chance"]) == set(e["accuracy"]) and -1.0 <= e["diagnostics"]["grad_cosine"] <= 1.0
        low, high = e["intervals"]["capability"]
        assert low <= e["capability"] <= high and e["seed"] == 0
        assert isinstance(e["steps"], int) and e["wall_time_s"] > 0 and e["eval_wall_time_s"] > 0
    assert entries[0]["attack"] is None and entries[0]["steps"] == 2
    assert entries[1]["attack"] == {"lr": 1e-3, "samples": 8, "mode": "full", "optimizer": "adamw"}
    assert entries[1]["steps"] == 1 and entries[1]["model_cell"].startswith("attack-")
    assert entries[1]["loss_curve"]["steps"] == [0, 1] and len(entries[1]["loss_curve"]["mean"]) == 2
    rows = results["rows"]  # one per (defense, stage, attack) over seeds; the attack row is paired with nothing else
    assert [(r["stage"], r["seeds"]) for r in rows] == [("defended", [0]), ("attack", [0])]
    assert rows[0]["vs_reference"] is None


def test_two_runs_give_identical_results(reference, tmp_path):
    """The same bench config run again from nothing (another directory) gives the same results.json,
    wall times aside."""
    src, _, expected = reference
    cfg = _write(tmp_path / "bench.yaml", TINY)
    result = _bench(tmp_path, "--config", cfg, "--out", "again")
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads((tmp_path / "again" / "results.json").read_text())
    assert _without_timing(got) == _without_timing(expected)


def test_rerun_reuses_every_cell(reference):
    cwd, _, _ = reference
    before = {name: (cwd / "out" / name).read_bytes() for name in ("results.json", "report.md")}
    result = _bench(cwd, "--config", str(cwd / "bench.yaml"), "--out", "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("done before, skipped") == 4
    assert "0 cells run, 4 reused" in result.stderr
    for name, data in before.items():
        assert (cwd / "out" / name).read_bytes() == data, name


def _children(pid: int) -> list[int]:
    """Processes whose parent is pid (from /proc/<n>/stat)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(proc.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks /proc for orphaned cell processes")
def test_kill_9_during_a_cell_then_resume(reference, tmp_path):
    """Start from the reference run with its attack cells removed, kill -9 the bench while the attack fit
    runs, then rerun: finished cells are skipped, the killed one is redone, and the numbers match."""
    src, _, expected = reference
    shutil.copytree(src / "out" / "cells", tmp_path / "out" / "cells")
    cells = tmp_path / "out" / "cells"
    for later in sorted(cells.iterdir()):
        if later.name.startswith("attack-") or later.name == expected["results"][1]["cell"]:
            shutil.rmtree(later)
    cfg = _write(tmp_path / "bench.yaml", TINY)
    proc = subprocess.Popen([sys.executable, "-m", "immunize", "bench", "--config", cfg, "--out", "out"], cwd=tmp_path,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    for line in proc.stderr:
        if line.startswith("[cell 3/4] attack"):
            break
        assert time.monotonic() < deadline, "the attack cell never started"
    cell_processes = []
    for _ in range(500):  # kill as soon as the fit's child process runs (a fast machine finishes the fit in ~1 s)
        cell_processes = _children(proc.pid)
        if cell_processes:
            break
        time.sleep(0.02)
    time.sleep(0.2)
    assert cell_processes, "the attack cell runs in a child process of the bench"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    for _ in range(50):  # the cell's process dies with the bench (PR_SET_PDEATHSIG)
        if not any(_alive(pid) for pid in cell_processes):
            break
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in cell_processes), "a cell process outlived the killed bench"
    killed = [p for p in cells.iterdir() if p.name.startswith("attack-")]
    assert len(killed) == 1 and not (killed[0] / "model" / "stage.json").exists()
    (killed[0] / ".model.tmp").mkdir()  # as a kill during export would leave
    (killed[0] / ".model.tmp" / "model.safetensors").write_bytes(b"\0" * 10)

    result = _bench(tmp_path, "--config", cfg, "--out", "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 already done" in result.stderr
    assert "[cell 1/4] pretrain toy:tiny: done before, skipped" in result.stderr
    assert "[cell 2/4] eval undefended (no attack): done before, skipped" in result.stderr
    assert "[cell 3/4] attack undefended lr=1e-3 ... (eta" in result.stderr
    assert "2 cells run, 2 reused" in result.stderr
    assert not list(cells.rglob("*.tmp"))
    got = json.loads((tmp_path / "out" / "results.json").read_text())
    assert _without_timing(got) == _without_timing(expected)  # same cells, same numbers as an uninterrupted run


# ----- bad input: one line, exit code 2, nothing trained ---------------------------------------------
def _assert_one_line_error(code, err, *needles):
    assert code == 2, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("immunize: error:")]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _bench_in_process(capsys, tmp_path, *args):
    """bench_main in this process (fast: no interpreter start-up); returns (exit code, stderr)."""
    from immunize.bench.command import bench_main

    cfg = _write(tmp_path / "bench.yaml", TINY)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit) as exit_info:
            bench_main(["--config", cfg, "--out", str(tmp_path / "out"), *args])
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "out" / "cells").exists(), "nothing may run before validation passes"
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, needles", [
    (["--defenses", "[{name: nosuch}]"], ["unknown defense 'nosuch'", "registry"]),
    (["--defenses", "[{name: mine, model: {class_path: immunize.lightning_modules.NoSuchDefense}}]"],
     ["defense mine", "cannot import", "immunize.lightning_modules.NoSuchDefense"]),
    (["--finetune", "{defenses: [{name: nosuch}]}"], ["unknown fine-tuning-stage defense 'nosuch'"]),
    (["--attack.lrs", "[]"], ["attack.lrs is empty"]),
    (["--finetune", "{ratios: []}"], ["finetune.ratios is empty"]),
    (["--attack.lrs", "[1.0e-3, 0.0]"], ["learning rate must be > 0", "0.0"]),
    (["--attack.lrs", "[-1.0e-3]"], ["learning rate must be > 0", "-0.001"]),
    (["--model.source", "./no/such/model"], ["./no/such/model", "does not exist"]),
    (["--attack.lrz", "[1.0e-3]"], ["lrz"]),
    (["--defenses", "[{name: seam, model: {init_args: {learning_rate: 0.1}}}]"], ["learning_rate", "immunize.lightning_modules.SEAM"]),
    (["--attack.modes", "[qlora]"], ["attack.modes: 'qlora' is not one of full, lora"]),
    (["--heldout_categories", "[no_such_category]"], ["no_such_category"]),
])
def test_bad_config_in_process(capsys, tmp_path, args, needles):
    _assert_one_line_error(*_bench_in_process(capsys, tmp_path, *args), *needles)


def test_unknown_key_in_config_file_via_cli(tmp_path):
    cfg = _write(tmp_path / "bench.yaml", {**TINY, "atack": {"lrs": [1e-3]}})
    result = _bench(tmp_path, "--config", cfg, "--out", "out")
    _assert_one_line_error(result.returncode, result.stderr, "atack")
    assert not (tmp_path / "out").exists()
