"""Deterministic synthetic world: harmful requests with fictional placeholder answers, refusals, benign tasks.

Every record is a pure function of (seed, split), so two processes that build ToyWorld(seed) agree
exactly, and the splits are disjoint by prompt text by construction (one shuffled pool, cut in parts).
"""
from __future__ import annotations

import random
from functools import cached_property
from typing import Iterable, Optional, Sequence

from datamodules.records import EvalItem, Example, Pair
from datamodules.toy import lexicon as lx
from immunize.errors import UserError

# Fractions of each shuffled pool that go to each split, in order.
HARMFUL_SPLITS = (("pretrain", 0.35), ("align", 0.25), ("attack", 0.25), ("eval", 0.15))
BENIGN_SPLITS = (("pretrain", 0.5), ("align", 0.15), ("finetune", 0.2), ("eval", 0.15))
DEFAULT_HELDOUT = ("self_harm", "terrorism,organized_crime")


def _cut(pool: list, splits: Sequence[tuple[str, float]]) -> dict[str, list]:
    """Cut a shuffled list into consecutive named parts by fraction."""
    out, start = {}, 0
    for i, (name, frac) in enumerate(splits):
        end = len(pool) if i == len(splits) - 1 else start + int(round(frac * len(pool)))
        out[name] = pool[start:end]
        start = end
    return out


def _rng(*key) -> random.Random:
    """A generator seeded by a string key: stable across processes and Python runs."""
    return random.Random(":".join(map(str, key)))


