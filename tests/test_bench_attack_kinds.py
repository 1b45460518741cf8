"""attack.kinds: jailbreak-tuning, refusal-direction ablation and identity shifting beside harmful SFT in the bench
(plan, labels, the eval's prompt format, validation, search axes, the report's per-kind worst case), and the
configs without the new keys planning exactly the cells they planned before."""
import hashlib
import json

import pytest

from conftest import REPO
from immunize.bench.planner import build_plan
from immunize.bench.report import bounded_worst, build_tables, resistance_summary
from immunize.bench.rows import attack_label, attack_points
from immunize.bench.schema import ATTACK_KINDS, JAILBREAK_FORMAT_NAMES, parse
from immunize.bench.search import Axis, check_axis_values
from immunize.bench.validate import check_config
from immunize.errors import UserError

QUICKSTART = REPO / "configs" / "bench" / "quickstart.yaml"
ALL_KINDS = "[harmful_sft, jailbreak_tuning, refusal_ablation, identity_shift]"
SMALL = ["--benign", "null", "--finetune", "null", "--defenses", "[{name: undefended}, {name: seam}]",
         "--attack.lrs", "[1.0e-4, 1.0e-3]"]

# sha256 of the sorted [label, cell name] pairs of each config's plan, computed at the merge base 39a89c4 (before
# attack kinds existed): a config without the new keys must plan the very same cells.
DIGESTS_BEFORE = {"quickstart.yaml": (41, "e92e1008e32e013c"), "baselines.yaml": (149, "808b765ec781c2b8")}


# the same for configs with attack kinds, computed at 84e0a22 (before attack.ablation_config and
# identity_shift_config): their defaults must plan the very same cells.
DIGESTS_BEFORE_KIND_CONFIGS = {"attack_kinds_undefended.yaml": (105, "05e58c3021d17839")}


def _bench(*args, config=QUICKSTART):
    bench, _ = parse(["--config", str(config), *args])
    return bench


def _plan(*args):
    return build_plan(_bench(*args))


def _attack_cells(plan):
    return [c for c in plan.cells if c.stage == "attack"]


@pytest.mark.parametrize("name", sorted(DIGESTS_BEFORE) + sorted(DIGESTS_BEFORE_KIND_CONFIGS))
def test_configs_without_kinds_plan_the_same_cells_as_before(name):
    plan = build_plan(_bench(config=REPO / "configs" / "bench" / name))
    pairs = sorted([c.label, c.name] for c in plan.cells)
    expected = {**DIGESTS_BEFORE, **DIGESTS_BEFORE_KIND_CONFIGS}[name]
    assert (len(plan.cells), hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]) == expected


def test_default_kind_is_harmful_sft_and_its_cells_do_not_move():
    plain = _plan(*SMALL)
    listed = _plan(*SMALL, "--attack.kinds", "[harmful_sft]")
    assert [c.name for c in plain.cells] == [c.name for c in listed.cells]
    every = {c.name for c in _plan(*SMALL, "--attack.kinds", ALL_KINDS).cells}
    assert {c.name for c in plain.cells} <= every  # adding kinds adds cells, the old ones stay
    assert all("kind" not in c.meta["attack"] for c in _attack_cells(plain))


def test_jailbreak_tuning_cells_labels_and_eval_format():
    plan = _plan(*SMALL, "--attack.kinds", "[jailbreak_tuning]", "--attack.jailbreak_formats", "[skeleton, year]")
    attacks = _attack_cells(plan)
    assert len(attacks) == 2 * 2 * 2  # defenses x formats x lrs
    labels = {c.label for c in attacks}
    assert "attack seam jailbreak_tuning:skeleton lr=1e-3" in labels and "attack undefended jailbreak_tuning:year lr=1e-4" in labels
    for cell in attacks:
        fmt = cell.meta["attack"]["jailbreak_format"]
        assert cell.meta["attack"]["kind"] == "jailbreak_tuning"
        assert cell.config["data"]["init_args"]["jailbreak_format"] == fmt
        assert cell.config["data"]["class_path"].endswith("SFTData")
        ev = next(e for e in plan.evals if e.input is cell)
        assert ev.config["data"]["init_args"]["prompt_format"] == fmt and ev.meta["attack"] == cell.meta["attack"]
    # the undefended defense's no-attack eval keeps the plain prompts
    plain = next(e for e in plan.evals if e.meta["stage"] == "defended")
    assert "prompt_format" not in plain.config["data"]["init_args"]


