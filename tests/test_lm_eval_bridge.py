"""Capability through lm-evaluation-harness: the shipped toy task, the in-process bridge, our own scoring of the same
items, and `immunize test` with model.lm_eval."""
import json
import random
import sys

import pytest
import torch

from conftest import REPO
from immunize.datamodules.toy.multiple_choice import SHIPPED, jsonl_text, multiple_choice_items

pytest.importorskip("lm_eval", reason="the eval extra (pip install 'immunize[eval]')")

TOY_LM_EVAL = str(REPO / "configs" / "eval" / "toy_lm_eval.yaml")
SUBTASKS = {"toy_mc_sentiment": "sentiment", "toy_mc_topic": "topic", "toy_mc_facts": "facts"}


def test_shipped_items_equal_regeneration():
    rows = multiple_choice_items()
    assert SHIPPED.read_text() == jsonl_text(rows), "regenerate: python -m immunize.datamodules.toy.multiple_choice"
    assert len(rows) == 300 and {r["task"] for r in rows} == set(SUBTASKS.values())
    for r in rows:
        assert r["query"] == f"Question: {r['prompt']}\nAnswer:" and 0 <= r["gold"] < len(r["choices"])
        assert len(set(r["choices"])) == len(r["choices"]) == {"sentiment": 2, "topic": 4, "facts": 4}[r["task"]]


@pytest.fixture(scope="module")
def tiny():
    from immunize.lightning_modules import CausalLMModule

    return CausalLMModule(model="toy:tiny", init_seed=3)


def test_bridge_agrees_with_our_scoring(tiny):
    from immunize.lightning_modules.evaluation.lm_eval_bridge import run_lm_eval
    from immunize.lightning_modules.evaluation.multiple_choice import choice_loglikelihoods, multiple_choice_accuracy

    limit = 12
    tiny.model.train()
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    out = run_lm_eval(tiny.model, tiny.tokenizer, ["toy_mc"], limit=limit, batch_size=8)
    assert tiny.model.training, "the model's mode is put back"
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)
    metrics = out["metrics"]
    rows = [json.loads(line) for line in SHIPPED.read_text().splitlines()]
    tiny.model.eval()
    for task, kind in SUBTASKS.items():
        items = [r for r in rows if r["task"] == kind][:limit]  # lm-eval's limit takes each task's first items
        assert 0.0 <= metrics[f"lm_eval/{task}/acc"] <= 100.0 and metrics[f"lm_eval/{task}/n"] == limit
        # same conditioning (BOS + context, sum of continuation log-probs): the same predictions, so equal accuracy
        assert metrics[f"lm_eval/{task}/acc"] == pytest.approx(multiple_choice_accuracy(tiny.model, tiny.tokenizer, items))
        assert metrics[f"lm_eval/{task}/acc_norm"] == pytest.approx(
            multiple_choice_accuracy(tiny.model, tiny.tokenizer, items, normalize=True))
    assert metrics["lm_eval/average"] == metrics["lm_eval/toy_mc/acc"]
    ours = {r["id"]: ll for r, ll in zip(rows, choice_loglikelihoods(tiny.model, tiny.tokenizer, rows))}
    assert len(out["samples"]) == 3 * limit
    for sample in out["samples"]:
        theirs = [resp[0] for resp in sample["filtered_resps"]]
        assert theirs == pytest.approx(ours[sample["doc"]["id"]], abs=1e-4)


def test_spec_checks():
    from immunize.errors import UserError
    from immunize.lightning_modules.evaluation.lm_eval_bridge import check_lm_eval_spec

    assert check_lm_eval_spec({"tasks": "toy_mc"})["tasks"] == ["toy_mc"]
    for bad, needle in [({"tasks": ["toy_mc"], "fewshot": 5}, "unknown key 'fewshot'"), ({"tasks": []}, "non-empty"),
                        ({"tasks": ["toy_mc"], "limit": 0}, "limit"), ({"tasks": ["toy_mc"], "batch_size": 0}, "batch_size")]:
        with pytest.raises(UserError, match=needle):
            check_lm_eval_spec(bad)


