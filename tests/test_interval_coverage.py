"""Coverage of the bench's 95% intervals (immunize.statistics) on synthetic data with a known truth, in the bench's
own layout: 280 harmful items in 14 categories of 7 groups (2-3 phrasings of one request), 5 benign tasks of 250
items, a training-run (seed) spread of about 10 HS points and about 15 points of ΔHS between a defense and its
reference, at 1, 3 and 5 seeds, point and paired. Every case must cover at least 92% at the nominal 95% (1000
repetitions each: a binomial standard error of 0.7 points). The simulation is benchmarks/interval_coverage.py; the
settings are here."""
import numpy as np
import pytest

from benchmarks.interval_coverage import Case, covered_now, simulate
from immunize import statistics

REPS = 1000
HARMFUL = dict(statistic="pooled", strata=14, groups=7, phrasings=(3, 3, 3, 3, 3, 3, 2),
               logit_means=(-0.8, -0.3, 0.2, 0.7, 1.2),  # category HS between about 30% and 75%
               group_sd=1.0, item_sd=0.5, seed_sd=0.45, seed_group_sd=0.5)  # seed_sd 0.45: about 10 HS points
CAPABILITY = dict(statistic="macro", strata=5, groups=250, phrasings=(1,), logit_means=(-0.4, -0.6, 1.1, 0.85, 1.4),
                  group_sd=1.0, item_sd=0.0, seed_sd=0.2, seed_group_sd=0.5)  # task accuracies 35-80%
RARE = dict(HARMFUL, logit_means=(-4.5, -4.0, -3.5))  # a rate near 3%
FEW_GROUPS = dict(HARMFUL, groups=2, phrasings=(3,))  # 2 groups per stratum: the bootstrap's (G-1)/G bias
DEFENSE = dict(effect=-1.0, effect_seed_sd=0.6)  # ΔHS about -20 points, about 15 points of spread over seeds
COST = dict(effect=-0.1, effect_seed_sd=0.2)  # Δcap about -2 points

CASES = [Case(f"{name} {seeds} seeds", seeds=seeds, paired=paired, **settings)
         for seeds in (1, 3, 5)
         for name, paired, settings in (("HS", False, HARMFUL), ("ΔHS", True, {**HARMFUL, **DEFENSE}),
                                        ("cap", False, CAPABILITY), ("Δcap", True, {**CAPABILITY, **COST}),
                                        ("rare HS", False, RARE), ("HS few groups", False, FEW_GROUPS),
                                        ("ΔHS few groups", True, {**FEW_GROUPS, **DEFENSE}))]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_case_covers_at_least_92_percent(case):
    covered = covered_now(case, *simulate(case, REPS, np.random.default_rng(7)))
    assert covered.mean() >= 0.92, f"{case.name}: {100 * covered.mean():.1f}%"


def test_a_rate_of_zero_gets_the_exact_bound_for_its_groups():
    strata = [f"c{i // 20}" for i in range(280)]
    groups = [f"g{i // 20}.{min(i % 20 // 3, 6)}" for i in range(280)]  # 6 groups of 3 and 1 of 2 per category
    n_groups = len(set(zip(strata, groups)))
    ci = statistics.interval(np.zeros(280), strata, groups)
    assert (ci.value, ci.low) == (0.0, 0.0)
    assert ci.high == pytest.approx(100 * (1 - 0.025 ** (1 / n_groups)))  # 98 groups: 3.7
    assert 3.6 < ci.high < 3.8
    full = statistics.interval(np.ones((3, 280)), strata, groups)
    assert full.high == 100.0 and full.low == pytest.approx(100 - ci.high)
    same = statistics.paired(np.ones((3, 280)), np.ones((3, 280)), strata, groups)
    assert same.value == 0.0 and same.low == pytest.approx(-ci.high) and same.high == pytest.approx(ci.high)


def test_three_disagreeing_seeds_get_a_t_interval_not_their_range():
    """The README's undefended model at lr 1e-4: HS per seed 55.4 / 57.5 / 75.0. The previous bootstrap could not
    reach past the lowest and highest seed; a t interval on 2 degrees of freedom does."""
    strata = [f"c{i % 14}" for i in range(280)]
    rng = np.random.default_rng(0)
    values = np.stack([(rng.permutation(280) < round(2.8 * hs)).astype(float) for hs in (55.4, 57.5, 75.0)])
    ci = statistics.interval(values, strata)
    per_seed = np.array(ci.per_seed)
    assert ci.value == pytest.approx(per_seed.mean())
    assert ci.low < per_seed.min() - 5 and ci.high > per_seed.max() + 5
    assert 2.0 <= ci.df < 3.0
