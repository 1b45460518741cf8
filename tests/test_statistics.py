"""The bench's intervals: coverage of the item bootstrap, clusters, pairing, seeds, and the quickstart's width."""
import numpy as np
import pytest

from immunize.metrics import match_answer
from immunize.statistics import bootstrap, chance_level


def test_point_estimates_pooled_and_macro():
    values = np.array([1, 1, 0, 0, 1, 0, 0, 0], dtype=float)
    strata = ["a", "a", "a", "a", "b", "b", "b", "b"]
    assert bootstrap(values, strata, statistic="pooled").value == pytest.approx(37.5)
    assert bootstrap(values, strata, statistic="macro").value == pytest.approx((50 + 25) / 2)
    two_seeds = np.stack([values, 1 - values])
    assert bootstrap(two_seeds, strata, statistic="pooled").value == pytest.approx(50.0)


def test_item_bootstrap_covers_the_true_rate():
    rng = np.random.default_rng(1)
    hits = 0
    for rep in range(200):
        values = (rng.random(250) < 0.6).astype(float)
        ci = bootstrap(values, ["t"] * 250, n_boot=1000, seed=rep)
        hits += ci.low <= 60.0 <= ci.high
    assert 0.90 <= hits / 200 <= 0.99  # nominal 95%


def test_groups_widen_the_interval_when_items_share_knowledge():
    rng = np.random.default_rng(2)
    per_group = (rng.random(50) < 0.5).astype(float)  # 50 pieces of knowledge, each asked 5 times
    values = np.repeat(per_group, 5)
    groups = [f"g{i // 5}" for i in range(250)]
    naive = bootstrap(values, ["t"] * 250)
    clustered = bootstrap(values, ["t"] * 250, groups)
    assert clustered.half_width > 1.8 * naive.half_width  # about sqrt(5) wider


def test_paired_difference_is_narrower_than_the_two_intervals_suggest():
    rng = np.random.default_rng(3)
    a = (rng.random(300) < 0.6).astype(float)
    b = a.copy()
    flip = rng.choice(300, 15, replace=False)
    b[flip] = 1 - b[flip]  # b differs from a on 5% of the items
    strata = ["t"] * 300
    diff = bootstrap(a - b, strata)
    assert diff.half_width < 0.5 * bootstrap(a, strata).half_width


def test_seed_spread_enters_the_interval():
    rng = np.random.default_rng(4)
    base = (rng.random(250) < 0.5).astype(float)
    same = np.stack([base, base, base])
    spread = np.stack([base, np.roll(base, 7) * 0 + 1, base * 0])  # three very different training runs
    assert bootstrap(spread, ["t"] * 250).half_width > 3 * bootstrap(same, ["t"] * 250).half_width


def test_capability_interval_at_the_quickstart_size_is_within_3_points():
    """5 tasks x 250 items with accuracies between chance and ceiling: half-width <= 3 points (issue target)."""
    rng = np.random.default_rng(5)
    rates = [0.4, 0.35, 0.75, 0.7, 0.8]
    values = np.concatenate([(rng.random(250) < r).astype(float) for r in rates])
    strata = [t for t in "abcde" for _ in range(250)]
    assert bootstrap(values, strata, statistic="macro").half_width <= 3.0


def test_chance_level_is_the_best_constant_answer():
    assert chance_level("label", ["positive", "negative", "positive", "positive"], match_answer) == 75.0
    assert chance_level("final_number", ["3", "4", "4"], match_answer) == pytest.approx(200 / 3)
    assert chance_level("exact", ["a b", "c", "d", "e"], match_answer) == 25.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        bootstrap(np.ones(3), ["a", "b"])
    with pytest.raises(ValueError):
        bootstrap(np.ones(3), ["a"] * 3, statistic="median")
