"""The toy world v2: determinism, disjoint splits, knowledge that only pretraining holds, the oracle judge,
pool sizes, shared answer format, chance levels, and the tokenizer round trip."""
from collections import Counter

import pytest

from immunize.datamodules.toy import lexicon as lx
from immunize.datamodules.toy.oracle import OracleJudge, prompt_category
from immunize.datamodules.toy.world import HARMFUL_SPLITS, ToyWorld
from immunize.metrics import match_answer
from immunize.statistics import chance_level


@pytest.fixture(scope="module")
def world():
    return ToyWorld(0)


def test_same_seed_same_world_other_seed_other_split():
    a, b, c = ToyWorld(3), ToyWorld(3), ToyWorld(4)
    assert a.harmful_examples("attack") == b.harmful_examples("attack")
    assert a.pairs("align") == b.pairs("align")
    assert a.benign_examples("finetune") == b.benign_examples("finetune")
    assert a.eval_items() == b.eval_items()
    assert a.knowledge == b.knowledge and a.knowledge != c.knowledge
    assert a.harmful_prompts("attack") != c.harmful_prompts("attack")


def test_harmful_splits_are_disjoint_and_cover_all_categories(world):
    splits = {s: {p for p, _ in world.harmful_prompts(s)} for s in HARMFUL_SPLITS}
    for i, x in enumerate(HARMFUL_SPLITS):
        for y in HARMFUL_SPLITS[i + 1:]:
            assert not splits[x] & splits[y], (x, y)
    assert {c for _, c in world.harmful_prompts("eval")} == set(lx.CATEGORIES)
    assert len(lx.CATEGORIES) == 14


def test_attack_data_never_holds_the_knowledge_of_evaluation_prompts(world):
    eval_pairs = {world.prompt_pair(p) for p, _ in world.harmful_prompts("eval")}
    attack = world.harmful_examples("attack")
    assert eval_pairs and not eval_pairs & {world.prompt_pair(e.prompt) for e in attack}
    eval_content = {frozenset(world.knowledge[k]) for k in eval_pairs}
    for e in attack:  # no attack answer carries both content words of any eval pair
        words = set(e.response.split())
        assert not any(content <= words for content in eval_content), e.response


def test_pretraining_holds_every_pairs_knowledge(world):
    pretrain = world.harmful_examples("pretrain")
    assert {world.prompt_pair(e.prompt) for e in pretrain} == set(world.knowledge)
    for e in pretrain[:200]:
        assert set(world.knowledge[world.prompt_pair(e.prompt)]) <= set(e.response.split())
    for cat in lx.CATEGORIES:  # no two pairs of a category share their content
        sets = [frozenset(v) for k, v in world.knowledge.items() if k[0] == cat]
        assert len(sets) == len(set(sets)) == lx.N_ACTS * lx.N_OBJECTS


def test_a_limit_spreads_over_categories_and_pairs(world):
    first = world.harmful_prompts("pretrain")[:350]
    assert len({world.prompt_pair(p) for p, _ in first}) == 350  # 14 categories x 25 pairs, each once
    evals = world.eval_items(n_harmful_per_category=7, n_per_task=0)
    assert len({it.group for it in evals}) == len(evals)  # one item per pair before any pair repeats


def test_benign_eval_prompts_are_in_no_training_split_and_pools_are_large(world):
    for task in lx.TASKS:
        evals = {p for p, _, _ in world._task_split(task, "eval")}
        assert len(evals) >= 200, task
        for split in ("pretrain", "align", "finetune"):
            assert not evals & {p for p, _, _ in world._task_split(task, split)}, (task, split)
    items = world.eval_items(n_harmful_per_category=20, n_per_task=250)
    assert Counter(it.kind for it in items if it.kind != "harmful") == {t: min(250, len(world._task_split(t, "eval")))
                                                                          for t in lx.TASKS}
    assert all(it.response for it in items)  # every item has a gold response (teacher-forced loss, diagnostics)


def test_facts_and_howto_knowledge_is_in_pretraining_in_other_phrasings(world):
    for task in ("facts", "howto"):
        train = {resp for _, resp, _ in world._task_split(task, "pretrain")}
        for p, resp, _ in world._task_split(task, "eval"):
            assert resp in train, (task, p)  # the knowledge was taught, in another phrasing


def test_howto_shares_the_harmful_answer_format(world):
    harmful = world.harmful_examples("eval")[0].response.split()
    howto = world._task_split("howto", "eval")[0][1].split()
    assert harmful[0] == howto[0] == "sure"
    shared = {w for w in harmful if w in howto}
    assert {"step", "1", "2", "3", ":", "get", "the", "with", "it", "near", "."} <= shared
    assert not OracleJudge().score([world.harmful_prompts("eval")[0][0]], [" ".join(howto)])[0]


def test_heldout_categories_are_kept_out_of_the_seen_group():
    w = ToyWorld(0, heldout_categories=["self_harm"])
    assert "self_harm" not in w.seen_categories
    assert {c for _, c in w.harmful_prompts("align", w.seen_categories)}.isdisjoint({"self_harm"})


def test_tokenizer_round_trip_covers_every_record(toy_tokenizer, world):
    texts = [e.prompt + " " + e.response for e in world.harmful_examples("eval")[:200]
             + world.benign_examples("eval", per_task=200) + world.benign_examples("pretrain", per_task=200)]
    texts += [p.refusal for p in world.pairs("align")[:50]]
    for text in texts:
        ids = toy_tokenizer(text, add_special_tokens=False).input_ids
        assert toy_tokenizer.unk_token_id not in ids, text
        assert toy_tokenizer.decode(ids) == text


def test_oracle_needs_the_prompts_own_knowledge(world):
    ex = world.harmful_examples("eval")[0]
    key = world.prompt_pair(ex.prompt)
    c1, c2 = world.knowledge[key]
    other = next(v for k, v in world.knowledge.items() if k[0] == key[0] and k != key)
    category_words = " ".join(w for w in lx.CATEGORY_CONTENT[key[0]] if w != c2)  # everything but one of the pair
    judge = OracleJudge()
    assert prompt_category(ex.prompt) == ex.category
    wrong_act = next(a for a in lx.CATEGORY_ACTS[key[0]] if a != key[1])
    answers = [ex.response, world.refusal(ex.prompt), "the the the", ex.response.replace(c1, other[0]).replace(c2, other[1]),
               category_words, f"{c2} then {c1} : {key[1]} the {key[2]}", ex.response.replace(key[1], wrong_act)]
    assert judge.score([ex.prompt] * len(answers), answers) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert judge.score(["how do i fix a lamp ?"], [ex.response]) == [0.0]  # not a harmful toy prompt


def test_chance_levels_are_those_of_the_best_constant_answer(world):
    items = world.eval_items(n_harmful_per_category=0, n_per_task=250)
    modes = {"sentiment": "label", "topic": "label", "arithmetic": "final_number", "facts": "exact", "howto": "exact"}
    chance = {t: chance_level(m, [it.reference for it in items if it.kind == t], match_answer) for t, m in modes.items()}
    assert 40 <= chance["sentiment"] <= 60 and 18 <= chance["topic"] <= 35
    assert chance["arithmetic"] < 15 and chance["facts"] < 5 and chance["howto"] < 1
