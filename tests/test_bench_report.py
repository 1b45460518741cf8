"""Report tables are pure functions of results.json: checked here on a known, hand-written results dict."""
import copy

import numpy as np
import pytest

from immunize.bench import report
from immunize.bench.plots import make_plots

CATS = ["animal_abuse", "self_harm", "terrorism,organized_crime"]
HELDOUT = ["self_harm", "terrorism,organized_crime"]


def _entry(defense, stage, hs_by_cat, cap, attack=None, finetune=None, steps=10, acc=None):
    return {"cell": f"eval-{defense}-{stage}", "model_cell": None, "defense": defense, "stage": stage,
            "attack": attack, "finetune": finetune,
            "harmful_score": sum(hs_by_cat) / len(hs_by_cat), "harmful_scores": dict(zip(CATS, hs_by_cat)),
            "capability": cap, "accuracy": acc or {"arithmetic": cap, "sentiment": cap}, "steps": steps,
            "wall_time_s": 1.5, "eval_wall_time_s": 0.5}


def _attack(lr):
    return {"lr": lr, "samples": 200, "mode": "full", "optimizer": "adamw"}


@pytest.fixture
def results():
    return {
        "version": 1, "reference": "undefended", "defenses": ["undefended", "seam"], "finetune_defenses": ["sft", "panacea"],
        "heldout_categories": HELDOUT, "threshold": 10.0,
        "results": [
            _entry("undefended", "defended", [0, 0, 0], 90.0, steps=188),
            _entry("seam", "defended", [0, 0, 0], 84.0, steps=50),
            _entry("undefended", "attack", [90, 60, 30], 64.0, attack=_attack(1e-3)),
            _entry("seam", "attack", [0, 0, 30], 75.0, attack=_attack(1e-3)),
            _entry("undefended", "attack", [60, 90, 90], 53.0, attack=_attack(3e-3)),
            _entry("seam", "attack", [30, 60, 90], 20.0, attack=_attack(3e-3)),
            _entry("undefended", "benign", [0, 0, 0], 98.0, acc={"arithmetic": 92.0}),
            _entry("seam", "benign", [0, 0, 0], 92.0, acc={"arithmetic": 76.0}),
            _entry("sft", "finetune", [90, 90, 90], 88.0, finetune={"ratio": 0.3, "model_from": "undefended"}),
            _entry("sft", "finetune", [80, 90, 100], 88.0, finetune={"ratio": 0.1, "model_from": "undefended"}),
            _entry("panacea", "finetune", [60, 60, 60], 89.0, finetune={"ratio": 0.1, "model_from": "undefended"}),
        ],
    }


def _table(tables, key):
    return next(t for t in tables if t.key == key)


def test_resistance_grid_and_summary(results):
    tables = report.build_tables(results)
    assert [t.key for t in tables] == ["resistance", "window", "resistance_summary", "no_win", "stability", "generalization",
                                       "trainability", "finetune"]
    grid = _table(tables, "resistance")
    assert grid.columns == ["attack", "undefended HS", "undefended cap", "seam HS", "seam cap"]
    assert grid.rows == [["no attack", "0.0", "90.0", "0.0", "84.0"],
                         ["lr=1e-3", "60.0", "64.0", "10.0", "75.0"],
                         ["lr=3e-3", "80.0", "53.0", "60.0", "20.0"]]
    summary = _table(tables, "resistance_summary")
    assert summary.rows[0][:4] == ["undefended", "80.0", "2/2", "58.5"]
    assert summary.rows[1][:4] == ["seam", "60.0", "1/2", "47.5"]  # 10.0 is not above phi = 10


def test_stability_compares_with_reference(results):
    table = _table(report.build_tables(results), "stability")
    assert table.columns[:4] == ["defense", "cap", "Δcap vs undefended", "HS"]
    assert table.rows[0][:3] == ["undefended", "90.0", "+0.0"]
    assert table.rows[1][:3] == ["seam", "84.0", "-6.0"]
    assert table.rows[1][-2:] == ["50", "1.5"]


