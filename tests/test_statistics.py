"""The bench's intervals (immunize.statistics): estimates, clusters, pairing, seeds, the closed-form item variance against
a bootstrap, and the quickstart's width. Coverage over the bench's layouts: tests/test_interval_coverage.py."""
import numpy as np
import pytest

from immunize.metrics import match_answer
from immunize.statistics import chance_level, design, interval, moments, paired


def test_point_estimates_pooled_and_macro():
    values = np.array([1, 1, 0, 0, 1, 0, 0, 0], dtype=float)
    strata = ["a", "a", "a", "a", "b", "b", "b", "b"]
    assert interval(values, strata, statistic="pooled").value == pytest.approx(37.5)
    assert interval(values, strata, statistic="macro").value == pytest.approx((50 + 25) / 2)
    two_seeds = np.stack([values, 1 - values])
    assert interval(two_seeds, strata, statistic="pooled").value == pytest.approx(50.0)


def test_item_interval_covers_the_true_rate():
    rng = np.random.default_rng(1)
    hits = 0
    for rep in range(200):
        values = (rng.random(250) < 0.6).astype(float)
        ci = interval(values, ["t"] * 250)
        hits += ci.low <= 60.0 <= ci.high
    assert 0.90 <= hits / 200 <= 0.99  # nominal 95%


def test_groups_widen_the_interval_when_items_share_knowledge():
    rng = np.random.default_rng(2)
    per_group = (rng.random(50) < 0.5).astype(float)  # 50 pieces of knowledge, each asked 5 times
    values = np.repeat(per_group, 5)
    groups = [f"g{i // 5}" for i in range(250)]
    naive = interval(values, ["t"] * 250)
    clustered = interval(values, ["t"] * 250, groups)
    assert clustered.half_width > 1.8 * naive.half_width  # about sqrt(5) wider


def test_paired_difference_is_narrower_than_the_two_intervals_suggest():
    rng = np.random.default_rng(3)
    a = (rng.random(300) < 0.6).astype(float)
    b = a.copy()
    flip = rng.choice(300, 15, replace=False)
    b[flip] = 1 - b[flip]  # b differs from a on 5% of the items
    strata = ["t"] * 300
    diff = paired(a, b, strata)
    assert diff.half_width < 0.5 * interval(a, strata).half_width


def test_seed_spread_enters_the_interval():
    rng = np.random.default_rng(4)
    base = (rng.random(250) < 0.5).astype(float)
    same = np.stack([base, base, base])
    spread = np.stack([base, np.roll(base, 7) * 0 + 1, base * 0])  # three very different training runs
    assert interval(spread, ["t"] * 250).half_width > 3 * interval(same, ["t"] * 250).half_width


def test_capability_interval_at_the_quickstart_size_is_within_3_points():
    """5 tasks x 250 items with accuracies between chance and ceiling: half-width <= 3 points (issue target)."""
    rng = np.random.default_rng(5)
    rates = [0.4, 0.35, 0.75, 0.7, 0.8]
    values = np.concatenate([(rng.random(250) < r).astype(float) for r in rates])
    strata = [t for t in "abcde" for _ in range(250)]
    assert interval(values, strata, statistic="macro").half_width <= 3.0


def test_chance_level_is_the_best_constant_answer():
    assert chance_level("label", ["positive", "negative", "positive", "positive"], match_answer) == 75.0
    assert chance_level("final_number", ["3", "4", "4"], match_answer) == pytest.approx(200 / 3)
    assert chance_level("exact", ["a b", "c", "d", "e"], match_answer) == 25.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        interval(np.ones(3), ["a", "b"])
    with pytest.raises(ValueError):
        interval(np.ones(3), ["a"] * 3, statistic="median")


def test_closed_form_item_variance_is_the_grouped_bootstrap_variance_with_the_small_sample_correction():
    """The linearised, stratified cluster variance equals (G/(G-1) times) what resampling groups within strata gives,
    for both statistics: the same quantity the previous bootstrap estimated, without its small-sample bias."""
    rng = np.random.default_rng(8)
    strata = [f"s{i % 4}" for i in range(240)]
    groups = [f"g{i % 40}" for i in range(240)]  # 10 groups of 6 per stratum
    values = (rng.random(240) < np.repeat(rng.random(40), 6)[np.argsort(np.argsort(groups))]).astype(float)
    values[rng.choice(240, 10, replace=False)] = np.nan
    layout = design(strata, groups)
    for statistic in ("pooled", "macro"):
        variance = moments(values[None], layout, statistic).variance
        draws = []
        for _ in range(4000):
            picked = np.concatenate([rng.choice(np.flatnonzero(layout.group_stratum[:, h]), 10)
                                     for h in range(4)])
            rows = np.concatenate([np.flatnonzero(layout.item_group[:, g]) for g in picked])
            draws.append(moments(values[None, rows], design([strata[i] for i in rows]), statistic).estimate)
        assert variance == pytest.approx(np.var(draws) * 10 / 9, rel=0.08)


def test_paired_difference_counts_the_items_only_one_model_scored():
    a = np.array([[1.0, np.nan, 0.0, 1.0, 1.0, 0.0]])
    b = np.array([[0.0, 1.0, np.nan, 1.0, 0.0, 0.0]])
    ci = paired(a, b, ["t"] * 6)
    assert ci.dropped == 2
    assert ci.value == pytest.approx(100 * (1 + 0 + 1 + 0) / 4)  # over the 4 items both scored
    assert ci.value != pytest.approx(interval(a, ["t"] * 6).value - interval(b, ["t"] * 6).value)


def test_a_single_seed_interval_is_for_that_model_and_several_seeds_add_their_spread():
    rng = np.random.default_rng(9)
    values = (rng.random((3, 280)) < np.array([[0.5], [0.6], [0.7]])).astype(float)
    strata = [f"c{i % 14}" for i in range(280)]
    one = interval(values[:1], strata)
    three = interval(values, strata)
    assert one.df > 100 and one.per_seed == (round(one.value, 4),)
    assert three.df < 10 and len(three.per_seed) == 3
    assert three.half_width > 2 * one.half_width


def test_strata_of_one_group_are_pooled_for_the_variance_and_a_mixed_rate_is_not_read_as_constant():
    """14 over-refusal requests in 8 categories (three of them with one request): every category with several
    requests is all-refused, so a per-stratum variance is 0; the single-request categories still disagree."""
    strata = ["a"] * 3 + ["b"] * 2 + ["c"] * 2 + ["d"] * 2 + ["e"] * 2 + ["f", "g", "h"]
    values = np.array([1.0] * 11 + [0.0, 1.0, 0.0])
    ci = interval(values, strata)
    assert ci.value == pytest.approx(100 * 12 / 14)
    assert ci.low < 75 and ci.high > 95  # not the exact rule for a constant rate (that gives [65.9, 89.0])
    assert design(strata).group_variance_stratum.shape[1] == 6  # five strata of several groups + the pooled three
