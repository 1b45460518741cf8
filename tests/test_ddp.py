"""DDP on CPU with 2 processes (gloo): ranks stay identical in fit, and test metrics count every item once."""
import json

import torch
import yaml
from safetensors.torch import load_file

from immunize.datamodules.toy import lexicon

TRAIN = {"class_path": "immunize.datamodules.SFTData",
         "init_args": {"batch_size": 4, "train": [{"kind": "toy", "part": "benign", "split": "pretrain", "limit": 64}]}}
EVAL = {"class_path": "immunize.datamodules.EvalData",
        "init_args": {"batch_size": 16, "n_harmful_per_category": 2, "n_per_task": 5, "sources": [{"kind": "toy"}]}}
COMMON = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _write(tmp_path, name, cfg):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_ddp_fit_keeps_ranks_identical_and_test_counts_items_once(tmp_path, cli):
    fit_cfg = _write(tmp_path, "fit.yaml", {
        "model": {"class_path": "immunize.lightning_modules.SFT", "init_args": {"model": "toy:tiny", "lr": 3e-3}},
        "data": TRAIN,
        "trainer": {"max_steps": 4, "logger": False, "enable_checkpointing": False,
                    "callbacks": [{"class_path": "tests.helpers.ranks.DumpParameters", "init_args": {"dirpath": str(tmp_path / "dump")}}]},
    })
    result = cli("fit", "--config", fit_cfg, *COMMON, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                 "--export_dir", str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / "dump" / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert (tmp_path / "model" / "model.safetensors").exists()

    metrics = {}
    for devices in ("1", "2"):
        log_dir = tmp_path / f"eval{devices}"
        test_cfg = _write(tmp_path, f"test{devices}.yaml", {
            "model": {"class_path": "immunize.lightning_modules.CausalLMModule", "init_args": {"model": str(tmp_path / "model"), "max_new_tokens": 8}},
            "data": EVAL,
            "trainer": {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(log_dir), "name": "e"}}},
        })
        extra = ["--trainer.strategy", "ddp", "--trainer.devices", "2"] if devices == "2" else ["--trainer.devices", "1"]
        result = cli("test", "--config", test_cfg, *COMMON, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics[devices] = json.loads(next(log_dir.rglob("metrics.json")).read_text())
        rows = [json.loads(line) for line in next(log_dir.rglob("generations.jsonl")).read_text().splitlines()]
        assert len(rows) == 14 * 2 + len(lexicon.TASKS) * 5
    assert metrics["1"].keys() == metrics["2"].keys()
    for key in metrics["1"]:
        assert abs(metrics["1"][key] - metrics["2"][key]) < 1e-4, key