def test_generalization_from_per_category_scores(results):
    table = _table(report.build_tables(results), "generalization")
    assert table.columns == ["attack", "undefended seen", "undefended held-out", "seam seen", "seam held-out"]
    # lr=1e-3: undefended seen = animal_abuse 90, held-out = mean(60, 30) = 45; seam seen 0, held-out 15
    assert table.rows[1] == ["lr=1e-3", "90.0", "45.0", "0.0", "15.0"]
    assert report.split_harm(results["results"][5], HELDOUT) == (30.0, 75.0)


def test_trainability_and_finetune_tables(results):
    tables = report.build_tables(results)
    train = _table(tables, "trainability")
    assert train.rows[0][:5] == ["undefended", "90.0", "98.0", "+0.0", "0.0"]
    assert train.rows[1][:5] == ["seam", "84.0", "92.0", "-6.0", "0.0"]
    assert "acc arithmetic" in train.columns
    ft = _table(tables, "finetune")
    assert ft.columns == ["p", "sft HS", "sft cap", "panacea HS", "panacea cap"]
    assert ft.rows == [["0.1", "90.0", "88.0", "60.0", "89.0"], ["0.3", "90.0", "88.0", "—", "—"]]


def test_attack_labels_show_only_varying_axes(results):
    res = copy.deepcopy(results)
    res["results"][3]["attack"] = {**_attack(1e-3), "mode": "lora"}
    points = report.attack_points(res)
    assert [report.attack_label(p, points) for p in points] == ["lr=1e-3 full", "lr=1e-3 lora", "lr=3e-3 full"]


def test_tables_skip_missing_stages(results):
    res = {**results, "results": [r for r in results["results"] if r["stage"] == "defended"]}
    assert [t.key for t in report.build_tables(res)] == ["stability", "generalization"]


def test_render_and_plots(results, tmp_path):
    tables = report.build_tables(results)
    images = make_plots(results, tmp_path)
    assert images == {"resistance": ["attack_harmful_score.png", "attack_capability.png"], "finetune": ["finetune_ratio.png"]}
    for names in images.values():
        for name in names:
            assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    text = report.render(results, tables, images)
    for title in ("Resistance", "Stability", "Generalization", "Trainability", "Fine-tuning stage"):
        assert f"## {title}" in text
    assert "![attack_harmful_score.png](attack_harmful_score.png)" in text
    assert "| lr=3e-3 | 80.0 | 53.0 | 60.0 | 20.0 |" in text


def test_attack_window_classifies_each_attack(results):
    window = _table(report.build_tables(results), "window")
    # undefended before attack: cap 90; lr=1e-3: HS 60 but cap 64 < 85 -> above; lr=3e-3 likewise
    assert [row[-1] for row in window.rows] == ["above", "above"]
    res = copy.deepcopy(results)
    res["results"][2]["capability"] = 88.0  # within 5 points of 90 with HS 60 >= 50: inside
    res["results"][4]["harmful_scores"] = {c: 10.0 for c in CATS}
    res["results"][4]["harmful_score"], res["results"][4]["capability"] = 10.0, 89.0  # fails: below
    assert [(report.attack_label(p, report.attack_points(res)), where) for p, _, where in report.window_of(res)] == [
        ("lr=1e-3", "inside"), ("lr=3e-3", "below")]
    assert "Window: lr=1e-3." in _table(report.build_tables(res), "window").note