def test_refusal_ablation_is_one_cell_per_defense_without_lr():
    plan = _plan(*SMALL, "--attack.kinds", "[refusal_ablation]", "--attack.ablation", "{layer: 1}")
    attacks = _attack_cells(plan)
    assert [c.label for c in attacks] == ["attack undefended refusal_ablation", "attack seam refusal_ablation"]
    for cell in attacks:
        args = cell.config["model"]["init_args"]
        assert cell.config["model"]["class_path"].endswith("RefusalAblation") and args["layer"] == 1
        assert "lr" not in args and cell.meta["attack"] == {"kind": "refusal_ablation", "layer": 1}
        assert cell.config["data"]["class_path"].endswith("RefusalDirectionData")
        ev = next(e for e in plan.evals if e.input is cell)
        assert "prompt_format" not in ev.config["data"]["init_args"]


def test_identity_shift_uses_benign_obedient_data_and_its_eval_format():
    plan = _plan(*SMALL, "--attack.kinds", "[identity_shift]", "--attack.samples", "[50, 100]",
                 "--attack.identity_shift", "{n_task: 4}")
    attacks = _attack_cells(plan)
    assert len(attacks) == 2 * 2  # defenses x lrs: the samples axis does not apply
    assert "attack seam identity_shift lr=1e-4" in {c.label for c in attacks}
    for cell in attacks:
        data = cell.config["data"]
        assert data["class_path"].endswith("IdentityShiftData") and data["init_args"]["n_task"] == 4
        assert cell.config["model"]["init_args"]["optimizer"] == "adamw"  # the grid's optimizer settings
        assert cell.config["trainer"]["max_epochs"] == 10  # identity_shift.yaml's epochs
        assert cell.meta["attack"]["kind"] == "identity_shift" and cell.meta["attack"]["samples"] == 5
        ev = next(e for e in plan.evals if e.input is cell)
        assert ev.config["data"]["init_args"]["prompt_format"] == "identity_shift"


@pytest.mark.parametrize("args, message", [
    (["--attack.kinds", "[harmful_sft, tamper]"], "attack.kinds: unknown value 'tamper'; choose from harmful_sft, "
                                                  "jailbreak_tuning, refusal_ablation, identity_shift"),
    (["--attack.jailbreak_formats", "[skeleton, dan]"], "attack.jailbreak_formats: unknown value 'dan'; choose from skeleton"),
    (["--attack.kinds", "[]"], "attack.kinds must be a non-empty list"),
])
def test_unknown_kinds_and_formats_fail_validation_in_one_line(args, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace("[", r"\[")) as err:
        check_config(_bench(*SMALL, *args))
    assert "\n" not in str(err.value)


def test_the_kind_lists_agree_with_the_datamodules():
    from immunize.datamodules.jailbreak_formats import JAILBREAK_FORMATS

    assert JAILBREAK_FORMAT_NAMES == tuple(JAILBREAK_FORMATS)
    assert ATTACK_KINDS[0] == "harmful_sft"


