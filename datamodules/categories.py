"""Harm categories of real data: select records by category and check held-out names against the data's own.

A real source (beavertails, generic) selects categories as a toy source does: a list, one name, "seen" (all but the
held-out ones) or "heldout". Its categories are whatever strings its rows carry, so every name a selection uses
(held-out categories included) must be one the data has: a misspelt held-out category would otherwise keep nothing
out of the defense's data, silently.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

from immunize.errors import UserError

GROUPS = ("seen", "heldout")


def categories_of(records: Iterable) -> list[str]:
    """The distinct harm categories of records (anything with a `category`), in first-seen order; None left out."""
    return list(dict.fromkeys(r.category for r in records if getattr(r, "category", None) is not None))


def check_present(names: Sequence[str], available: Sequence[str], what: str, role: str = "heldout_categories") -> None:
    """A one-line UserError naming every one of `names` not in `available` and the categories the data has."""
    missing = [n for n in names if n not in available]
    if missing:
        raise UserError(f"{what}: {role} {', '.join(repr(n) for n in missing)} not in the data; the data has "
                        f"categories {', '.join(repr(c) for c in available) or '(none)'}; fix {role} or the data")


def select(records: list, categories: Optional[Union[str, list[str]]], heldout: Optional[Sequence[str]],
           what: str) -> list:
    """The records of the chosen categories: None keeps all; "seen"/"heldout" need `heldout` (the held-out names,
    each checked against the data); a name or a list keeps those categories (each checked against the data)."""
    if categories is None:
        return records
    available = categories_of(records)
    if categories in GROUPS:
        if not heldout:
            raise UserError(f"{what}: categories {categories!r} needs heldout_categories (the held-out names) on a "
                            "real source; set heldout_categories or list the categories")
        check_present(list(heldout), available, what)
        keep = [c for c in available if (c in heldout) == (categories == "heldout")]
    else:
        keep = [categories] if isinstance(categories, str) else list(categories)
        check_present(keep, available, what, role="categories")
    chosen = set(keep)
    return [r for r in records if r.category in chosen]
