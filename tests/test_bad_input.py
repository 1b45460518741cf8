"""Bad input, table-driven: every case ends with exit code 2 and exactly one line on stderr that names the thing and
the fix, never a traceback, and the files that were there before the call are byte-identical after it (nothing is
deleted or overwritten). The commands run through a warm fork server (helpers.cli_server): separate processes,
without ten seconds of imports each.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import yaml

from conftest import REPO
from helpers.cli_server import CliServer

TRAINER = {"max_steps": 1, "logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
           "enable_model_summary": False}


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))


def fit_config(tmp: Path, data: Optional[dict] = None, model: str = "toy:tiny", name: str = "fit.yaml") -> None:
    data = data or {"class_path": "immunize.datamodules.SFTData",
                    "init_args": {"train": [{"kind": "toy", "part": "benign", "limit": 8}], "batch_size": 2}}
    _write(tmp / name, {"model": {"class_path": "immunize.lightning_modules.SFT", "init_args": {"model": model}}, "data": data,
                        "trainer": TRAINER})


def eval_config(tmp: Path) -> None:
    _write(tmp / "eval.yaml", {"model": {"class_path": "immunize.lightning_modules.CausalLMModule",
                                         "init_args": {"model": "toy:tiny"}},
                               "data": {"class_path": "immunize.datamodules.EvalData",
                                        "init_args": {"n_harmful_per_category": 1, "n_per_task": 2}},
                               "trainer": {"logger": False, "enable_progress_bar": False}})


def sft_on(kind: str, path: str) -> dict:
    return {"class_path": "immunize.datamodules.SFTData", "init_args": {"train": [{"kind": kind, "path": path}], "batch_size": 2}}


def generations(tmp: Path, text) -> None:
    _write(tmp / "gens.jsonl", text)


def harmful_row(**extra) -> str:
    return json.dumps({"kind": "harmful", "prompt": "how do I x", "answer": "Sure. Step 1: x", **extra}) + "\n"


def damaged_cache(tmp: Path) -> None:
    from immunize.judges.command import cache_path, spec_hash

    generations(tmp, harmful_row())
    spec = {"name": "keyword"}
    path = cache_path(tmp / "out", "kw")
    _write(path, json.dumps({"spec_hash": spec_hash(spec), "label": "kw", "spec": spec}) + "\n"
           + json.dumps({"score": 1.0, "output": None}) + "\n")


def fake_gguf(tmp: Path, name: str = "x.gguf") -> None:
    _write(tmp / name, b"GGUF" + b"\0" * 60)


def truncated_gguf(tmp: Path) -> None:
    from gguf_writer import write_tiny_llama_gguf

    write_tiny_llama_gguf(tmp / "whole.gguf", seed=0)
    data = (tmp / "whole.gguf").read_bytes()
    _write(tmp / "cut.gguf", data[: len(data) // 2])
    (tmp / "whole.gguf").unlink()


def foreign_folder(tmp: Path, name: str) -> None:
    _write(tmp / name / "old_run" / "log.txt", "a week of training logs\n")
    _write(tmp / name / "results.json", "{}\n")


def bad_model_dir(tmp: Path) -> None:
    from immunize.datamodules.toy.tokenizer import build_toy_tokenizer

    build_toy_tokenizer().save_pretrained(tmp / "model")
    _write(tmp / "model" / "config.json", "{not json")
    _write(tmp / "model" / "model.safetensors", b"")
    fit_config(tmp, model="model")


@dataclass
class Case:
    """One bad input: files to create in the working folder, the command, and what its one line must say."""

    id: str
    argv: list[str]
    needles: list[str]
    setup: Callable[[Path], None] = lambda tmp: None
    files: dict = field(default_factory=dict)


def _fit(*extra: str) -> list[str]:
    return ["fit", "--config", "fit.yaml", *extra]


def _bench(*extra: str) -> list[str]:
    return ["bench", "--dry_run", "true", "--out", "bench_out", "--wandb.enabled", "false", *extra]


def _judges(*extra: str) -> list[str]:
    return ["judges", "gens.jsonl", "--out", "out", *extra]


MIX = {"class_path": "immunize.datamodules.HarmfulMix",
       "init_args": {"benign": {"kind": "toy", "part": "benign"}, "harmful": {"kind": "toy", "part": "harmful"},
                     "n": 100, "p": 0.004, "batch_size": 2}}

CASES = [
    # output folders: nothing immunize did not write is replaced
    Case("export_dir_foreign", _fit("--export_dir", "runs"), ["--export_dir", "did not write"],
         lambda t: (fit_config(t), foreign_folder(t, "runs"))),
    Case("export_dir_cwd", _fit("--export_dir", "."), ["--export_dir", "current folder"], fit_config),
    Case("export_dir_parent", _fit("--export_dir", ".."), ["--export_dir", "current folder"], fit_config),
    Case("export_dir_root", _fit("--export_dir", "/"), ["--export_dir", "filesystem root"], fit_config),
    Case("export_dir_home", _fit("--export_dir", "home"), ["--export_dir", "home folder"], fit_config),
    Case("export_dir_file", _fit("--export_dir", "notes.txt"), ["--export_dir", "is a file"],
         lambda t: (fit_config(t), _write(t / "notes.txt", "my notes\n"))),
    Case("import_gguf_into_cwd", ["import-gguf", "x.gguf", "."], ["OUT_DIR", "current folder"],
         lambda t: (fake_gguf(t), _write(t / "notes.txt", "my notes\n"))),
    Case("import_gguf_foreign", ["import-gguf", "x.gguf", "runs"], ["OUT_DIR", "did not write"],
         lambda t: (fake_gguf(t), foreign_folder(t, "runs"))),
    Case("import_gguf_text_file", ["import-gguf", "notes.txt", "out"], ["notes.txt", "not a GGUF file"],
         lambda t: _write(t / "notes.txt", "my notes\n")),
    Case("import_gguf_truncated", ["import-gguf", "cut.gguf", "out"], ["cut.gguf", "truncated"], truncated_gguf),
    # counts, steps and sizes
    Case("max_steps_0", _fit("--trainer.max_steps", "0", "--export_dir", "out"), ["trainer.max_steps", "> 0"],
         fit_config),
    Case("max_steps_negative", _fit("--trainer.max_steps", "-5"), ["trainer.max_steps", "-1"], fit_config),
    Case("max_epochs_0", _fit("--trainer.max_epochs", "0"), ["trainer.max_epochs", ">= 1"], fit_config),
    Case("no_training_sources", _fit("--data.init_args.train", "[]"), ["data.train", "at least one source"],
         fit_config),
    Case("no_optimizer_step", _fit("--trainer.limit_train_batches", "0", "--export_dir", "out"),
         ["without a single optimizer step", "nothing is exported"], fit_config),
    Case("batch_size_0", _fit("--data.init_args.batch_size", "0"), ["data.batch_size", ">= 1"], fit_config),
    Case("source_limit_negative", _fit("--data.init_args.train", "[{kind: toy, part: benign, limit: -1}]"),
         ["limit", ">= 0"], fit_config),
    Case("empty_toy_source", _fit("--data.init_args.train", "[{kind: toy, part: benign, limit: 0}]"),
         ["no records", "limit 0"], fit_config),
    Case("empty_data_file", _fit(), ["empty.jsonl", "empty"],
         lambda t: (_write(t / "empty.jsonl", ""), fit_config(t, sft_on("alpaca", "empty.jsonl")))),
    Case("missing_dataset_field", _fit(), ["sst2.jsonl", "sentence"],
         lambda t: (_write(t / "sst2.jsonl", json.dumps({"text": "a fine movie", "label": 1}) + "\n"),
                    fit_config(t, sft_on("sst2", "sst2.jsonl")))),
    Case("alpaca_null_output", _fit(), ["alpaca.jsonl", "row 2", "'output'"],
         lambda t: (_write(t / "alpaca.jsonl", json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n"
                           + json.dumps({"instruction": "c", "input": "", "output": None}) + "\n"),
                    fit_config(t, sft_on("alpaca", "alpaca.jsonl")))),
    Case("mix_rounds_to_no_harm", _fit(), ["p=0.004", "n=100", "0 harmful"], lambda t: fit_config(t, MIX)),
    Case("mix_ratio_out_of_range", _fit("--data.init_args.p", "1.5"), ["p must be in [0, 1]", "1.5"],
         lambda t: fit_config(t, MIX)),
    Case("lr_not_positive", _fit("--model.init_args.lr", "0"), ["learning rate", "model.lr"], fit_config),
    Case("warmup_ratio_1", _fit("--model.init_args.warmup_ratio", "1.0"), ["warmup_ratio", "[0, 1)"], fit_config),
    Case("lora_rank_0", _fit("--model.init_args.lora", "{r: 0}"), ["lora.r", ">= 1"], fit_config),
    Case("model_path_missing", _fit(), ["./no/such/model", "does not exist"],
         lambda t: fit_config(t, model="./no/such/model")),
    Case("model_config_not_json", _fit(), ["config.json", "not readable JSON"], bad_model_dir),
    Case("unknown_config_key", _fit("--model.init_args.learning_rate", "0.1"), ["learning_rate"], fit_config),
    Case("nan_loss", _fit("--model.init_args.lr", "1e30", "--trainer.max_steps", "5"), ["training loss", "model.lr"],
         lambda t: fit_config(t, {"class_path": "immunize.datamodules.SFTData", "init_args": {
             "train": [{"kind": "toy", "part": "benign", "limit": 8}], "batch_size": 2}})),
    Case("test_max_new_tokens_0", ["test", "--config", "eval.yaml", "--model.init_args.max_new_tokens", "0"],
         ["max_new_tokens", ">= 1"], eval_config),
    Case("test_n_per_task_negative", ["test", "--config", "eval.yaml", "--data.init_args.n_per_task", "-1"],
         ["n_per_task", ">= 0"], eval_config),
    Case("test_judge_phrases_string", ["test", "--config", "eval.yaml", "--model.init_args.judge",
                                       "{name: keyword, refusal_phrases: i cannot}"],
         ["refusal_phrases", "list"], eval_config),
    # the bench: checked before any cell runs
    Case("bench_no_seeds", _bench("--seeds", "[]"), ["seeds is empty"]),
    Case("bench_n_per_task_negative", _bench("--eval.n_per_task", "-1"), ["eval.n_per_task", ">= 0"]),
    Case("bench_max_new_tokens_0", _bench("--eval.max_new_tokens", "0"), ["eval.max_new_tokens", ">= 1"]),
    Case("bench_log_every_0", _bench("--trainer.log_every_n_steps", "0"), ["trainer.log_every_n_steps", ">= 1"]),
    Case("bench_threshold", _bench("--report.threshold", "150"), ["report.threshold", "[0.0, 100.0]"]),
    Case("bench_mix_rounding", _bench("--finetune.ratios", "[0.001]"), ["p=0.001", "0 harmful"]),
    Case("bench_attack_lr", _bench("--attack.lrs", "[0]"), ["attack.lrs", "> 0"]),
    Case("bench_search_space", _bench("--attack.search", "{trials: 4, space: {samples: [0, 100, linear]}}"),
         ["attack.search.space.samples", ">= 1"]),
    Case("bench_search_trials", _bench("--attack.search", "{trials: 0}"), ["attack.search.trials", ">= 1"]),
    Case("bench_plan_out_file", ["bench", "--plan", "--out", "notes.txt"], ["--out", "is a file"],
         lambda t: _write(t / "notes.txt", "my notes\n")),
    Case("bench_out_foreign", ["bench", "--plan", "--out", "runs"], ["--out", "did not write"],
         lambda t: foreign_folder(t, "runs")),
    Case("bench_slurm_without_slurm", _bench("--launcher", "slurm"), ["sbatch", "--launcher local"]),
    Case("bench_unknown_field", _bench("--eval.n_per_tsk", "3"), ["n_per_tsk"]),
    # immunize judges
    Case("judges_rows_are_lists", _judges("--judge", "keyword"), ["gens.jsonl:1", "not an object"],
         lambda t: generations(t, "[1, 2]\n")),
    Case("judges_not_utf8", _judges("--judge", "keyword"), ["gens.jsonl", "not UTF-8"],
         lambda t: generations(t, b"\xff\xfe{}\n")),
    Case("judges_recorded_not_a_number", _judges("--judge", "recorded", "--judge", "keyword"),
         ["gens.jsonl:1", "judge_score 'high'"], lambda t: generations(t, harmful_row(judge_score="high"))),
    Case("judges_cache_row_without_key", _judges("--judge", "{name: keyword, label: kw}"),
         ["score cache", "damaged", "line 2"], damaged_cache),
    Case("judges_phrases_string", _judges("--judge", "{name: keyword, refusal_phrases: i cannot}"),
         ["refusal_phrases", "list"], lambda t: generations(t, harmful_row())),
    Case("judges_out_foreign", ["judges", "gens.jsonl", "--out", "runs", "--judge", "keyword"],
         ["--out", "did not write"], lambda t: (generations(t, harmful_row()), foreign_folder(t, "runs"))),
    Case("judges_unknown_option", _judges("--judges", "keyword"), ["unrecognized arguments"],
         lambda t: generations(t, harmful_row())),
]


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (what a bad command must leave as it was)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_case(server: CliServer, case: Case, tmp: Path):
    """(result, files before, files after) of one case in a fresh working folder `tmp` (its own HOME inside)."""
    (tmp / "home").mkdir(parents=True)
    _write(tmp / "home" / "keep.txt", "a file in the home folder\n")
    case.setup(tmp)
    argv = [str(tmp / "home") if a == "home" else a for a in case.argv]
    before = snapshot(tmp)
    result = server.run(*argv, cwd=tmp, env={"HOME": str(tmp / "home")}, timeout=300)
    return result, before, snapshot(tmp) if tmp.exists() else {}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(cli_server, tmp_path, case):
    result, before, after = run_case(cli_server, case, tmp_path / "work")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("immunize: error: "), result.stderr[-3000:]
    for needle in case.needles:
        assert needle in lines[0], lines[0]
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"files changed or removed: {changed}"


@pytest.mark.parametrize("argv", [["fit", "--no_such_key", "1"], ["bench", "--seeds", "[]"],
                                  ["import-gguf", "missing.gguf", "out"]])
def test_one_line_in_a_fresh_interpreter(tmp_path, argv):
    """The same contract from a real `python -m immunize` start (warnings printed at import time included)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, "-m", "immunize", *argv], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("immunize: error: "), result.stderr
