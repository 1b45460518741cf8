"""The shipped real-track files: what immunize.datamodules.real_samples writes, in the formats the real loaders read."""
from __future__ import annotations

from conftest import REPO
from immunize.datamodules import real_samples
from immunize.datamodules.sources import alpaca, beavertails, beavertails_eval, sst2

DATA = REPO / "configs" / "smollm2" / "data"


def test_shipped_files_are_the_generators_output():
    files = real_samples.files()
    assert sorted(p.name for p in DATA.iterdir()) == sorted(files)
    for name, rows in files.items():
        assert (DATA / name).read_text() == real_samples.render(rows), f"{name}: rerun python -m immunize.datamodules.real_samples"


def test_splits_share_no_prompt_and_align_leaves_out_the_heldout_category():
    prompts = {s: {r["prompt"] for r in rows} for s, rows in real_samples.beavertails_splits().items()}
    assert not (prompts["align"] & prompts["attack"]) and not (prompts["align"] & prompts["eval"])
    assert not (prompts["attack"] & prompts["eval"])
    pairs = beavertails(str(DATA / "beavertails_align.jsonl"), with_refusal=True)
    assert pairs and real_samples.HELDOUT not in {p.category for p in pairs}
    assert all("[details withheld]" in p.harmful_response and "I'm sorry" in p.refusal for p in pairs)
    held = [i for i in beavertails_eval(str(DATA / "beavertails_eval.jsonl")) if i.category == real_samples.HELDOUT]
    assert len(held) >= 5


def test_real_loaders_read_sst2_and_alpaca():
    train = sst2(str(DATA / "sst2_train.jsonl"))
    assert len(train) == 400 and {e.response for e in train} == {"positive", "negative"}
    tasks = alpaca(str(DATA / "alpaca.jsonl"))
    assert tasks[0].prompt == "Give the opposite of the word.\nhot" and tasks[0].response == "cold"