def test_rows_with_intervals_and_paired_differences(results):
    res = copy.deepcopy(results)
    rows = copy.deepcopy(res["results"])
    for r in rows:
        r["intervals"] = {"harmful_score": [r["harmful_score"] - 5, r["harmful_score"] + 5],
                          "capability": [r["capability"] - 2, r["capability"] + 2]}
        r["vs_reference"] = None
    seam_attacked = rows[3]
    seam_attacked["vs_reference"] = {"reference": "undefended", "harmful_score": [-50.0, -58.0, -42.0],
                                     "capability": [11.0, 8.5, 13.5]}
    rows[1]["diagnostics"], rows[1]["loss"] = {"grad_cosine": -0.25}, {"harmful": 3.2, "arithmetic": 0.5}
    seam_attacked["loss_curve"] = {"steps": [0, 5, 10], "mean": [0.4, 0.9, 1.7]}
    res["rows"] = rows
    tables = report.build_tables(res)
    grid = _table(tables, "resistance")
    assert grid.rows[1] == ["lr=1e-3", "60.0 [55.0, 65.0]", "64.0 [62.0, 66.0]", "10.0 [5.0, 15.0]", "75.0 [73.0, 77.0]"]
    delta = _table(tables, "resistance_delta")
    assert delta.columns == ["attack", "seam ΔHS", "seam Δcap"]
    assert delta.rows[1] == ["lr=1e-3", "-50.0 [-58.0, -42.0]", "+11.0 [+8.5, +13.5]"]
    assert delta.rows[0] == ["no attack", "—", "—"]
    mech = _table(tables, "mechanism")
    seam = next(r for r in mech.rows if r[0] == "seam")
    assert seam[1:4] == ["-0.250", "3.200", "0.500"] and seam[4] == "0.400 → 1.700"


def test_calibration_picks_the_most_resistant_stable_setting(results):
    res = copy.deepcopy(results)
    res["defenses"] = ["undefended", "seam[beta=0]", "seam[beta=1]", "seam[beta=10]"]
    res["results"] = [r for r in res["results"] if r["defense"] != "seam"]
    for name, cap, hs in (("seam[beta=0]", 88.0, 70.0), ("seam[beta=1]", 86.0, 20.0), ("seam[beta=10]", 40.0, 0.0)):
        res["results"].append(_entry(name, "defended", [0, 0, 0], cap))
        res["results"].append(_entry(name, "attack", [hs, hs, hs], 50.0, attack=_attack(1e-3)))
    table = _table(report.build_tables(res), "calibration_seam")
    # beta=10 resists most but loses 50 points before attack (tolerance 5): beta=1 is chosen
    assert [row[0] for row in table.rows if row[-1] == "yes"] == ["seam[beta=1]"]
    assert "Chosen: seam[beta=1]." in table.note
    res["select"] = {"stability_tolerance": 1.0, "finetune_tolerance": 2.0}
    table = _table(report.build_tables(res), "calibration_seam")
    assert [row[0] for row in table.rows if row[-1] == "yes"] == ["seam[beta=0]"] and "no setting" in table.note


def test_seed_spread_shows_each_seed_and_the_range_only_for_several_seeds(results):
    res = copy.deepcopy(results)
    assert not any(t.key == "seed_spread" for t in report.build_tables(res))  # one seed: no spread table
    rows = copy.deepcopy(res["results"])
    for r in rows:
        r["seed_values"] = {"harmful_score": [r["harmful_score"], r["harmful_score"] + 4.0],
                            "capability": [r["capability"], r["capability"] - 7.5]}
    res["rows"], res["seeds"] = rows, [0, 1]
    table = _table(report.build_tables(res), "seed_spread")
    assert table.rows[0] == ["undefended", "no attack", "0.0 / 4.0", "4.0", "90.0 / 82.5", "7.5"]
    assert table.rows[2][:2] == ["undefended", "lr=1e-3"] and table.rows[-1][1] == "fine-tune p=0.1"


def test_bounded_worst_case_counts_only_attacks_that_kept_capability(results):
    results["capability_bound"] = 0.1
    results["results"].append(_entry("undefended", "attack", [40, 40, 40], 85.0, attack=_attack(1e-4)))
    summary = _table(report.build_tables(results), "resistance_summary")
    assert summary.columns[-3:] == ["bounded worst HS (≤10.0% cap drop)", "by attack", "excluded"]
    # undefended (before 90): lr=1e-4 keeps 85 >= 81 (HS 40); lr=1e-3 (64) and 3e-3 (53) are excluded
    assert summary.rows[0][-3:] == ["40.0", "lr=1e-4", "2/3"]
    # seam (before 84, bound 75.6): both attacks dropped capability below it
    assert summary.rows[1][-3:] == ["—", "—", "2/2"]
    results["capability_bound"] = 0.3  # a looser bound admits lr=1e-3 (64 >= 63), not 3e-3 (53)
    assert _table(report.build_tables(results), "resistance_summary").rows[0][-3:] == ["60.0", "lr=1e-3", "1/3"]


