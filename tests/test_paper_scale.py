"""The papers' protocols at real scale (configs/bench/seam_paper.yaml, panacea_paper.yaml): their plans at full scale,
and `--shrink`, which runs the same configs on CPU with a tiny model of the same architecture and local files."""
import json

import pytest

from conftest import REPO, run_cli
from immunize.bench import shrink as shrinking
from immunize.bench.schema import parse
from immunize.bench.validate import validate

SEAM = REPO / "configs" / "bench" / "seam_paper.yaml"
PANACEA = REPO / "configs" / "bench" / "panacea_paper.yaml"
SEAM_LRS = ["2e-5", "5e-5", "8e-5", "1e-4", "2e-4"]
RATIOS = ["0.05", "0.1", "0.2"]


def _plan(config, tmp_path, *args):
    bench, _ = parse(["--config", str(config), "--out", str(tmp_path / "out"), *args])
    return bench, validate(bench)


def _resources(cell):
    t = (cell if isinstance(cell, dict) else cell.config)["trainer"]
    strategy = t.get("strategy")
    return t.get("accelerator"), t.get("devices"), strategy.get("class_path") if isinstance(strategy, dict) else strategy


def test_seam_paper_plan_at_full_scale(tmp_path):
    bench, plan = _plan(SEAM, tmp_path)
    cells = {c.label: c for c in plan.cells if c.kind != "judge"}
    attacks = [f"attack {d} lr={lr}" for lr in SEAM_LRS for d in ("undefended", "seam")]
    assert list(cells) == ["defense seam", "eval undefended (no attack)", "eval seam (no attack)",
                           *[x for a in attacks for x in (a, f"eval {a}")]]
    assert bench.model.source == "meta-llama/Llama-2-7b-chat-hf"
    defense = cells["defense seam"]
    assert _resources(defense) == ("gpu", 8, "immunize.strategies.FSDP2")
    assert defense.config["trainer"]["precision"] == "bf16-mixed"
    args = defense.config["model"]["init_args"]
    assert (args["alpha"], args["beta"], args["eps"], args["lr"]) == (1.0, 0.01, 1e-3, 2e-5)
    attack = cells["attack seam lr=8e-5"]
    assert _resources(attack) == ("gpu", 4, "immunize.strategies.FSDP2")
    data = attack.config["data"]["init_args"]
    # the reference attack: the first 1000 of SEAM's own pairs (harmful answers), loss on every position
    assert data["train"][0]["path"] == "data/beavertails_with_refusals_30k_train.json"
    assert data["train"][0]["limit"] == 1000 and data["pairs_use"] == "harmful" and data["loss_on"] == "all"
    assert attack.config["model"]["init_args"]["lr"] == 8e-5
    ev = cells["eval seam (no attack)"].config
    assert _resources(ev)[:2] == ("gpu", 1)
    assert ev["model"]["init_args"]["judge"]["name"] == "deberta_harmful_qa"
    assert ev["model"]["init_args"]["lm_eval"]["tasks"] == ["mmlu", "truthfulqa_mc2", "arc_easy", "arc_challenge",
                                                            "hellaswag"]
    assert ev["model"]["init_args"]["max_new_tokens"] == 50
    judged = [c for c in plan.cells if c.kind == "judge"]  # beaver-dam on each evaluated model, on its GPU in bf16
    assert [c.input.label for c in judged] == [label for label in cells if label.startswith("eval ")]
    assert judged[0].config["judge"] == {"name": "beaver_dam", "model": "PKU-Alignment/beaver-dam-7b",
                                         "device": "cuda", "dtype": "bfloat16"}
    assert _resources(judged[0])[:2] == ("gpu", 1)


def test_panacea_paper_plan_at_full_scale(tmp_path):
    bench, plan = _plan(PANACEA, tmp_path)
    labels = [c.label for c in plan.cells if c.kind != "judge"]
    tunes = [f"finetune {d} p={p}" for d in ("sft", "panacea", "random") for p in RATIOS]
    assert labels == ["align", "eval undefended (no attack)", *[x for t in tunes for x in (t, f"eval {t}")]]
    cells = {c.label: c for c in plan.cells if c.kind != "judge"}
    assert bench.model.source == "meta-llama/Llama-2-7b-hf"
    assert cells["align"].config["model"]["init_args"]["lora"]["r"] == 32
    panacea = cells["finetune panacea p=0.1"].config
    callbacks = [cb["class_path"] for cb in panacea["trainer"]["callbacks"]]
    assert callbacks == ["immunize.callbacks.Panacea"]
    assert panacea["trainer"]["callbacks"][0]["init_args"]["rho"] == 1.0
    assert "callbacks" not in cells["finetune sft p=0.1"].config["trainer"]
    assert cells["finetune random p=0.2"].config["data"]["init_args"]["p"] == 0.2
    ev = cells["eval finetune panacea p=0.1"].config["model"]["init_args"]
    assert ev["judge"] == {"name": "beaver_dam", "model": "PKU-Alignment/beaver-dam-7b"} and ev["max_new_tokens"] == 512
    assert all(_resources(c)[:2] == ("gpu", 1) for c in plan.cells)