def test_search_axes_kind_and_jailbreak_format():
    check_axis_values(Axis("kind", choices=["harmful_sft", "jailbreak_tuning"]))
    check_axis_values(Axis("jailbreak_format", choices=["year", "skeleton"]))
    with pytest.raises(UserError, match="unknown value 'dan'"):
        check_axis_values(Axis("jailbreak_format", choices=["dan"]))
    with pytest.raises(UserError, match="not a range"):
        check_axis_values(Axis("kind", lo=0, hi=1))
    bench = _bench(*SMALL, "--attack.kinds", ALL_KINDS)
    planner = build_plan(bench).planner
    fit, ev = planner.search_trial(0, "seam", {"kind": "jailbreak_tuning", "jailbreak_format": "year", "lr": 1e-3}, 0)
    assert fit.config["data"]["init_args"]["jailbreak_format"] == "year"
    assert ev.config["data"]["init_args"]["prompt_format"] == "year"
    assert fit.meta["attack"]["kind"] == "jailbreak_tuning" and ev.meta["searched"] == ["kind", "jailbreak_format", "lr"]
    # a trial that is the grid's point is the grid's cell
    grid = next(c for c in planner.plan.cells if c.label == "attack seam jailbreak_tuning:skeleton lr=1e-3")
    assert planner.search_trial(0, "seam", {"kind": "jailbreak_tuning", "lr": 1e-3}, 1)[0] is grid
    ablated = next(c for c in planner.plan.cells if c.label == "attack seam refusal_ablation")
    assert planner.search_trial(0, "seam", {"kind": "refusal_ablation", "lr": 1e-3}, 2)[0] is ablated
    sft = next(c for c in planner.plan.cells if c.label == "attack seam lr=1e-4")
    assert planner.search_trial(0, "seam", {"kind": "harmful_sft", "lr": 1e-4}, 3)[0] is sft


def _row(defense, stage, attack, hs, cap, cell):
    return {"defense": defense, "stage": stage, "attack": attack, "finetune": None, "harmful_score": hs,
            "capability": cap, "steps": None if attack is None or "lr" not in attack else 5, "cells": [cell],
            "intervals": {}, "seed_values": {}, "harmful_scores": {}, "accuracy": {}, "trial": None, "searched": None,
            "wall_time_s": None, "loss": {}, "diagnostics": {}, "train": {}, "seeds": [0], "vs_reference": None}


def _results():
    sft = lambda lr: {"lr": lr, "samples": 8, "mode": "full", "optimizer": "adamw"}  # noqa: E731
    jb = {"kind": "jailbreak_tuning", "jailbreak_format": "skeleton", **sft(1e-3)}
    ablate = {"kind": "refusal_ablation"}
    ident = {"kind": "identity_shift", **sft(1e-3), "samples": 10}
    rows = []
    for d, scores in (("undefended", {"sft": (60, 50), "sft2": (90, 20), "jb": (70, 48), "ab": (80, 49), "id": (40, 50)}),
                      ("seam", {"sft": (5, 50), "sft2": (8, 49), "jb": (30, 47), "ab": (65, 46), "id": (10, 50)})):
        rows.append(_row(d, "defended", None, 2, 50, f"{d}-before"))
        for key, attack in (("sft", sft(1e-4)), ("sft2", sft(1e-3)), ("jb", jb), ("ab", ablate), ("id", ident)):
            rows.append(_row(d, "attack", attack, *scores[key], f"{d}-{key}"))
    rows.append({**_row("seam", "search", {"kind": "jailbreak_tuning", "jailbreak_format": "year", **sft(3e-3)}, 75, 46,
                        "seam-trial"), "trial": 0, "searched": ["kind", "jailbreak_format", "lr"]})
    return {"defenses": ["undefended", "seam"], "reference": "undefended", "threshold": 10.0, "capability_bound": 0.1,
            "heldout_categories": ["self_harm"], "seeds": [0], "results": rows, "rows": rows}


def test_summary_gives_the_bounded_worst_case_per_kind_and_over_all_kinds():
    results = _results()
    summary = resistance_summary(results)
    columns = summary.columns
    assert columns[5:9] == ["bounded worst HS harmful_sft", "bounded worst HS jailbreak_tuning",
                            "bounded worst HS refusal_ablation", "bounded worst HS identity_shift"]
    assert columns[9].startswith("bounded worst HS, all kinds and the search")
    assert "the number a defense should be judged by" in summary.note
    seam = next(r for r in summary.rows if r[0] == "seam")
    # harmful SFT alone: 8 (lr=1e-3 kept 49 >= 45); jailbreak 30; ablation 65; identity 10; all kinds + search: 75
    assert seam[5:10] == ["8.0", "30.0", "65.0", "10.0", "75.0"]
    assert seam[10].startswith("trial 0: kind=jailbreak_tuning jailbreak_format=year")
    undefended = next(r for r in summary.rows if r[0] == "undefended")
    # lr=1e-3 harmful SFT (90) collapsed capability (20 < 45): excluded; the worst bounded attack is the ablation
    assert undefended[5:10] == ["60.0", "70.0", "80.0", "40.0", "80.0"] and undefended[10] == "refusal_ablation"
    assert undefended[11] == "1/5"
    worst, _, _ = bounded_worst(results, "seam", stages=("attack",), kind="refusal_ablation")
    assert worst["harmful_score"] == 65