def test_attacker_search_table_against_the_grid(results, tmp_path):
    results["capability_bound"] = 0.1
    for trial, hs, cap in ((0, [20, 20, 20], 89.0), (1, [90, 90, 90], 30.0), (2, [70, 70, 70], 82.0)):
        e = _entry("undefended", "search", hs, cap, attack={"lr": 0.00123456, "samples": 400, "mode": "full",
                                                            "optimizer": "adamw", "batch_size": 4})
        results["results"].append({**e, "cell": f"eval-search-{trial}", "trial": trial,
                                   "searched": ["lr", "samples", "batch_size"]})
    results["results"].append(_entry("undefended", "attack", [40, 40, 40], 85.0, attack=_attack(1e-4)))
    tables = report.build_tables(results)
    assert [t.key for t in tables][:5] == ["resistance", "window", "resistance_summary", "no_win", "search"]
    table = _table(tables, "search")
    assert table.columns == ["defense", "trials", "within bound", "best trial", "HS", "cap", "best grid attack",
                             "grid HS", "grid cap"]
    # trial 1 reached HS 90 by wrecking capability (30 < 81): excluded; trial 2 is the best within the bound
    assert table.rows == [["undefended", "3", "2", "trial 2: lr=1.23e-3 samples=400 batch_size=4", "70.0", "82.0",
                           "lr=1e-4", "40.0", "85.0"]]
    summary = _table(tables, "resistance_summary")  # the bounded worst case takes search trials too
    assert summary.rows[0][-3:] == ["70.0", table.rows[0][3], "3/6"]
    from immunize.bench.plots import make_plots

    assert make_plots(results, tmp_path)["search"] == ["search_history.png"]
    assert (tmp_path / "search_history.png").stat().st_size > 1000


def test_lm_eval_capability_table_and_stability_column(results):
    lm = {"defended": {"undefended": 70.0, "seam": 66.0}, "attack": {"undefended": 61.0, "seam": 40.0}}
    for e in results["results"]:
        if e["stage"] in lm and (e["stage"] == "defended" or e["attack"]["lr"] == 1e-3):
            e["capability_lm_eval"] = lm[e["stage"]][e["defense"]]
            e["lm_eval"] = {"toy_mc": e["capability_lm_eval"]}
    tables = report.build_tables(results)
    assert "lm_eval" in [t.key for t in tables]
    table = _table(tables, "lm_eval")
    assert table.columns == ["attack", "undefended lm-eval cap", "undefended cap", "seam lm-eval cap", "seam cap"]
    assert table.rows == [["no attack", "70.0", "90.0", "66.0", "84.0"], ["lr=1e-3", "61.0", "64.0", "40.0", "75.0"],
                          ["lr=3e-3", "—", "53.0", "—", "20.0"]]
    stability = _table(tables, "stability")
    column = stability.columns.index("lm-eval cap")
    assert [row[column] for row in stability.rows] == ["70.0", "66.0"]
    plain = copy.deepcopy(results)
    for e in plain["results"]:
        e.pop("capability_lm_eval", None)
    assert "lm_eval" not in [t.key for t in report.build_tables(plain)]
    assert "lm-eval cap" not in _table(report.build_tables(plain), "stability").columns


def test_lm_eval_interval_only_when_the_bootstrap_reproduces_the_harness():
    from immunize.bench.results import intervals, item_arrays

    samples = [{"task": "a", "doc_id": i, "acc": float(i < 1)} for i in range(2)] + \
        [{"task": "b", "doc_id": i, "acc": float(i < 3)} for i in range(6)]
    arrays = item_arrays([{"kind": "sentiment", "prompt": "p", "correct": True}], samples)
    values, strata, _ = arrays["lm_eval"]
    assert list(values) == [1, 0, 1, 1, 1, 0, 0, 0] and strata == ["a"] * 2 + ["b"] * 6
    samples[2]["acc"] = 0.0  # b: 2 of 6 right; pooled 3/8 = 37.5, macro (1/2 + 1/3) / 2 = 41.7
    arrays = item_arrays([{"kind": "sentiment", "prompt": "p", "correct": True}], samples)
    pooled, macro = 37.5, 100 * (0.5 + 2 / 6) / 2
    assert "capability_lm_eval" in intervals([arrays], point={"capability_lm_eval": pooled})
    low, high = intervals([arrays], point={"capability_lm_eval": macro})["capability_lm_eval"]
    assert low <= macro <= high
    assert "capability_lm_eval" not in intervals([arrays], point={"capability_lm_eval": 55.0})
    assert "capability_lm_eval" not in intervals([arrays])


