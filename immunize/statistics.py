"""Intervals for the bench's numbers: item sampling and seed spread, each with its own variance and degrees of freedom.

An evaluated model is a vector of per-item values (judge score or correctness, 0..1) over one evaluation set, one
vector per training seed. Items have a stratum (a benign task, or a harm category) and a group (items that share one
piece of knowledge, e.g. phrasings of one harmful (act, object) pair; an item without a group is its own).

Statistics (in percent), computed per seed:
- "pooled": the mean over all items (the harmful score);
- "macro": the mean over strata of each stratum's mean (capability = mean task accuracy).
A NaN value (an item a language-model judge could not score) is left out of its seed's sums and counts.

What the interval is for. With S >= 2 seeds: the expected value of the statistic over training seeds (the whole
pipeline reseeded) and over items drawn like these (groups drawn within each stratum). The estimate is the mean over
seeds of the per-seed statistic, and its variance has two parts:
- items: the stratified, grouped (cluster) variance of the seed-averaged statistic, in closed form by linearisation
  (each group's influence: its sum minus the ratio times its count, over the stratum's or the set's count), with the
  small-sample correction G/(G-1) per stratum of G groups; strata of a single group (whose spread cannot be
  estimated) are pooled into one for the variance (collapsed strata); degrees of freedom by Satterthwaite over
  strata;
- seeds: the variance of the S per-seed values over S (S-1 degrees of freedom).
The two add (the item-by-seed interaction is in both, so the sum errs wide by that term, which is small next to the
seed part), the degrees of freedom come from Welch-Satterthwaite, and the quantile from Student's t: with 3 seeds
whose values disagree the interval is as wide as three draws of a noisy training run warrant.
With one seed the interval is for that trained model: its expected value over items (the seed spread cannot be
estimated from one run; the report says so).

Bounded values. A rate (values in [0, 1]) gets the Clopper-Pearson interval at its effective sample size
p (1 - p) / variance, at most the number of items (a design effect below 1 is not trusted; the number of items
where the variance estimate is 0), shrunk by (z / t)^2 for the degrees of freedom (Korn and Graubard's interval for
clustered samples), so a rare rate gets an asymmetric interval inside [0, 100]. Where every scored item of every
seed has the same value (e.g. a rate of 0), the interval is exact for G groups none of which differed: a share u of
the population, u = 1 - (alpha/2)^(1/G), could still behave otherwise, so 0 of 98 groups reads 0.0 [0.0, 3.7].

Paired differences (a model minus a reference on the same items and seeds) are taken over the items both scored;
`dropped` counts the items one model scored and the other did not (summed over seeds), because there the paired
difference is not HS_a - HS_b. They get the t interval (values in [-1, 1]) and the same exact rule where every
difference is the same (two models that agree on every item: 0.0 [-3.7, +3.7] at 98 groups).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

LEVEL = 0.95
STATISTICS = ("pooled", "macro")


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval (in the statistic's unit), the per-seed values it averages, and for a
    paired difference the number of items dropped because only one of the two models scored them."""

    value: float
    low: float
    high: float
    per_seed: tuple = ()
    dropped: int = 0
    df: float = field(default=float("inf"), compare=False)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_list(self) -> list[float]:
        return [round(self.value, 4), round(self.low, 4), round(self.high, 4)]


@dataclass(frozen=True)
class Design:
    """Which group each item is in, which stratum each group is in (for the statistic), and which variance stratum
    (strata of one group pooled into one: a single group's spread cannot be estimated), as one-hot matrices."""

    item_group: np.ndarray  # [items, groups]
    group_stratum: np.ndarray  # [groups, strata]
    group_variance_stratum: np.ndarray  # [groups, variance strata]

    @property
    def n_groups(self) -> int:
        return self.group_stratum.shape[0]


def design(strata: Sequence[str], groups: Optional[Sequence[Optional[str]]] = None) -> Design:
    """The layout of an item set (groups keyed within their stratum; an item without a group is its own)."""
    n = len(strata)
    groups = [None] * n if groups is None else list(groups)
    if len(groups) != n:
        raise ValueError(f"{n} strata but {len(groups)} groups")
    group_ids, stratum_ids, of_group = {}, {}, []
    for i, (s, g) in enumerate(zip(strata, groups)):
        key = (s, f"item:{i}" if g is None else f"group:{g}")
        if key not in group_ids:
            group_ids[key] = len(group_ids)
            stratum_ids.setdefault(s, len(stratum_ids))
        of_group.append(group_ids[key])
    item_group = np.zeros((n, len(group_ids)))
    item_group[np.arange(n), of_group] = 1.0
    group_stratum = np.zeros((len(group_ids), len(stratum_ids)))
    for (s, _), g in group_ids.items():
        group_stratum[g, stratum_ids[s]] = 1.0
    single = group_stratum.sum(0) == 1
    keep = group_stratum[:, ~single]
    pooled = group_stratum[:, single].sum(1, keepdims=True)
    group_variance_stratum = np.concatenate([keep, pooled], 1) if single.any() else keep
    return Design(item_group, group_stratum, group_variance_stratum)


