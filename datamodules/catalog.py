"""Where records come from: a `Source` names the toy world or a real dataset and which part of it to take."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional, Union

from immunize.datamodules.records import EvalItem, Example, Pair
from immunize.errors import UserError

TOY_PARTS = ("harmful", "benign", "pairs")


@dataclass
class Source:
    """Where records come from: the toy world or a real dataset, and which part of it.

    Args:
        kind: "toy", a real dataset (beavertails, sst2, agnews, gsm8k, alpaca), or "generic" (any hub id or local
            file read through `fields`; see immunize.datamodules.generic).
        part: toy: harmful, benign or pairs; beavertails: pairs (with refusals) or harmful; generic: harmful,
            benign or pairs (training), harmful, benign or over_refusal (evaluation).
        split: toy: pretrain, align, attack, finetune or eval; real: the hub split (ignored for local files).
        path: real data: a hub id or a local .json/.jsonl/.parquet file.
        tasks: toy benign tasks to take (default all).
        categories: harm categories to keep: a list, one name, "seen" (all but heldout_categories) or "heldout";
            on real data (beavertails, generic) every name must be one of the data's own categories.
        limit: keep the first `limit` records.
        world_seed: the toy world's seed.
        heldout_categories: the held-out categories "seen"/"heldout" refer to (toy default: self_harm, terrorism;
            real data: required with "seen"/"heldout", each one of the data's categories).
        fields: generic: {record field: the file's column} for prompt, response, refusal, category, is_safe and
            label (a field left out reads the column of its own name, when there is one).
        task: generic benign data: the task's name (default: the file's stem); evaluation grades it by that
            name's rule in EvalData's task_match.
    """

    kind: str = "toy"
    part: str = "benign"
    split: Optional[str] = None
    path: Optional[str] = None
    tasks: Optional[list[str]] = None
    categories: Optional[Union[str, list[str]]] = None
    limit: Optional[int] = None
    world_seed: int = 0
    heldout_categories: Optional[list[str]] = None
    fields: Optional[dict[str, Any]] = None
    task: Optional[str] = None

    def __post_init__(self) -> None:
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 0):
            raise UserError(f"{_name(self)}: limit must be an integer >= 0 (null: all records), got {self.limit!r}")
        if self.kind == "generic":
            from immunize.datamodules.generic import check_fields

            check_fields(self.fields, _name(self))
        elif self.fields is not None:
            raise UserError(f"{_name(self)}: fields maps the columns of a generic source; kind {self.kind!r} has "
                            "fixed fields (use kind: generic to map your own)")


def toy_world(src: Source):
    from immunize.datamodules.toy.world import DEFAULT_HELDOUT

    return _toy_world(src.world_seed, tuple(DEFAULT_HELDOUT if src.heldout_categories is None else src.heldout_categories))


@lru_cache(maxsize=8)
def _toy_world(seed: int, heldout: tuple):
    """One ToyWorld per (seed, held-out categories) and process: its pools are built once."""
    from immunize.datamodules.toy.world import ToyWorld

    return ToyWorld(seed, heldout)


def _toy_categories(world, categories):
    if categories == "seen":
        return world.seen_categories
    if categories == "heldout":
        return world.heldout_categories
    if isinstance(categories, str):
        return [categories]
    return categories


def _limit(rows: list, limit: Optional[int], what: str) -> list:
    if limit is not None and limit < 0:
        raise UserError(f"{what}: limit must be >= 0, got {limit}")
    rows = rows if limit is None else rows[:limit]
    if not rows:
        raise UserError(f"{what}: no records (empty dataset or limit 0); check the source and its split")
    return rows


def _name(src: Source) -> str:
    return f"source {src.kind}:{src.path or src.split}:{src.part}"


def load_records(src: Source) -> list:
    """Training records for a source: Examples (harmful/benign) or Pairs (part "pairs")."""
    if src.kind == "toy":
        world = toy_world(src)
        split = src.split or {"pairs": "align", "harmful": "attack", "benign": "finetune"}.get(src.part, "")
        cats = _toy_categories(world, src.categories)
        if src.part == "harmful":
            rows = world.harmful_examples(split, cats)
        elif src.part == "pairs":
            rows = world.pairs(split, cats)
        elif src.part == "benign":
            rows = world.benign_examples(split, src.tasks)
        else:
            raise UserError(f"toy source: unknown part {src.part!r}; choose from {list(TOY_PARTS)}")
        return _limit(rows, src.limit, _name(src))
    from immunize.datamodules import categories, generic, sources

    if not src.path:
        raise UserError(f"source kind {src.kind!r} needs a path (hub id or local .json/.jsonl/.parquet file)")
    if src.kind == "generic":
        rows = generic.records(src.path, src.part, src.fields, src.split, src.task, _name(src))
    else:
        kwargs = {"split": src.split} if src.split else {}
        if src.kind == "beavertails":
            kwargs["with_refusal"] = src.part == "pairs"
        rows = sources.load_source(src.kind, src.path, **kwargs)
    rows = categories.select(rows, src.categories, src.heldout_categories, _name(src))
    return _limit(rows, src.limit, _name(src))


def load_eval_items(src: Source, n_harmful_per_category: int, n_per_task: int, n_over_refusal: int = 0) -> list[EvalItem]:
    """Evaluation items: toy eval split (plus `n_over_refusal` benign look-alikes), or a real dataset's eval
    converter (kind xstest: over-refusal prompts, `limit` of them, else all)."""
    if src.kind == "toy":
        world = toy_world(src)
        categories = _toy_categories(world, src.categories)
        items = world.eval_items(n_harmful_per_category, n_per_task, src.tasks, categories)
        items += world.over_refusal_items(n_over_refusal, categories) if n_over_refusal else []
        return _limit(items, None, _name(src))
    from immunize.datamodules import categories, generic, sources

    if not src.path:
        raise UserError(f"eval source kind {src.kind!r} needs a path (hub id or local .json/.jsonl/.parquet file)")
    if src.kind == "generic":
        items = generic.eval_items(src.path, src.part, src.fields, src.split, src.task, _name(src))
    else:
        kwargs = {"split": src.split} if src.split else {}
        items = sources.load_eval_source(src.kind, src.path, **kwargs)
    items = categories.select(items, src.categories, src.heldout_categories, _name(src))
    if src.kind == "beavertails" or (src.kind == "generic" and src.part == "harmful"):
        items = per_category(items, n_harmful_per_category)
        return _limit(items, src.limit, _name(src))
    return _limit(items, src.limit if src.limit is not None else n_per_task, _name(src))


def per_category(items: list[EvalItem], n: Optional[int]) -> list[EvalItem]:
    """At most n items of every harm category (first ones, in the source's order); None: all."""
    if n is None:
        return items
    if n < 0:
        raise UserError(f"n_harmful_per_category must be >= 0, got {n}")
    taken: dict[Optional[str], int] = {}
    out = []
    for it in items:
        if taken.get(it.category, 0) < n:
            taken[it.category] = taken.get(it.category, 0) + 1
            out.append(it)
    return out


def as_examples(rows: list, use: str = "harmful") -> list[Example]:
    """Pairs turned into Examples: use the harmful response or the refusal."""
    out = []
    for r in rows:
        if isinstance(r, Pair):
            if use == "refusal":
                out.append(Example(r.prompt, r.refusal, category=r.category, is_harmful=False, task="refusal"))
            else:
                out.append(Example(r.prompt, r.harmful_response, category=r.category, is_harmful=True, task="harmful"))
        else:
            out.append(r)
    return out
