"""Caches are keyed on the content of their inputs: a finished fit is skipped only while its config, its data files
and its input model are unchanged; a bench cell's name changes with the data files its config names."""
import json
import time

import yaml

from immunize.fingerprint import input_paths, path_digest


def _alpaca(path, words):
    path.write_text("".join(json.dumps({"instruction": f"say {w}", "input": "", "output": f"the {w} cat"}) + "\n"
                            for w in words))


def _config(tmp, model="toy:tiny"):
    cfg = {"model": {"class_path": "immunize.lightning_modules.SFT", "init_args": {"model": model}},
           "data": {"class_path": "immunize.datamodules.SFTData",
                    "init_args": {"train": [{"kind": "alpaca", "path": "data.jsonl"}], "batch_size": 2}},
           "trainer": {"max_steps": 2, "logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
                       "enable_model_summary": False}}
    (tmp / "fit.yaml").write_text(yaml.safe_dump(cfg))


def _fit(server, tmp, out="out"):
    start = time.monotonic()
    result = server.run("fit", "--config", "fit.yaml", "--export_dir", out, cwd=tmp)
    assert result.returncode == 0, result.stderr[-2000:]
    return "skipping fit" in result.stdout, time.monotonic() - start


def test_a_changed_data_file_reruns_the_fit_an_unchanged_one_is_skipped(cli_server, tmp_path):
    _alpaca(tmp_path / "data.jsonl", ["red", "blue", "green", "hat"])
    _config(tmp_path)
    assert _fit(cli_server, tmp_path)[0] is False
    skipped, _ = _fit(cli_server, tmp_path)
    assert skipped, "an unchanged rerun reuses the export"
    _alpaca(tmp_path / "data.jsonl", ["red", "blue", "green", "sun"])  # same size, other content
    assert _fit(cli_server, tmp_path)[0] is False, "a changed data file must rerun the fit"
    assert _fit(cli_server, tmp_path)[0] is True


def test_a_changed_input_model_reruns_the_fit(cli_server, tmp_path):
    from immunize.lightning_modules import CausalLMModule

    CausalLMModule(model="toy:tiny", init_seed=1).export(tmp_path / "base")
    _alpaca(tmp_path / "data.jsonl", ["red", "blue", "green", "hat"])
    _config(tmp_path, model="base")
    assert _fit(cli_server, tmp_path)[0] is False
    assert _fit(cli_server, tmp_path)[0] is True
    CausalLMModule(model="toy:tiny", init_seed=2).export(tmp_path / "base")  # re-exported with other weights
    assert _fit(cli_server, tmp_path)[0] is False


def test_digests_follow_content_not_time(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("one\n")
    first = path_digest(path)
    path.touch()
    assert path_digest(path) == first, "a touched file with the same bytes keeps its digest"
    path.write_text("two\n")
    assert path_digest(path) != first
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a").write_text("x")
    before = path_digest(folder)
    (folder / "b").write_text("y")
    assert path_digest(folder) != before


def test_input_paths_are_the_files_a_config_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "qa").mkdir()  # a folder that happens to share a value's name is not an input unless under an input key
    cfg = {"model": {"init_args": {"model": "toy:tiny", "template": "qa"}},
           "data": {"init_args": {"train": [{"kind": "alpaca", "path": "data.jsonl"}, {"kind": "toy"}]}}}
    assert input_paths(cfg) == ["data.jsonl"]


def test_a_bench_cell_is_renamed_when_its_data_file_changes(tmp_path, monkeypatch):
    from immunize.bench.cells import cell_digest

    monkeypatch.chdir(tmp_path)
    _alpaca(tmp_path / "data.jsonl", ["red", "blue"])
    cfg = {"data": {"init_args": {"train": [{"kind": "alpaca", "path": "data.jsonl"}]}}}
    toy = {"data": {"init_args": {"train": [{"kind": "toy"}]}}}
    first = cell_digest("fit", "benign", cfg, "toy:tiny")
    assert cell_digest("fit", "benign", cfg, "toy:tiny") == first
    _alpaca(tmp_path / "data.jsonl", ["red", "sun"])
    assert cell_digest("fit", "benign", cfg, "toy:tiny") != first
    assert cell_digest("fit", "benign", toy, "toy:tiny") == cell_digest("fit", "benign", toy, "toy:tiny")


def test_a_changed_computation_changes_the_stage_key(monkeypatch):
    """A stage whose config uses a computation of fingerprint.COMPUTATION_VERSIONS is not skipped after that
    computation changed (a model exported by the earlier code is not taken for the new one)."""
    from immunize import fingerprint
    from immunize.stage_cache import config_hash

    cfg = {"model": {"class_path": "immunize.lightning_modules.TAR", "init_args": {"warmup_ratio": 0.1}}}
    plain = {"model": {"class_path": "immunize.lightning_modules.SFT", "init_args": {"lr": 1e-3}}}
    before, plain_before = config_hash(cfg), config_hash(plain)
    monkeypatch.setitem(fingerprint.COMPUTATION_VERSIONS, "TAR", 99)
    assert config_hash(cfg) != before and config_hash(plain) == plain_before
