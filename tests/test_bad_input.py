"""Bad input ends with one clear line on stderr and exit code 2, never a traceback."""
import json

import pytest
import yaml

FIT = ["fit", "--trainer.logger", "false", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
       "--trainer.enable_checkpointing", "false", "--trainer.enable_model_summary", "false"]


def _config(tmp_path, data: dict, model: str = "toy:tiny") -> str:
    cfg = {"model": {"class_path": "lightning_modules.SFT", "init_args": {"model": model}}, "data": data}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _sft(train: list) -> dict:
    return {"class_path": "datamodules.SFTData", "init_args": {"train": train, "batch_size": 2}}


def _assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("immunize: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_dataset_field(tmp_path, cli):
    bad = tmp_path / "sst2.jsonl"
    bad.write_text(json.dumps({"text": "a fine movie", "label": 1}) + "\n")
    result = cli(*FIT, "--config", _config(tmp_path, _sft([{"kind": "sst2", "path": str(bad)}])))
    _assert_one_line_error(result, "sst2.jsonl", "sentence")


def test_empty_dataset(tmp_path, cli):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = cli(*FIT, "--config", _config(tmp_path, _sft([{"kind": "alpaca", "path": str(empty)}])))
    _assert_one_line_error(result, "empty")


@pytest.mark.parametrize("p", [1.5, -0.1])
def test_ratio_out_of_range(tmp_path, cli, p):
    data = {"class_path": "datamodules.HarmfulMix",
            "init_args": {"benign": {"kind": "toy", "part": "benign"}, "harmful": {"kind": "toy", "part": "harmful"}, "n": 10, "p": p}}
    result = cli(*FIT, "--config", _config(tmp_path, data))
    _assert_one_line_error(result, "p must be in [0, 1]", str(p))


def test_model_path_that_does_not_exist(tmp_path, cli):
    result = cli(*FIT, "--config", _config(tmp_path, _sft([{"kind": "toy", "part": "benign"}]), model="./no/such/model"))
    _assert_one_line_error(result, "./no/such/model", "does not exist")


def test_unknown_config_key(tmp_path, cli):
    result = cli(*FIT, "--config", _config(tmp_path, _sft([{"kind": "toy", "part": "benign"}])), "--model.init_args.learning_rate", "0.1")
    _assert_one_line_error(result, "learning_rate")


def test_nan_loss_stops_with_one_line(tmp_path, cli):
    cfg = _config(tmp_path, _sft([{"kind": "toy", "part": "benign", "limit": 8}]))
    result = cli(*FIT, "--config", cfg, "--model.init_args.lr", "1e30", "--trainer.max_steps", "5")
    _assert_one_line_error(result, "training loss", "model.lr")