def _safe_div(a, b):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


@dataclass
class Moments:
    """What an interval needs, for values [..., seeds, items]: each seed's statistic [..., seeds], the estimate,
    its variance and degrees of freedom, whether every scored value was the same (all [...]), as fractions; and
    the numbers of items and groups."""

    per_seed: np.ndarray
    estimate: np.ndarray
    variance: np.ndarray
    df: np.ndarray
    constant: np.ndarray
    items: int
    groups: int


def moments(values: np.ndarray, layout: Design, statistic: str = "pooled") -> Moments:
    """The estimate and its variance parts (module doc) for values [..., seeds, items] (NaN: unscored). Leading axes
    are independent data sets (the coverage simulation computes thousands at once)."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; choose from {STATISTICS}")
    scored = ~np.isnan(values)
    filled = np.where(scored, values, 0.0)
    sums = filled @ layout.item_group  # [..., S, G]
    counts = scored.astype(np.float64) @ layout.item_group
    strat_sums, strat_counts = sums @ layout.group_stratum, counts @ layout.group_stratum  # [..., S, H]
    if statistic == "pooled":
        total = strat_counts.sum(-1)
        per_seed = _safe_div(strat_sums.sum(-1), total)
        influence = _safe_div(sums - per_seed[..., None] * counts, total[..., None])
    else:
        rates = _safe_div(strat_sums, strat_counts)
        present = (strat_counts > 0).sum(-1)
        per_seed = _safe_div(np.nansum(rates, -1), present)
        group_rate = np.nan_to_num(rates) @ layout.group_stratum.T  # [..., S, G]: the group's stratum rate
        group_count = strat_counts @ layout.group_stratum.T
        influence = _safe_div(sums - group_rate * counts, group_count * present[..., None])
    influence = np.nan_to_num(influence)
    n_seeds = values.shape[-2]
    estimate = per_seed.mean(-1)
    n_scored = scored.sum((-2, -1))
    first = np.nanmax(np.where(scored, values, -np.inf), (-2, -1))
    constant = (np.where(scored, values, first[..., None, None]) == first[..., None, None]).all((-2, -1)) & (n_scored > 0)
    mean_influence = influence.mean(-2)  # [..., G]: the seed-averaged statistic's influence
    strata = layout.group_variance_stratum
    size = strata.sum(0)  # [variance strata]
    centred = mean_influence - (mean_influence @ strata / size) @ strata.T
    correction = np.where(size > 1, size / np.maximum(size - 1, 1), 0.0)
    per_stratum = (centred ** 2 @ strata) * correction  # [..., variance strata]
    item_var = per_stratum.sum(-1)
    item_df = _safe_div(item_var ** 2, (per_stratum ** 2 / np.maximum(size - 1, 1)).sum(-1))
    items, groups = values.shape[-1], layout.n_groups
    if n_seeds < 2:
        return Moments(per_seed, estimate, item_var, np.where(item_var > 0, item_df, np.inf), constant, items, groups)
    seed_var = per_seed.var(-1, ddof=1) / n_seeds
    variance = item_var + seed_var
    denominator = np.where(item_var > 0, item_var ** 2 / np.where(item_var > 0, item_df, 1.0), 0.0) \
        + seed_var ** 2 / (n_seeds - 1)
    df = _safe_div(variance ** 2, denominator)
    return Moments(per_seed, estimate, variance, np.where(variance > 0, df, np.inf), constant, items, groups)


def exact_share(n_groups, level: float = LEVEL):
    """The largest share of a population of groups that can behave otherwise when none of n_groups did
    (Clopper-Pearson upper bound for 0 of n)."""
    return 1.0 - ((1.0 - level) / 2) ** (1.0 / np.asarray(n_groups, dtype=np.float64))


def bounds(m: Moments, level: float = LEVEL, rate: bool = True):
    """(low, high) as fractions (arrays over the leading axes of the data). rate: values in [0, 1]: Clopper-Pearson
    at the effective sample size p (1 - p) / variance (at most the number of items; the number of items where
    the variance is 0), shrunk by (z / t)^2; else values in [-1, 1]: Student's t. Where every scored value is the
    same, the exact bound for groups none of which differed (module doc)."""
    from scipy import stats as scipy_stats  # here, not at import: a training process needs no scipy

    estimate, variance, df = (np.asarray(x, dtype=np.float64) for x in (m.estimate, m.variance, m.df))
    alpha = 1.0 - level
    t = scipy_stats.t.ppf(1 - alpha / 2, np.where(np.isfinite(df) & (df > 0), df, 1e9))
    if rate:
        p = np.clip(estimate, 0.0, 1.0)
        z = scipy_stats.norm.ppf(1 - alpha / 2)
        n_eff = np.minimum(_safe_div(p * (1 - p), variance), m.items)
        n_eff = np.where(np.isnan(n_eff), m.items, n_eff) * (z / t) ** 2
        x = p * n_eff
        with np.errstate(invalid="ignore"):
            low = np.where(x > 0, scipy_stats.beta.ppf(alpha / 2, x, n_eff - x + 1), 0.0)
            high = np.where(n_eff - x > 0, scipy_stats.beta.ppf(1 - alpha / 2, x + 1, n_eff - x), 1.0)
        lo_value, hi_value = 0.0, 1.0
    else:
        half = t * np.sqrt(np.maximum(variance, 0.0))
        low, high = np.clip(estimate - half, -1.0, 1.0), np.clip(estimate + half, -1.0, 1.0)
        lo_value, hi_value = -1.0, 1.0
    u = exact_share(m.groups, level)
    flat = np.asarray(m.constant)
    low = np.where(flat, estimate - u * (estimate - lo_value), low)
    high = np.where(flat, estimate + u * (hi_value - estimate), high)
    return low, high


def _check(values, strata, groups):
    values = np.asarray(values, dtype=np.float64)
    values = values[None, :] if values.ndim == 1 else values
    if values.shape[-1] == 0 or len(strata) != values.shape[-1]:
        raise ValueError(f"interval: {values.shape[-1]} items but {len(strata)} strata")
    return values, design(strata, groups)


def _interval(values, layout: Design, statistic: str, level: float, rate: bool, dropped: int = 0) -> Interval:
    m = moments(values, layout, statistic)
    keep = ~np.isnan(m.per_seed)  # a seed whose items are all unscored has no value
    if not keep.any():
        return Interval(float("nan"), float("nan"), float("nan"), dropped=dropped)
    if not keep.all():
        m = moments(values[keep], layout, statistic)
    low, high = bounds(m, level, rate)
    return Interval(100 * float(m.estimate), 100 * float(low), 100 * float(high),
                    tuple(round(100 * float(v), 4) for v in m.per_seed), dropped, float(m.df))


def interval(values: np.ndarray, strata: Sequence[str], groups: Optional[Sequence[Optional[str]]] = None,
             statistic: str = "pooled", level: float = LEVEL) -> Interval:
    """The statistic of `values` ([seeds, items] or [items], each in [0, 1]) with its interval (module doc)."""
    values, layout = _check(values, strata, groups)
    return _interval(values, layout, statistic, level, rate=True)


def paired(values: np.ndarray, reference: np.ndarray, strata: Sequence[str],
           groups: Optional[Sequence[Optional[str]]] = None, statistic: str = "pooled",
           level: float = LEVEL) -> Interval:
    """values - reference (same seeds, same items) over the items both scored, with its interval and the count of
    items only one of them scored (module doc)."""
    values, layout = _check(values, strata, groups)
    reference, _ = _check(reference, strata, groups)
    if reference.shape != values.shape:
        raise ValueError(f"paired: shapes {values.shape} and {reference.shape} differ")
    mine, theirs = np.isnan(values), np.isnan(reference)
    dropped = int((mine ^ theirs).sum())
    return _interval(values - reference, layout, statistic, level, rate=False, dropped=dropped)


def point(values: np.ndarray, strata: Sequence[str], statistic: str = "pooled") -> float:
    """The estimate alone (percent): the mean over seeds of the per-seed statistic."""
    values, layout = _check(values, strata, None)
    per_seed = moments(values, layout, statistic).per_seed
    return 100 * float(np.nanmean(per_seed)) if not np.isnan(per_seed).all() else float("nan")


def chance_level(mode: str, references: Sequence[str], match) -> float:
    """Accuracy (percent) of the best constant answer: the reference that, given for every item, matches most.

    `match(mode, prediction, reference)` is the task's answer matcher (immunize.metrics.match_answer).
    """
    refs = [str(r) for r in references]
    if not refs:
        return float("nan")
    best = max(sum(bool(match(mode, candidate, r)) for r in refs) for candidate in dict.fromkeys(refs))
    return 100.0 * best / len(refs)