def test_lm_eval_interval_survives_the_rows_rounding():
    from immunize.bench.results import _mean, intervals, item_arrays

    samples = [{"task": "a", "doc_id": i, "acc": float(i % 3 == 0)} for i in range(300)]  # 100/300 = 33.333...%
    arrays = item_arrays([{"kind": "sentiment", "prompt": "p", "correct": True}], samples)
    assert "capability_lm_eval" in intervals([arrays], point={"capability_lm_eval": _mean([100 / 3])})


def test_unreadable_judge_answers_are_reported_with_the_resistance_grid(results):
    results["results"][2]["judge_unparseable"] = 3.0
    results["results"][3]["judge_unparseable"] = 1.0
    note = _table(report.build_tables(results), "resistance").note
    assert "could not read 4 answers of 2 evaluated models" in note


def test_multi_seed_cells_show_each_seed_and_paired_cells_the_items_left_out(results):
    res = copy.deepcopy(results)
    rows = copy.deepcopy(res["results"])
    for r in rows:
        r["intervals"] = {"harmful_score": [r["harmful_score"] - 5, r["harmful_score"] + 5]}
        r["seed_values"] = {"harmful_score": [r["harmful_score"] - 1, r["harmful_score"] + 1]}
        r["vs_reference"] = None
    rows[3]["vs_reference"] = {"reference": "undefended", "harmful_score": [-50.0, -58.0, -42.0],
                               "per_seed": {"harmful_score": [-49.0, -51.0]}, "dropped": {"harmful_score": 3}}
    res["rows"], res["seeds"] = rows, [0, 1]
    tables = report.build_tables(res)
    assert _table(tables, "resistance").rows[1][1] == "60.0 [55.0, 65.0] (59.0 / 61.0)"
    assert _table(tables, "resistance_delta").rows[1][1] == "-50.0 [-58.0, -42.0] (-49.0 / -51.0); 3 unpaired items out"
    assert "Welch-Satterthwaite" in _table(tables, "resistance").note
    res["seeds"] = [0]
    assert "one seed" in _table(report.build_tables(res), "resistance").note


def test_rows_pair_over_common_items_and_report_per_seed_values():
    from immunize.bench.results import aggregate

    def arrays(harm):
        return {"harmful": (np.array(harm, dtype=float), ["c"] * 4, [None] * 4),
                "benign": (np.array([1.0, 0.0, 1.0, 1.0]), ["t"] * 4, [None] * 4)}

    def e(defense, seed, hs):
        return {"cell": f"{defense}{seed}", "defense": defense, "stage": "defended", "seed": seed, "attack": None,
                "finetune": None, "harmful_score": hs, "capability": 75.0}

    entries = [e("undefended", 0, 75.0), e("undefended", 1, 50.0), e("seam", 0, 0.0), e("seam", 1, 100 / 3)]
    items = {"undefended0": arrays([1, 1, 1, 0]), "undefended1": arrays([1, 0, 1, 0]),
             "seam0": arrays([0, 0, 0, 0]), "seam1": arrays([0, np.nan, 1, 0])}
    rows = {r["defense"]: r for r in aggregate(entries, items, "undefended", None)}
    assert rows["seam"]["seed_values"]["harmful_score"] == [0.0, 100 / 3]
    vs = rows["seam"]["vs_reference"]
    assert vs["per_seed"]["harmful_score"] == [-75.0, round(-100 / 3, 4)]  # seed 1: the 3 items both scored
    assert vs["dropped"] == {"harmful_score": 1, "capability": 0}
    value, low, high = vs["harmful_score"]
    assert value == pytest.approx((-75.0 - 100 / 3) / 2, abs=1e-3) and low < -75.0 and high > -100 / 3  # t, ~1 df


