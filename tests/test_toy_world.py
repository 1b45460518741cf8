"""The toy world: determinism, disjoint splits, the tokenizer round-trip and the oracle judge."""
from datamodules.toy import lexicon as lx
from datamodules.toy.oracle import OracleJudge, prompt_category
from datamodules.toy.world import ToyWorld


def test_same_seed_same_world_other_seed_other_split():
    a, b, c = ToyWorld(3), ToyWorld(3), ToyWorld(4)
    assert a.harmful_examples("attack") == b.harmful_examples("attack")
    assert a.pairs("align") == b.pairs("align")
    assert a.benign_examples("finetune") == b.benign_examples("finetune")
    assert a.eval_items() == b.eval_items()
    assert a.harmful_prompts("attack") != c.harmful_prompts("attack")


def test_harmful_splits_are_disjoint_and_cover_all_categories():
    w = ToyWorld(0)
    splits = {s: {p for p, _ in w.harmful_prompts(s)} for s in ("pretrain", "align", "attack", "eval")}
    names = list(splits)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            assert not splits[x] & splits[y], (x, y)
    assert {c for _, c in w.harmful_prompts("eval")} == set(lx.CATEGORIES)
    assert len(lx.CATEGORIES) == 14


def test_benign_skill_splits_are_disjoint_from_eval():
    w = ToyWorld(0)
    for task in ("sentiment", "topic", "arithmetic"):
        evals = {p for p, _, _ in w._task_split(task, "eval")}
        for split in ("pretrain", "align", "finetune"):
            assert not evals & {p for p, _, _ in w._task_split(task, split)}, (task, split)


def test_heldout_categories_are_kept_out_of_the_seen_group():
    w = ToyWorld(0, heldout_categories=["self_harm"])
    assert "self_harm" not in w.seen_categories
    assert {c for _, c in w.harmful_prompts("align", w.seen_categories)}.isdisjoint({"self_harm"})


def test_tokenizer_round_trip_covers_every_record(toy_tokenizer):
    w = ToyWorld(0)
    texts = [e.prompt + " " + e.response for e in w.harmful_examples("eval")[:200] + w.benign_examples("eval", per_task=50)]
    texts += [p.refusal for p in w.pairs("align")[:50]]
    for text in texts:
        ids = toy_tokenizer(text, add_special_tokens=False).input_ids
        assert toy_tokenizer.unk_token_id not in ids, text
        assert toy_tokenizer.decode(ids) == text


def test_oracle_flags_content_and_not_refusals_or_gibberish():
    w = ToyWorld(0)
    ex = w.harmful_examples("eval")[0]
    judge = OracleJudge()
    assert prompt_category(ex.prompt) == ex.category
    refusal = w.refusal(ex.prompt)
    other_cat = next(c for c in lx.CATEGORIES if c != ex.category)
    other_content = "sure . step 1 : " + " ".join(lx.CATEGORY_CONTENT[other_cat][:3])
    scores = judge.score([ex.prompt] * 4, [ex.response, refusal, "the the the", other_content])
    assert scores == [1.0, 0.0, 0.0, 0.0]
