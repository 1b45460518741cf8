"""Coverage of the bench's 95% intervals on synthetic data whose true value is known, in the bench's own layout.

A case describes an item set (strata, groups of phrasings per stratum, items per group) and how values arise: item i
of stratum h in group g, scored on a model trained with seed s, is 1 with probability
sigmoid(mu_h + a_g + c_i + b_s + e_sg): a_g the group's knowledge, c_i the phrasing, b_s the training run, e_sg the
run's idiosyncratic response to that group. A paired case adds a second model (a defense) on the same items and
seeds: shift `effect` and its own extra run effect (sd `effect_seed_sd`) and group response (sd `seed_group_sd`).
Every repetition draws a new item set, new runs and new 0/1 outcomes.

The target: with several seeds, the expected statistic over runs and items; with one seed, the expected statistic
over items of the model that seed trained (what a one-seed interval is for). Expectations of the sigmoid of a normal
are computed by Gauss-Hermite quadrature, so the truth is exact up to quadrature error (< 1e-9).

    python benchmarks/interval_coverage.py            # the coverage test's cases: new method beside the previous bootstrap
    python benchmarks/interval_coverage.py --reps 300 --json

The previous method (a percentile bootstrap that resampled items within strata and seeds with replacement) is kept
here, as it was, only to measure it beside the new one; the bench uses immunize.statistics.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from immunize import statistics  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    statistic: str  # "pooled" (harmful score) or "macro" (capability)
    seeds: int
    paired: bool
    strata: int
    groups: int  # per stratum
    phrasings: tuple  # items per group, cycled over a stratum's groups
    logit_means: tuple  # mu_h, cycled over strata
    group_sd: float
    item_sd: float
    seed_sd: float
    seed_group_sd: float
    effect: float = 0.0
    effect_seed_sd: float = 0.0

    @property
    def items(self) -> int:
        return self.strata * sum(self.phrasings[g % len(self.phrasings)] for g in range(self.groups))


def layout(case: Case) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(strata, groups, stratum index per item, group index per item)."""
    strata, groups, s_index, g_index = [], [], [], []
    for h in range(case.strata):
        for g in range(case.groups):
            for _ in range(case.phrasings[g % len(case.phrasings)]):
                strata.append(f"s{h}")
                groups.append(f"s{h}g{g}")
                s_index.append(h)
                g_index.append(h * case.groups + g)
    return strata, groups, np.array(s_index), np.array(g_index)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(80)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


def mean_sigmoid(mean, sd):
    """E[sigmoid(mean + sd Z)], Z standard normal (broadcasts over mean)."""
    mean = np.asarray(mean, dtype=np.float64)
    return (_sigmoid(mean[..., None] + sd * _NODES) * _WEIGHTS).sum(-1)


def _target(case: Case, s_index: np.ndarray, shift: np.ndarray, sd: float) -> np.ndarray:
    """[reps] the statistic's expectation when every stratum's logit mean moves by `shift` [reps] and the rest of
    the logit is normal with standard deviation sd."""
    per_stratum = mean_sigmoid(_mu(case)[None, :] + shift[:, None], sd)
    if case.statistic == "macro":
        return per_stratum.mean(-1)
    weights = np.bincount(s_index, minlength=case.strata) / len(s_index)
    return per_stratum @ weights


def _mu(case: Case) -> np.ndarray:
    return np.array([case.logit_means[h % len(case.logit_means)] for h in range(case.strata)], dtype=np.float64)