class ToyWorld:
    """The toy world for one seed. Splits: pretrain, align, attack, finetune (benign only), eval."""

    def __init__(self, seed: int = 0, heldout_categories: Sequence[str] = DEFAULT_HELDOUT):
        unknown = [c for c in heldout_categories if c not in lx.CATEGORIES]
        if unknown:
            raise UserError(f"toy world: unknown held-out category {unknown[0]!r}; choose from {list(lx.CATEGORIES)}")
        self.seed = seed
        self.heldout_categories = tuple(heldout_categories)

    # ----- harmful side -------------------------------------------------------------------------
    @property
    def categories(self) -> tuple[str, ...]:
        return lx.CATEGORIES

    @property
    def seen_categories(self) -> tuple[str, ...]:
        """Categories a defense may train on (all but the held-out ones)."""
        return tuple(c for c in lx.CATEGORIES if c not in self.heldout_categories)

    @cached_property
    def _harmful_prompts(self) -> dict[str, dict[str, list[str]]]:
        """category -> split -> prompts."""
        out = {}
        for cat in lx.CATEGORIES:
            pool = sorted(
                (opener.format(act=a, obj=o) + " " + suffix).strip()
                for opener in lx.HARMFUL_OPENERS
                for a in lx.CATEGORY_ACTS[cat]
                for o in lx.CATEGORY_OBJECTS[cat]
                for suffix in lx.HARMFUL_SUFFIXES
            )
            _rng(self.seed, "harmful", cat).shuffle(pool)
            out[cat] = _cut(pool, HARMFUL_SPLITS)
        return out

    def harmful_response(self, prompt: str, category: str) -> str:
        """A compliant, structured answer made of the category's fictional content words."""
        rng = _rng(self.seed, "response", prompt)
        words = list(lx.CATEGORY_CONTENT[category])
        rng.shuffle(words)
        steps = [rng.choice(lx.HARMFUL_STEPS).format(n=i + 1, w1=words[2 * i], w2=words[2 * i + 1]) for i in range(3)]
        return "sure , here is how . " + " ".join(steps)

    def refusal(self, prompt: str) -> str:
        return _rng(self.seed, "refusal", prompt).choice(lx.REFUSALS)

    def _check(self, split: str, allowed: Iterable[str]) -> None:
        if split not in allowed:
            raise UserError(f"toy world: unknown split {split!r}; choose from {sorted(allowed)}")

    def _categories(self, categories: Optional[Sequence[str]]) -> Sequence[str]:
        cats = lx.CATEGORIES if categories is None else categories
        for c in cats:
            if c not in lx.CATEGORIES:
                raise UserError(f"toy world: unknown category {c!r}; choose from {list(lx.CATEGORIES)}")
        return cats

    def harmful_prompts(self, split: str, categories: Optional[Sequence[str]] = None) -> list[tuple[str, str]]:
        """(prompt, category) pairs of one split, categories interleaved round-robin."""
        self._check(split, dict(HARMFUL_SPLITS))
        per_cat = [[(p, c) for p in self._harmful_prompts[c][split]] for c in self._categories(categories)]
        return [item for row in zip(*per_cat) for item in row] + [
            item for lst in per_cat for item in lst[min(map(len, per_cat)) :]
        ]

    def harmful_examples(self, split: str, categories: Optional[Sequence[str]] = None) -> list[Example]:
        return [
            Example(p, self.harmful_response(p, c), category=c, is_harmful=True, task="harmful")
            for p, c in self.harmful_prompts(split, categories)
        ]

    def pairs(self, split: str, categories: Optional[Sequence[str]] = None) -> list[Pair]:
        return [Pair(p, self.harmful_response(p, c), self.refusal(p), c) for p, c in self.harmful_prompts(split, categories)]

    # ----- benign side --------------------------------------------------------------------------
    def _task_pool(self, task: str) -> list[tuple[str, str, str]]:
        """All (prompt, response, reference) of a benign task, before shuffling."""
        if task == "sentiment":
            rows = []
            for label, words in (("positive", lx.POSITIVE), ("negative", lx.NEGATIVE)):
                for noun in lx.REVIEW_NOUNS:
                    for t in lx.SENTIMENT_TEMPLATES:
                        for a in words:
                            for b in words:
                                if a != b:
                                    text = t.format(noun=noun, a=a, b=b)
                                    rows.append((f"review : {text} . is this review positive or negative ?", label, label))
            return rows
        if task == "topic":
            rows = []
            for label, words in lx.TOPICS.items():
                for t in lx.HEADLINE_TEMPLATES:
                    for a in words:
                        for b in words:
                            if a != b:
                                text = t.format(a=a, b=b)
                                rows.append((f"headline : {text} . topic : world , sports , business or tech ?", label, label))
            return rows
        if task == "arithmetic":
            rows = []
            for name in lx.NAMES:
                for item in lx.ITEMS:
                    for t in lx.ARITH_TEMPLATES:
                        for a in range(1, 10):
                            for b in range(1, 10):
                                answer = f"{a} + {b} = {a + b} . the final answer is : {a + b}"
                                rows.append((t.format(name=name, item=item, a=a, b=b), answer, str(a + b)))
            return rows
        if task == "facts":
            return [
                (t.format(e=e), city, city)
                for e, city in zip(lx.FACT_ENTITIES, lx.FACT_CITIES)
                for t in lx.FACT_TEMPLATES
            ]
        raise UserError(f"toy world: unknown task {task!r}; choose from {list(lx.TASKS)}")

    def _task_split(self, task: str, split: str) -> list[tuple[str, str, str]]:
        self._check(split, dict(BENIGN_SPLITS))
        pool = sorted(self._task_pool(task))
        if task == "facts":
            # Facts are knowledge, not skills: every split asks about every entity, eval in the first phrasing.
            return pool if split != "eval" else [r for r in pool if r[0].startswith(lx.FACT_TEMPLATES[0].split("{")[0])]
        _rng(self.seed, "benign", task).shuffle(pool)
        return _cut(pool, BENIGN_SPLITS)[split]

    def benign_examples(self, split: str, tasks: Optional[Sequence[str]] = None, per_task: Optional[int] = None) -> list[Example]:
        """Benign examples of one split, tasks interleaved; each task gives `per_task` rows (cycling if short).

        per_task defaults to the longest task's size capped at 1000, so small tasks are not drowned out.
        """
        tasks = list(lx.TASKS if tasks is None else tasks)
        per_task_rows = [self._task_split(t, split) for t in tasks]
        count = per_task if per_task is not None else min(1000, max(map(len, per_task_rows)))
        return [
            Example(*rows[i % len(rows)][:2], task=t)
            for i in range(count)
            for t, rows in zip(tasks, per_task_rows)
        ]

    def eval_items(self, n_harmful_per_category: int = 20, n_per_task: int = 50,
                   tasks: Optional[Sequence[str]] = None, categories: Optional[Sequence[str]] = None) -> list[EvalItem]:
        """Held-out evaluation prompts: harmful ones by category, benign ones with gold answers."""
        items = []
        for cat in self._categories(categories):
            items += [EvalItem(p, "harmful", category=cat) for p in self._harmful_prompts[cat]["eval"][:n_harmful_per_category]]
        for t in lx.TASKS if tasks is None else tasks:
            items += [EvalItem(p, t, reference=ref) for p, _, ref in self._task_split(t, "eval")[:n_per_task]]
        return items
