"""The default logger is W&B in offline mode: metrics, the config and a generations table land in the run."""
import json

import pytest
import yaml

from immunize.datamodules.toy.lexicon import CATEGORIES, TASKS


@pytest.mark.slow
def test_default_logger_is_offline_wandb_with_generations_table(tmp_path, cli):
    cfg = {"model": {"class_path": "immunize.lightning_modules.CausalLMModule", "init_args": {"model": "toy:tiny", "max_new_tokens": 4}},
           "data": {"class_path": "immunize.datamodules.EvalData",
                    "init_args": {"n_harmful_per_category": 1, "n_per_task": 2, "sources": [{"kind": "toy"}]}}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    result = cli("test", "--config", "t.yaml", "--trainer.enable_progress_bar", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("files/media/table/generations_*.table.json"))
    run_id = runs[0].name.rsplit("-", 1)[-1]
    metrics = json.loads((tmp_path / "runs" / run_id / "metrics.json").read_text())
    assert {"harmful_score", "capability"} <= set(metrics)
    assert len((tmp_path / "runs" / run_id / "generations.jsonl").read_text().splitlines()) == len(CATEGORIES) + len(TASKS) * 2