def test_immunize_test_writes_lm_eval_metrics(tmp_path, cli):
    from immunize.lightning_modules import CausalLMModule

    CausalLMModule(model="toy:tiny").export(tmp_path / "model")
    result = cli("test", "--config", TOY_LM_EVAL, "--model.init_args.model", str(tmp_path / "model"),
                 "--model.init_args.max_new_tokens", "2", "--model.init_args.diagnostic_items", "0",
                 "--model.init_args.lm_eval", "{tasks: [toy_mc_sentiment, toy_mc_facts], limit: 3, batch_size: 8}",
                 "--data.init_args.n_harmful_per_category", "1", "--data.init_args.n_per_task", "1",
                 "--data.init_args.n_over_refusal", "0", "--trainer.enable_progress_bar", "false",
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "eval"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics_file = next((tmp_path / "eval").rglob("metrics.json"))
    metrics = json.loads(metrics_file.read_text())
    for task in ("toy_mc_sentiment", "toy_mc_facts"):
        assert 0.0 <= metrics[f"lm_eval/{task}/acc"] <= 100.0 and metrics[f"lm_eval/{task}/n"] == 3
    assert metrics["capability/lm_eval"] == pytest.approx(
        (metrics["lm_eval/toy_mc_sentiment/acc"] + metrics["lm_eval/toy_mc_facts/acc"]) / 2)
    assert "capability" in metrics  # the generation-based capability stays as it was
    samples = [json.loads(line) for line in (metrics_file.parent / "lm_eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {s["task"] for s in samples} == {"toy_mc_sentiment", "toy_mc_facts"}


@pytest.mark.parametrize("lm_eval, needles", [
    ("{tasks: [no_such_task_xyz]}", ["unknown task 'no_such_task_xyz'", "include_path", "lm-eval ls tasks"]),
    ("{tasks: [toy_mc], fewshot: 5}", ["unknown key 'fewshot'", "num_fewshot"]),
])
def test_bad_lm_eval_section_exits_2_with_one_line(capsys, tmp_path, monkeypatch, lm_eval, needles):
    from immunize.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["immunize"])
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", TOY_LM_EVAL, "--model.init_args.model", "toy:tiny", "--model.init_args.lm_eval", lm_eval,
              "--trainer.logger", "false"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert all(n in err for n in needles), err


@pytest.mark.slow
def test_ddp_rank0_runs_lm_eval_and_all_ranks_log_it(tmp_path, cli):
    """2 processes (gloo): rank 0 evaluates, the metrics are broadcast; they equal a single-process run."""
    from immunize.lightning_modules import CausalLMModule
    from immunize.lightning_modules.evaluation.lm_eval_bridge import run_lm_eval

    module = CausalLMModule(model="toy:tiny", init_seed=5)
    module.export(tmp_path / "model")
    result = cli("test", "--config", TOY_LM_EVAL, "--config", str(REPO / "configs" / "trainer" / "cpu_ddp.yaml"),
                 "--model.init_args.model", str(tmp_path / "model"), "--model.init_args.max_new_tokens", "2",
                 "--model.init_args.diagnostic_items", "0", "--model.init_args.lm_eval", "{tasks: [toy_mc], limit: 6}",
                 "--data.init_args.n_harmful_per_category", "1", "--data.init_args.n_per_task", "2",
                 "--data.init_args.n_over_refusal", "0", "--trainer.enable_progress_bar", "false",
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "eval"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "eval").rglob("metrics.json")).read_text())
    alone = run_lm_eval(module.model, module.tokenizer, ["toy_mc"], limit=6)["metrics"]
    assert {k: v for k, v in metrics.items() if k.startswith("lm_eval/")} == pytest.approx(alone)
