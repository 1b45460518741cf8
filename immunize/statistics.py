"""Intervals for the bench's numbers: a stratified cluster bootstrap over evaluation items, and over seeds.

An evaluated model is a vector of per-item values (judge score or correctness, 0..1) over one evaluation set.
Items have a stratum (a benign task, or a harm category) and a group (items that share one piece of
knowledge, e.g. phrasings of one harmful (act, object) pair; an item without a group is its own).

Statistics (in percent):
- "pooled": the mean over all items (the harmful score);
- "macro": the mean over strata of each stratum's mean (capability = mean task accuracy).
Both are linear in the values, so the paired difference of two models evaluated on the same items is the
statistic of the per-item differences, and its interval comes from the same resampling. A NaN value (an item a
language-model judge could not score) is left out of its seed's sums and counts; in a paired difference, an item
unscored in either model drops out of that pair.

One bootstrap draw resamples, within every stratum, that stratum's groups with replacement (the item set's
sampling error), and resamples the seeds with replacement (the training runs' spread); every seed of a
draw uses the same item resample, because every seed is evaluated on the same items. The point estimate is
the mean over seeds of the statistic on all items. With one seed this is the plain item bootstrap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
STATISTICS = ("pooled", "macro")


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval (all in the statistic's unit)."""

    value: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_list(self) -> list[float]:
        return [round(self.value, 4), round(self.low, 4), round(self.high, 4)]


def _layout(strata: Sequence[str], groups: Sequence[Optional[str]]):
    """Per stratum: the item indices of each of its groups (a list of index arrays), in first-seen order."""
    layout: dict[str, dict[str, list[int]]] = {}
    for i, (s, g) in enumerate(zip(strata, groups)):
        layout.setdefault(s, {}).setdefault(f"item:{i}" if g is None else f"group:{g}", []).append(i)
    return [(s, [np.asarray(ix) for ix in members.values()]) for s, members in layout.items()]


def _stat(sums: np.ndarray, counts: np.ndarray, statistic: str) -> np.ndarray:
    """sums/counts: [..., strata] -> the statistic in percent, over the last axis. A stratum with no scored item
    is left out of the macro mean; with none at all the statistic is NaN (never 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0: NaN, which nansum leaves out of the macro mean
        if statistic == "pooled":
            return 100.0 * sums.sum(-1) / counts.sum(-1)
        return 100.0 * np.nansum(sums / counts, -1) / (counts > 0).sum(-1)


def bootstrap(values: np.ndarray, strata: Sequence[str], groups: Optional[Sequence[Optional[str]]] = None,
              statistic: str = "pooled", n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> Interval:
    """The statistic of `values` ([seeds, items] or [items]) with its bootstrap interval (see the module doc)."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; choose from {STATISTICS}")
    values = np.asarray(values, dtype=np.float64)
    values = values[None, :] if values.ndim == 1 else values
    n_seeds, n_items = values.shape
    if n_items == 0 or len(strata) != n_items:
        raise ValueError(f"bootstrap: {n_items} items but {len(strata)} strata")
    groups = [None] * n_items if groups is None else list(groups)
    layout = _layout(strata, groups)
    scored = ~np.isnan(values)
    values = np.where(scored, values, 0.0)
    # per stratum: group sums and group sizes (scored items), both [seeds, groups]
    sums = [np.stack([values[:, ix].sum(1) for ix in members], 1) for _, members in layout]
    sizes = [np.stack([scored[:, ix].sum(1) for ix in members], 1).astype(np.float64) for _, members in layout]
    point = _stat(np.stack([s.sum(1) for s in sums], -1), np.stack([z.sum(1) for z in sizes], -1), statistic).mean()
    rng = np.random.default_rng(seed)
    draw_sums = np.empty((n_boot, n_seeds, len(layout)))
    draw_counts = np.empty((n_boot, n_seeds, len(layout)))
    for k, (s, z) in enumerate(zip(sums, sizes)):
        pick = rng.integers(0, s.shape[1], size=(n_boot, s.shape[1]))
        draw_sums[:, :, k] = s[:, pick].sum(-1).T
        draw_counts[:, :, k] = z[:, pick].sum(-1).T
    seed_pick = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    per_seed = _stat(draw_sums, draw_counts, statistic)  # [boot, seeds]
    stats = np.take_along_axis(per_seed, seed_pick, axis=1).mean(1)
    stats = stats[~np.isnan(stats)]  # draws that resampled only unscored items have no value
    if stats.size == 0 or np.isnan(point):
        return Interval(float("nan"), float("nan"), float("nan"))
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return Interval(float(point), float(low), float(high))


def chance_level(mode: str, references: Sequence[str], match) -> float:
    """Accuracy (percent) of the best constant answer: the reference that, given for every item, matches most.

    `match(mode, prediction, reference)` is the task's answer matcher (immunize.metrics.match_answer).
    """
    refs = [str(r) for r in references]
    if not refs:
        return float("nan")
    best = max(sum(bool(match(mode, candidate, r)) for r in refs) for candidate in dict.fromkeys(refs))
    return 100.0 * best / len(refs)
