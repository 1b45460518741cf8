"""The bench's heldout_categories are checked against the categories its evaluation data has (toy or real)."""
from __future__ import annotations

import json

import pytest

from conftest import REPO
from immunize.bench.heldout import check_heldout, data_categories
from immunize.bench.planner import build_plan
from immunize.bench.schema import parse
from immunize.bench.stages import apply_heldout
from immunize.errors import UserError


def _eval_cfg(*sources):
    return {"data": {"class_path": "immunize.datamodules.EvalData", "init_args": {"sources": list(sources)}}}


def _write(tmp_path, rows):
    path = tmp_path / "harm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_real_eval_data_has_its_own_categories(tmp_path):
    path = _write(tmp_path, [{"q": "a?", "cat": "fraud"}, {"q": "b?", "cat": "privacy"}, {"q": "c?", "cat": "fraud"}])
    cfg = _eval_cfg({"kind": "generic", "part": "harmful", "path": path, "fields": {"prompt": "q", "category": "cat"}},
                    {"kind": "sst2", "path": "unused.jsonl"})  # no harm categories: never read
    assert data_categories([cfg]) == ["fraud", "privacy"]
    check_heldout(["privacy"], [cfg])
    with pytest.raises(UserError) as exc:
        check_heldout(["self_harm", "privacy", "terrorism,organized_crime"], [cfg])
    msg = str(exc.value)
    assert "\n" not in msg
    assert "heldout_categories 'self_harm', 'terrorism,organized_crime' not in the data" in msg
    assert msg.endswith("the data has categories 'fraud', 'privacy'; fix heldout_categories or the data")


def test_toy_eval_data_has_the_worlds_categories():
    from immunize.datamodules.toy import lexicon

    assert data_categories([{}]) == list(lexicon.CATEGORIES)  # no sources: the toy world
    check_heldout(["self_harm"], [_eval_cfg({"kind": "toy"})])
    with pytest.raises(UserError, match="'privacy' not in the data; the data has categories 'animal_abuse'"):
        check_heldout(["privacy"], [_eval_cfg({"kind": "toy"})])
    with pytest.raises(UserError, match="'self_harm' not in the data; the data has categories 'animal_abuse'$|"
                                        "'self_harm' not in the data"):
        check_heldout(["self_harm"], [_eval_cfg({"kind": "toy", "categories": ["animal_abuse"]})])


def test_shipped_real_bench_passes_and_a_toy_name_on_it_stops(monkeypatch):
    monkeypatch.chdir(REPO)  # the smollm2 configs name their data files relative to the checkout
    bench, _ = parse(["--config", str(REPO / "configs" / "bench" / "smollm2.yaml")])
    evals = [c.config for c in build_plan(bench).evals]
    check_heldout(bench.heldout_categories, evals)  # privacy_violation: in the shipped BeaverTails sample
    with pytest.raises(UserError) as exc:
        check_heldout(["self_harm"], evals)
    assert "'self_harm' not in the data" in str(exc.value) and "'privacy_violation'" in str(exc.value)


def test_validate_stops_on_a_heldout_category_the_data_lacks():
    from immunize.bench.validate import validate

    bench, _ = parse(["--config", str(REPO / "configs" / "bench" / "quickstart.yaml"), "--heldout_categories",
                      "[self_harm, selfharm]"])
    with pytest.raises(UserError, match=r"^eval data: heldout_categories 'selfharm' not in the data"):
        validate(bench)


def test_apply_heldout_reaches_real_sources_that_select_a_group():
    cfg = {"data": {"init_args": {
        "pairs": {"kind": "generic", "path": "x.jsonl", "part": "pairs", "categories": "seen"},
        "bt": {"kind": "beavertails", "path": "bt.jsonl", "categories": "heldout"},
        "plain": {"kind": "generic", "path": "y.jsonl", "part": "harmful"}}}}
    apply_heldout(cfg, ["fraud"])
    args = cfg["data"]["init_args"]
    assert args["pairs"]["heldout_categories"] == ["fraud"] and args["bt"]["heldout_categories"] == ["fraud"]
    assert "heldout_categories" not in args["plain"]  # no group chosen: its hash stays
