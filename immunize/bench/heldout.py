"""The bench's held-out categories checked against the categories its evaluation data actually has.

The generalization condition reads the harmful score of the held-out categories from the evaluation, so a held-out
name the evaluation data lacks (a typo, or a toy name on real data) would report nothing for it. The data's
categories: a toy source's (the toy world's, or those it selects), a beavertails or generic harmful source's (read
from its rows, as the eval cell will). A hub dataset is not fetched to plan a bench (--plan works offline): where an
evaluation source is a hub id the check is skipped.
"""
from __future__ import annotations

import json
from typing import Optional

from immunize.errors import UserError

HARMFUL_KINDS = ("beavertails", "generic")


def _source(spec, what: str):
    from immunize.datamodules.catalog import Source

    if isinstance(spec, Source):
        return spec
    if isinstance(spec, dict) and "class_path" in spec:  # {class_path: immunize.datamodules.Source, init_args: ...}
        spec = spec.get("init_args") or {}
    if not isinstance(spec, dict):
        raise UserError(f"{what}: a source must be a mapping (kind, path, ...), got {spec!r}")
    try:
        return Source(**spec)
    except TypeError as err:
        raise UserError(f"{what}: {err}") from err


class NotLocal(Exception):
    """An evaluation source that is a hub id: its categories are not known before the run."""


def source_categories(src) -> Optional[list[str]]:
    """The harm categories one evaluation source yields (None: it yields no harmful items; NotLocal: a hub id)."""
    from immunize.datamodules.catalog import load_eval_items
    from immunize.datamodules.categories import categories_of

    if src.kind == "toy":
        from immunize.datamodules.toy import lexicon

        chosen = src.categories
        if chosen is None or chosen in ("seen", "heldout"):
            return list(lexicon.CATEGORIES)  # a group is a part of all of them; the world checks its own names
        return [chosen] if isinstance(chosen, str) else list(chosen)
    if src.kind not in HARMFUL_KINDS or (src.kind == "generic" and src.part != "harmful"):
        return None
    from immunize.datamodules.sources import _is_local

    if not _is_local(src.path or ""):
        raise NotLocal(src.path)
    items = load_eval_items(src, n_harmful_per_category=None, n_per_task=0)
    return categories_of(it for it in items if it.kind == "harmful")


def data_categories(eval_configs: list[dict]) -> list[str]:
    """The union of the harm categories of the evaluation cells' sources, in first-seen order (NotLocal where one of
    them is a hub id)."""
    out: dict[str, None] = {}
    seen: set[str] = set()
    for cfg in eval_configs:
        sources = ((cfg.get("data") or {}).get("init_args") or {}).get("sources") or [{"kind": "toy"}]
        for spec in sources:
            key = json.dumps(spec, sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
            out.update(dict.fromkeys(source_categories(_source(spec, "eval data.sources")) or []))
    return list(out)


def check_heldout(heldout: list[str], eval_configs: list[dict]) -> None:
    """Every held-out category is one the evaluation data has, or one UserError line naming the missing ones and
    the data's categories."""
    from immunize.datamodules.categories import check_present

    try:
        categories = data_categories(eval_configs)
    except NotLocal:
        return  # a hub dataset: not fetched to plan a bench, so its categories are not checked here
    check_present(list(heldout), categories, "eval data")
