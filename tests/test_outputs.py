"""Output folders: immunize replaces only folders it wrote, and replacing one leaves a whole model at every moment
(kill -9 included); a failed bench cell's fallback export survives the rerun."""
import os
import signal
import time
from pathlib import Path

import pytest

from immunize.errors import UserError
from immunize.outputs import EXPORT_MARKER, check_output_dir, prepare_staging, recover, replace_dir


def _folder(path: Path, files: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


@pytest.mark.parametrize("name, files", [("new", None), ("empty", {}), ("earlier_export", {EXPORT_MARKER: "{}"}),
                                         ("earlier_fit", {"stage.json": "{}"}),
                                         ("earlier_import", {"immunize_import.json": "{}"})])
def test_allowed_output_folders(tmp_path, monkeypatch, name, files):
    monkeypatch.chdir(tmp_path)
    if files is not None:
        _folder(tmp_path / name, files)
    check_output_dir(tmp_path / name, "--export_dir")


@pytest.mark.parametrize("target, needle", [("foreign", "did not write"), ("a_file", "is a file"),
                                            (".", "current folder"), ("..", "current folder"),
                                            ("/", "filesystem root"), ("HOME", "home folder"), ("", "is empty")])
def test_refused_output_folders(tmp_path, monkeypatch, target, needle):
    work = _folder(tmp_path / "work", {"notes.txt": "mine"})
    _folder(work / "foreign", {"log.txt": "a week of logs"})
    (work / "a_file").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    with pytest.raises(UserError, match=needle) as err:
        check_output_dir(str(tmp_path / "home") if target == "HOME" else target, "--export_dir")
    assert "\n" not in str(err.value) and "--export_dir" in str(err.value)


def test_replace_swaps_whole_folders_and_cleans_leftovers(tmp_path):
    target = tmp_path / "model"
    first = prepare_staging(target)
    (first / "w").write_text("one")
    replace_dir(first, target)
    second = prepare_staging(target)
    (second / "w").write_text("two")
    killed = tmp_path / ".model.immunize-staging-999999"  # what a killed run leaves beside the target
    _folder(killed, {EXPORT_MARKER: "{}", "w": "half"})
    stranger = _folder(tmp_path / ".model.immunize-staging-notours", {"w": "not ours"})
    replace_dir(second, target)
    assert (target / "w").read_text() == "two" and not second.exists()
    prepare_staging(target)
    assert not killed.exists() and stranger.exists(), "leftovers with the marker go, anything else stays"


def test_replace_refuses_a_folder_immunize_did_not_write(tmp_path):
    target = _folder(tmp_path / "model", {"log.txt": "mine"})
    staging = prepare_staging(target)
    with pytest.raises(UserError, match="did not write"):
        replace_dir(staging, target)
    assert (target / "log.txt").read_text() == "mine"


def test_a_crash_between_the_fallback_renames_is_recovered(tmp_path):
    """Without RENAME_EXCHANGE the old folder is moved aside first; if the process dies before the new one is
    renamed in, the next check puts the old one back."""
    target = tmp_path / "model"
    _folder(tmp_path / ".model.immunize-old-4242", {EXPORT_MARKER: "{}", "w": "old"})
    recover(target)
    assert (target / "w").read_text() == "old"


def _export_in_child(module, target: Path) -> int:
    """Export in a forked child (to be killed). The child draws no progress bar: tqdm's write lock is a semaphore
    shared across fork, and a child killed while holding it would block this process's next bar forever."""
    pid = os.fork()
    if pid == 0:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            module.export(target)
        finally:
            os._exit(0)
    return pid


def _weight(path: Path) -> float:
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    return float(state["model.embed_tokens.weight"].sum())


def test_kill_9_during_a_replacing_export_leaves_one_whole_model(tmp_path):
    """An export replaces an earlier one while SIGKILL lands at moments spread over its whole duration: each time,
    the folder holds exactly one complete model (the old or the new one), which loads."""
    from immunize.lightning_modules import CausalLMModule

    old, new = CausalLMModule(model="toy:small", init_seed=1), CausalLMModule(model="toy:small", init_seed=2)
    target = tmp_path / "model"
    start = time.monotonic()
    old.export(target)
    duration = time.monotonic() - start
    sums = {_weight(target): "old"}
    new.export(tmp_path / "reference_new")
    sums[_weight(tmp_path / "reference_new")] = "new"
    seen = set()
    for fraction in (0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 1.3):
        pid = _export_in_child(new, target)
        time.sleep(fraction * duration)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        check_output_dir(target, "--export_dir")  # recovers a set-aside folder, as every later run does
        which = sums.get(_weight(target))
        assert which is not None, f"a model that is neither the old nor the new one after a kill at {fraction:.2f}"
        assert (target / "tokenizer.json").is_file() and (target / "config.json").is_file()
        seen.add(which)
        reloaded = CausalLMModule(model=str(target))
        assert reloaded.model.config.hidden_size == old.model.config.hidden_size
        if which == "new":  # start the next round from the old model again
            old.export(target)
    new.export(target)
    assert _weight(target) in sums and sums[_weight(target)] == "new"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.immunize")]
    assert not leftovers, leftovers


def test_a_failed_cells_fallback_export_survives_the_rerun(tmp_path, monkeypatch):
    from immunize.bench import runner
    from immunize.bench.cells import Cell
    from immunize.cli import FALLBACK_PREFIX

    cells = tmp_path / "cells"
    cell = Cell("fit", "attack", "attack lr=1e-3", {"model": {"class_path": "immunize.lightning_modules.SFT"}}, "toy:tiny")
    kept = _folder(cell.directory(cells) / f"{FALLBACK_PREFIX}-20261206-1", {"model.safetensors": "weights"})
    monkeypatch.setattr(runner, "run_cell_process", lambda *args, **kwargs: 1)
    with pytest.raises(runner.CellFailed):
        runner.Runner(cells, "quiet", None, quiet=True).run_cell(cell)
    moved = cells / runner.KEPT_DIR / cell.name / kept.name / "model.safetensors"
    assert moved.read_text() == "weights" and not kept.exists()