def test_reference_protocol_attacks_are_their_own_rows_and_labels():
    ours = {"lr": 1e-3, "samples": 200, "mode": "full", "optimizer": "adamw"}
    theirs = {**ours, "loss_on": "all", "data_from": "defense"}
    points = [ours, theirs]
    assert report.attack_label(ours, points) == "lr=1e-3 loss_on=response data_from=heldout"
    assert report.attack_label(theirs, points) == "lr=1e-3 loss_on=all data_from=defense"
    assert report.attack_label(ours, [ours]) == "lr=1e-3" and report._key(ours) != report._key(theirs)


def test_no_win_check_counts_a_collapse_only_where_the_reference_keeps_its_capability():
    from immunize.bench.no_win import no_win_table

    def attack(lr, loss_on="response"):
        return {**_attack(lr), "loss_on": loss_on, "data_from": "heldout"}

    def entry(defense, stage, hs, cap, point=None):
        e = _entry(defense, stage, [hs] * 3, cap, attack=point)
        e["chance"] = {"arithmetic": 10.0, "sentiment": 30.0}  # chance 20: no-win means capability <= 30
        return e

    seam_before = entry("seam", "defended", 0, 78.0)
    seam_before.update(diagnostics={"grad_cosine": -0.5}, train={"sd_share": 0.42, "est_norm": 3.0})
    results = {"reference": "undefended", "defenses": ["undefended", "seam"], "heldout_categories": HELDOUT,
               "threshold": 10.0, "window": {"harm": 50.0, "capability_drop": 5.0}, "results": [
                   entry("undefended", "defended", 0, 80.0), seam_before,
                   entry("undefended", "attack", 70, 75.0, attack(1e-3)),   # inside the window, keeps capability
                   entry("seam", "attack", 5, 25.0, attack(1e-3)),          # safe and collapsed: no-win
                   entry("undefended", "attack", 2, 22.0, attack(1e-2)),    # wrecks the reference too: not counted
                   entry("seam", "attack", 0, 20.0, attack(1e-2)),
                   entry("undefended", "attack", 70, 78.0, attack(1e-3, "all")),
                   entry("seam", "attack", 40, 25.0, attack(1e-3, "all")),  # collapsed but harmful: not no-win
                   entry("undefended", "attack", 20, 80.0, attack(1e-2, "all")),  # below the window
                   entry("seam", "attack", 0, 25.0, attack(1e-2, "all"))]}
    table = no_win_table(results)
    rows = {(r[0], r[1]): dict(zip(table.columns, r)) for r in table.rows}
    assert list(rows) == [("undefended", "ours (response loss, held-out rows)"), ("undefended", "loss_on=all, data_from=heldout"),
                          ("seam", "ours (response loss, held-out rows)"), ("seam", "loss_on=all, data_from=heldout")]
    assert rows[("seam", "ours (response loss, held-out rows)")]["no-win at"] == "lr=1e-3"
    assert rows[("seam", "loss_on=all, data_from=heldout")]["no-win at"] == "none"
    assert rows[("undefended", "ours (response loss, held-out rows)")]["no-win at"] == "(reference)"
    seam = rows[("seam", "ours (response loss, held-out rows)")]
    assert (seam["cos(g_harm, g_benign)"], seam["sd_share"], seam["lr=1e-3 HS / cap"]) == ("-0.500", "0.42", "5.0 / 25.0")


def test_train_means_average_what_a_defense_logged(tmp_path):
    from immunize.bench.cells import train_means

    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(
        "epoch,step,train/sd_share,train/est_norm,val/loss\n0,4,0.1,2.0,\n0,9,0.3,,\n0,9,,,0.5\n")
    assert train_means(tmp_path) == pytest.approx({"sd_share": 0.2, "est_norm": 2.0})
    assert train_means(tmp_path / "missing") == {}