def simulate(case: Case, reps: int, rng: np.random.Generator):
    """(values [reps, seeds, items], reference values or None, true value [reps] as a fraction, strata, groups)."""
    strata, groups, s_index, g_index = layout(case)
    n, n_groups, S = len(strata), case.strata * case.groups, case.seeds
    mu = _mu(case)[s_index]
    fixed = mu + rng.normal(0, case.group_sd, (reps, n_groups))[:, g_index] + rng.normal(0, case.item_sd, (reps, n))
    run = rng.normal(0, case.seed_sd, (reps, S))
    response = rng.normal(0, case.seed_group_sd, (reps, S, n_groups))[..., g_index]
    eta = fixed[:, None, :] + run[..., None] + response
    base = (rng.random(eta.shape) < _sigmoid(eta)).astype(np.float64)
    within = np.sqrt(case.group_sd ** 2 + case.item_sd ** 2 + case.seed_group_sd ** 2)
    zero = np.zeros(reps)
    if not case.paired:
        truth = _target(case, s_index, run[:, 0] if S == 1 else zero,
                        within if S == 1 else np.hypot(within, case.seed_sd))
        return base, None, truth, strata, groups
    extra_run = rng.normal(0, case.effect_seed_sd, (reps, S))
    extra_response = rng.normal(0, case.seed_group_sd, (reps, S, n_groups))[..., g_index]
    defended = (rng.random(eta.shape) < _sigmoid(eta + case.effect + extra_run[..., None] + extra_response)
                ).astype(np.float64)
    within_defended = np.hypot(within, case.seed_group_sd)
    if S == 1:
        truth = _target(case, s_index, case.effect + run[:, 0] + extra_run[:, 0], within_defended) - \
            _target(case, s_index, run[:, 0], within)
    else:
        truth = _target(case, s_index, zero + case.effect,
                        np.sqrt(within_defended ** 2 + case.seed_sd ** 2 + case.effect_seed_sd ** 2)) - \
            _target(case, s_index, zero, np.hypot(within, case.seed_sd))
    return defended, base, truth, strata, groups


def covered_now(case: Case, values, reference, truth, strata, groups, level: float = statistics.LEVEL) -> np.ndarray:
    """[reps] bool: does immunize.statistics' interval contain the truth (all repetitions at once)."""
    layout_ = statistics.design(strata, groups)
    data = values - reference if case.paired else values
    low, high = statistics.bounds(statistics.moments(data, layout_, case.statistic), level, rate=not case.paired)
    return (low <= truth) & (truth <= high)


def previous_bootstrap(values, strata, groups, statistic, n_boot=2000, seed=0, level=0.95):
    """The percentile bootstrap the bench used before (items resampled within strata by group, seeds resampled with
    replacement, every seed of a draw on the same item resample): (low, high) as fractions."""
    layout_ = statistics.design(strata, groups)
    S = values.shape[0]
    scored = ~np.isnan(values)
    sums = np.where(scored, values, 0.0) @ layout_.item_group
    counts = scored.astype(np.float64) @ layout_.item_group
    rng = np.random.default_rng(seed)
    draw_sums = np.zeros((n_boot, S, layout_.group_stratum.shape[1]))
    draw_counts = np.zeros_like(draw_sums)
    for h in range(layout_.group_stratum.shape[1]):
        members = np.flatnonzero(layout_.group_stratum[:, h])
        pick = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        draw_sums[..., h] = sums[:, pick].sum(-1).T
        draw_counts[..., h] = counts[:, pick].sum(-1).T
    with np.errstate(invalid="ignore", divide="ignore"):
        if statistic == "pooled":
            per_seed = draw_sums.sum(-1) / draw_counts.sum(-1)
        else:
            per_seed = np.nanmean(draw_sums / draw_counts, -1)
    stats = np.take_along_axis(per_seed, rng.integers(0, S, size=(n_boot, S)), axis=1).mean(1)
    alpha = (1 - level) / 2
    return tuple(np.quantile(stats[~np.isnan(stats)], [alpha, 1 - alpha]))


def covered_before(case: Case, values, reference, truth, strata, groups) -> np.ndarray:
    data = values - reference if case.paired else values
    out = []
    for k in range(data.shape[0]):
        low, high = previous_bootstrap(data[k], strata, groups, case.statistic, n_boot=1000, seed=k)
        out.append(low <= truth[k] <= high)
    return np.array(out)


def issue_cases() -> list[Case]:
    """The cases the coverage test checks (its settings live in the test, tests/test_interval_coverage.py)."""
    from tests.test_interval_coverage import CASES

    return CASES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1000)
    parser.add_argument("--previous_reps", type=int, default=400, help="repetitions for the previous bootstrap (slow)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for case in issue_cases():
        start = time.perf_counter()
        data = simulate(case, args.reps, np.random.default_rng(7))  # the coverage test's draws
        now = covered_now(case, *data)
        seconds = time.perf_counter() - start
        previous = covered_before(case, *(d[:args.previous_reps] if isinstance(d, np.ndarray) else d for d in data))
        rows.append({"case": case.name, "new": round(100 * now.mean(), 1), "previous": round(100 * previous.mean(), 1),
                     "reps": args.reps, "previous_reps": args.previous_reps, "new_seconds": round(seconds, 2),
                     "settings": asdict(case)})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"| case | new method coverage % ({args.reps} reps) | previous bootstrap % ({args.previous_reps} reps) |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['new']} | {r['previous']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