def test_plan_command_at_full_scale_lists_the_cells(tmp_path):
    run = run_cli("bench", "--config", str(SEAM), "--plan", "--out", str(tmp_path / "out"), cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    graph = json.loads((tmp_path / "out" / "plan.json").read_text())["cells"]
    assert len(graph) == 35 and sum(r["kind"] == "fit" for r in graph) == 11
    assert "(defense-" in run.stdout and "gpu x8" in run.stdout and "gpu x4" in run.stdout
    assert ("plan: 35 cells (10 fits on gpu x4; 1 fits on gpu x8; 12 judge runs (eval.judges) on gpu x1; 12 evals on "
            "gpu x1); 11 exported models") in run.stdout
    # the estimate: benchmarks/memory.py's prediction per fit, its hours, and the exports' disk with and without models
    cost = json.loads((tmp_path / "out" / "plan.json").read_text())["cost"]
    fits = {r["label"]: r for r in cost["fits"]}
    seam, attack = fits["defense seam"], fits["attack seam lr=1e-4"]
    assert seam["method"] == "seam" and seam["gpus"] == 8 and seam["strategy"] == "fsdp" and seam["steps"] == 500
    assert attack["method"] == "sft" and attack["gpus"] == 4 and attack["steps"] == 250
    assert 6.7e9 < seam["params"] < 6.8e9 and seam["export_bytes"] == 2 * seam["params"]  # bf16 export under bf16-mixed
    assert 20 < seam["peak_gib"] < 40 and 20 < attack["peak_gib"] < 40
    assert seam["gpu_hours"] > 5 * attack["gpu_hours"] > 0
    assert cost["disk_keep_models_bytes"] == 11 * seam["export_bytes"]
    assert cost["disk_no_keep_models_peak_bytes"] == 2 * seam["export_bytes"]  # SEAM's model and one attacked model
    assert "cost defense seam: seam, 6.74B params on 8 GPU(s) (fsdp)" in run.stdout
    assert "GPU-hours of fits; largest memory" in run.stdout and "at most at once with false" in run.stdout


def test_shrink_swaps_sources_sizes_and_devices_only(tmp_path):
    bench, _ = parse(["--config", str(SEAM), "--out", str(tmp_path / "out")])
    full = validate(bench)
    bench, _ = parse(["--config", str(SEAM), "--out", str(tmp_path / "out")])
    shrink = shrinking.apply(bench, ["--out", str(tmp_path / "out")])
    small = validate(bench, shrink.cell)
    assert [c.label for c in small.cells] == [c.label for c in full.cells]
    for big, tiny in zip(full.cells, small.cells):
        if tiny.kind == "judge":  # the judge's class stays, its model is a tiny one on the CPU
            assert tiny.config["judge"]["name"] == big.config["judge"]["name"]
            assert tiny.config["judge"]["model"].startswith(str(tmp_path)) and "device" not in tiny.config["judge"]
            assert tiny.config["judge"]["dtype"] == big.config["judge"]["dtype"] == "bfloat16"  # the eval's precision
            continue
        # same classes, templates, precision, strategy class, callbacks and judge preset: only sizes/sources/devices
        for section in ("model", "data"):
            assert tiny.config[section]["class_path"] == big.config[section]["class_path"]
        assert tiny.config["data"]["init_args"].get("template") == big.config["data"]["init_args"].get("template")
        assert tiny.config["trainer"].get("precision") == big.config["trainer"].get("precision")
        assert tiny.config["trainer"].get("strategy") == big.config["trainer"].get("strategy")
        assert tiny.config["trainer"]["accelerator"] == "cpu"
        sharded = "FSDP2" in str(big.config["trainer"].get("strategy"))
        assert tiny.config["trainer"]["devices"] == (2 if sharded else 1)
    model = tmp_path / "out" / "shrink" / "model"
    assert bench.model.source == str(model) and (model / "config.json").is_file()
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 2
    cells = {c.label: c for c in small.cells}
    ev = cells["eval seam (no attack)"].config
    judge = ev["model"]["init_args"]["judge"]
    assert judge["name"] == "deberta_harmful_qa" and judge["model"].startswith(str(tmp_path))
    judge_config = json.loads((tmp_path / "out" / "shrink" / "judge_deberta_harmful_qa" / "config.json").read_text())
    assert judge_config["architectures"] == ["DebertaV2ForSequenceClassification"]
    assert ev["model"]["init_args"]["lm_eval"]["tasks"] == ["toy_mc_sentiment"]
    sources = ev["data"]["init_args"]["sources"]
    assert all(s["path"].endswith(".jsonl") and (REPO / "configs" / "smollm2" / "data").as_posix() in s["path"]
               for s in sources)
    attack = cells["attack seam lr=8e-5"].config
    assert attack["data"]["init_args"]["train"][0]["path"].endswith("beavertails_align.jsonl")  # SEAM's own pairs
    assert attack["trainer"]["max_steps"] <= shrinking.MAX_STEPS and attack["trainer"]["max_epochs"] == 1
    assert any(k.startswith("model.source") for k in shrink.replaced)
    # a second shrink reuses the built models: the same cells (same names)
    bench2, _ = parse(["--config", str(SEAM), "--out", str(tmp_path / "out")])
    again = validate(bench2, shrinking.apply(bench2, ["--out", str(tmp_path / "out")]).cell)
    assert [c.digest for c in again.cells] == [c.digest for c in small.cells]


def test_shrink_of_a_toy_config_is_one_clear_error(tmp_path):
    run = run_cli("bench", "--shrink", "--out", str(tmp_path / "out"), cwd=REPO, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("immunize: error: --shrink: model.source is a toy preset")


def test_shrink_names_a_data_kind_it_has_no_file_for(tmp_path):
    bench, _ = parse(["--config", str(PANACEA), "--out", str(tmp_path / "out"),
                      "--finetune.data", "{init_args: {benign: {kind: gsm8k, part: benign, path: openai/gsm8k}}}"])
    shrink = shrinking.apply(bench, ["--out"])
    with pytest.raises(shrinking.UserError, match="no shipped local file for 'gsm8k'"):
        validate(bench, shrink.cell)


SHRUNK_LRS = [SEAM_LRS[0], SEAM_LRS[-1]]  # the grid's ends: every lr runs the same code path, so CI runs two of five
SHRUNK_RATIO = "0.1"  # and one of Panacea's three ratios (each runs the same three fine-tunes and evals)


def _run_shrunk(config, tmp_path, *overrides):
    out = tmp_path / "out"
    run = run_cli("bench", "--config", str(config), "--shrink", "--out", str(out), "--progress", "lines",
                  "--wandb.enabled", "false", *overrides, cwd=REPO, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "immunize bench --shrink replaced" in run.stderr
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    return results, report


@pytest.mark.slow
def test_seam_paper_shrunk_end_to_end(tmp_path):
    results, report = _run_shrunk(SEAM, tmp_path, "--attack.lrs", f"[{', '.join(SHRUNK_LRS)}]")
    rows = {(m["defense"], m["stage"], (m.get("attack") or {}).get("lr")) for m in results["results"]}
    expected = {(d, "defended", None) for d in ("undefended", "seam")} | \
        {(d, "attack", float(lr)) for d in ("undefended", "seam") for lr in SHRUNK_LRS}
    assert rows == expected
    assert all(m["harmful_score"] is not None and m["capability_lm_eval"] is not None for m in results["results"])
    assert "seam" in report and "lr=2e-4" in report
    _judged_by(results, report, "beaver_dam", "deberta_harmful_qa (eval)")


@pytest.mark.slow
def test_panacea_paper_shrunk_end_to_end(tmp_path):
    results, report = _run_shrunk(PANACEA, tmp_path, "--finetune.ratios", f"[{SHRUNK_RATIO}]")
    rows = {(m["defense"], m["stage"], (m.get("finetune") or {}).get("ratio")) for m in results["results"]}
    expected = {("undefended", "defended", None)} | \
        {(d, "finetune", float(SHRUNK_RATIO)) for d in ("sft", "panacea", "random")}
    assert rows == expected
    assert all(m["harmful_score"] is not None for m in results["results"])
    assert "panacea" in report
    _judged_by(results, report, "deberta_harmful_qa", "beaver_dam (eval)")


def _judged_by(results, report, label, own):
    """eval.judges ran on every evaluated model beside the eval's own judge (tiny stand-ins of both published
    classes under the shrink) and the report compares them."""
    assert results["judges"]["labels"] == [label] and results["judges"]["eval_judge"] == own
    assert all(r["judges"][label]["harmful_score"] is not None for r in results["rows"])
    assert results["judges"]["agreement"]["items"] > 0 and "## Judges: pairwise agreement" in report