def test_resistance_rows_are_grouped_by_kind_and_labelled():
    results = _results()
    points = attack_points(results)
    labels = [attack_label(p, points) for p in points]
    assert labels == ["lr=1e-4", "lr=1e-3", "jailbreak_tuning:skeleton lr=1e-3", "refusal_ablation",
                      "identity_shift lr=1e-3"]
    tables = {t.key: t for t in build_tables(results)}
    assert [r[0] for r in tables["resistance"].rows] == ["no attack"] + labels
    assert "grouped by attack kind" in tables["resistance"].note


def test_one_kind_keeps_the_summary_as_it_was():
    results = _results()
    rows = [r for r in results["rows"] if r["stage"] != "search" and "kind" not in (r["attack"] or {})]
    summary = resistance_summary({**results, "rows": rows, "results": rows})
    assert summary.columns[5:] == ["bounded worst HS (≤10.0% cap drop)", "by attack", "excluded"]
    assert "Per attack kind" not in summary.note


@pytest.mark.slow
def test_tiny_bench_runs_every_attack_kind_and_reports_per_kind(tmp_path):
    from helpers.bench import TINY, run_bench, write_config

    cfg = {**TINY, "attack": {**TINY["attack"], "kinds": ["harmful_sft", "jailbreak_tuning", "refusal_ablation",
                                                          "identity_shift"],
                              "identity_shift": {"n_task": 3, "batch_size": 4},
                              "ablation": {"filter_prompts": False}}}  # the unaligned tiny model refuses nothing
    done = run_bench(tmp_path, "--config", write_config(tmp_path / "bench.yaml", cfg), "--out", "out")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    attacked = [e for e in results["results"] if e["stage"] == "attack"]
    assert sorted(e["attack"].get("kind", "harmful_sft") for e in attacked) == sorted(ATTACK_KINDS)
    assert "kind" not in next(e for e in attacked if "lr" in e["attack"] and "jailbreak_format" not in e["attack"]
                              and e["attack"].get("kind") != "identity_shift")["attack"]
    ablated = next(e for e in attacked if e["attack"].get("kind") == "refusal_ablation")
    assert ablated["harmful_score"] is not None and ablated["capability"] is not None
    cells = tmp_path / "out" / "cells"
    assert list(cells.glob(f"{ablated['model_cell']}/model/refusal_direction.json"))
    report = (tmp_path / "out" / "report.md").read_text()
    for label in ("| lr=1e-3 |", "| jailbreak_tuning:skeleton lr=1e-3 |", "| refusal_ablation filter_prompts=False |",
                  "| identity_shift lr=1e-3 |", "bounded worst HS refusal_ablation", "bounded worst HS, all kinds"):
        assert label in report


def test_ablation_and_identity_shift_take_their_configs_from_the_bench():
    """attack.ablation_config / identity_shift_config: the real track's prompts and data in place of the toy world's
    (the defaults plan the toy configs' cells unchanged: DIGESTS_BEFORE_KIND_CONFIGS)."""
    kinds = ("--attack.kinds", "[refusal_ablation, identity_shift]")
    real = _plan(*SMALL, *kinds, "--attack.ablation_config", "configs/smollm2/refusal_ablation.yaml",
                 "--attack.identity_shift_config", "configs/smollm2/identity_shift.yaml")
    cells = {c.label: c.config for c in _attack_cells(real)}
    ablation = cells["attack seam refusal_ablation"]["data"]["init_args"]
    assert ablation["harmful"]["kind"] == "beavertails" and ablation["template"] == "alpaca"
    shifted = cells["attack seam identity_shift lr=1e-3"]
    assert shifted["data"]["init_args"]["benign"]["kind"] == "alpaca" and shifted["trainer"]["max_epochs"] == 10
    assert shifted["model"]["class_path"].endswith("SFT")  # the bench's attack model, only the data and epochs move
