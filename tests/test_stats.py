"""Paired bootstrap intervals and the verdicts that follow from them."""

import numpy as np
import pytest

from scaleot_fed.errors import ConfigError
from scaleot_fed.evaluate import accuracy_from_scores
from scaleot_fed.stats import Comparison, correct_from_scores, group_bootstrap, paired_bootstrap
from scaleot_fed.tasks import MCItem


def test_per_item_correctness_matches_acc_and_acc_norm():
    rng = np.random.default_rng(0)
    items = [MCItem(f"q{i}", tuple("x" * int(n) for n in rng.integers(1, 9, size=3)), int(rng.integers(3)))
             for i in range(200)]
    scores = rng.normal(size=(200, 3)).tolist()
    expected = accuracy_from_scores(items, scores)
    gold = [i.gold for i in items]
    assert correct_from_scores(scores, gold).mean() == pytest.approx(expected["acc"])
    lengths = [[len(c) for c in i.choices] for i in items]
    assert correct_from_scores(scores, gold, lengths).mean() == pytest.approx(expected["acc_norm"])


def test_the_interval_is_exact_at_the_extremes_and_matches_the_normal_approximation():
    ones, zeros = np.ones(300), np.zeros(300)
    result = paired_bootstrap(ones, zeros)
    assert result.difference == 1.0 and result.ci95 == (1.0, 1.0) and result.verdict() == "holds"
    assert paired_bootstrap(zeros, ones).verdict() == "does not hold"
    same = paired_bootstrap(ones, ones)
    assert same.ci95 == (0.0, 0.0) and same.verdict() == "inconclusive"
    # independent coin flips: the paired difference's interval ~ mean +- 1.96 sd / sqrt(n)
    rng = np.random.default_rng(1)
    a, b = (rng.random(2000) < 0.6).astype(float), (rng.random(2000) < 0.5).astype(float)
    result = paired_bootstrap(a, b, resamples=4000)
    half = 1.96 * (a - b).std() / np.sqrt(2000)
    assert result.ci95[0] == pytest.approx(result.difference - half, abs=0.15 * half)
    assert result.ci95[1] == pytest.approx(result.difference + half, abs=0.15 * half)
    assert result.verdict() == "holds" and result.n == 2000


def test_seeds_are_averaged_per_item_and_closeness_needs_the_whole_interval_inside_the_margin():
    rng = np.random.default_rng(2)
    truth = (rng.random(500) < 0.7).astype(float)
    seeds = np.stack([np.where(rng.random(500) < 0.1, 1 - truth, truth) for _ in range(3)])  # (3, 500)
    result = paired_bootstrap(seeds, truth)
    assert result.seeds == (3, 1) and result.difference == pytest.approx((seeds.mean(0) - truth).mean())
    assert result.verdict("close", margin=0.2) == "holds"
    assert paired_bootstrap(np.ones(500), np.zeros(500)).verdict("close", margin=0.2) == "does not hold"
    noisy = paired_bootstrap((rng.random(60) < 0.5).astype(float), (rng.random(60) < 0.5).astype(float))
    assert noisy.verdict("close", margin=0.05) == "inconclusive"
    with pytest.raises(ConfigError, match="same items"):
        paired_bootstrap(np.ones(3), np.ones(4))
    with pytest.raises(ConfigError, match="margin"):
        result.verdict("close")


def test_seed_resampling_widens_the_interval_by_the_training_noise():
    # two "seeds" that disagree on every item: the item-only interval is 0 wide, the seed draw is not
    a = np.stack([np.ones(400), np.zeros(400)])
    b = np.full(400, 0.5)
    result = paired_bootstrap(a, b)
    assert result.difference == 0.0 and result.ci95[0] < -0.2 and result.ci95[1] > 0.2
    assert result.verdict() == "inconclusive"


def test_spearman_is_one_for_the_same_order_and_minus_one_reversed():
    from scaleot_fed.stats import spearman

    assert spearman([0.1, 0.5, 0.3], [1, 9, 4]) == pytest.approx(1.0)
    assert spearman([0.1, 0.5, 0.3], [9, 1, 4]) == pytest.approx(-1.0)


def test_seed_noise_is_counted_once_and_strata_give_the_mean_of_the_groups():
    # 3 seeds x 500 items, per-item training noise only (no seed-wide shift, no true difference):
    # the interval must be about as wide as the items-only one on the seed averages, not wider
    rng = np.random.default_rng(3)
    truth = (rng.random(500) < 0.6).astype(float)
    a = np.stack([np.where(rng.random(500) < 0.2, 1 - truth, truth) for _ in range(3)])
    b = np.stack([np.where(rng.random(500) < 0.2, 1 - truth, truth) for _ in range(3)])
    both = paired_bootstrap(a, b, resamples=4000)
    items_only = paired_bootstrap(a.mean(0), b.mean(0), resamples=4000)
    width = lambda c: c.ci95[1] - c.ci95[0]  # noqa: E731
    assert width(both) < 1.3 * width(items_only)
    # strata: two tasks of 100 and 300 items, a wins all of the first and none of the second
    x = np.r_[np.ones(100), np.zeros(300)]
    result = paired_bootstrap(x, np.zeros(400), strata=[100, 300])
    assert result.difference == pytest.approx(0.5) and result.ci95 == (0.5, 0.5)
    with pytest.raises(ConfigError, match="strata"):
        paired_bootstrap(x, np.zeros(400), strata=[100, 200])


def test_a_bound_on_the_boundary_is_exact_and_reads_inconclusive():
    # seed averages are thirds, which floats do not hold exactly: without rounding, this interval's
    # upper bound came out as +1.6e-17 where its exact value is 0 (and elsewhere as -1.9e-19,
    # which would have read "does not hold")
    a = np.array([[1, 0, 1, 0, 1, 0, 0], [1, 0, 1, 0, 0, 0, 1], [0, 0, 1, 1, 1, 0, 0]], dtype=float)
    b = np.array([[0, 1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 1, 1, 0], [1, 1, 0, 1, 1, 1, 0]], dtype=float)
    result = paired_bootstrap(a, b, resamples=400)
    assert result.ci95[1] == 0.0 and result.verdict() == "inconclusive"
    # one rule for both kinds: an interval touching a boundary decides nothing
    touching = lambda lo, hi: Comparison(0.0, (lo, hi), 10, (1, 1))  # noqa: E731
    assert touching(-0.1, 0.0).verdict() == "inconclusive" and touching(0.0, 0.1).verdict() == "inconclusive"
    assert touching(0.02, 0.05).verdict("close", margin=0.02) == "inconclusive"
    assert touching(-0.05, -0.02).verdict("close", margin=0.02) == "inconclusive"
    assert touching(0.021, 0.05).verdict("close", margin=0.02) == "does not hold"


def test_sides_from_the_same_seeds_are_paired_by_seed_and_the_interval_is_narrower():
    """Both sides share each seed's large shift (the same stage 1 / data order moves every item of
    both): drawn jointly it cancels; drawn apart it counts twice and widens the interval."""
    rng = np.random.default_rng(0)
    items = (rng.random(400) < 0.6).astype(float)  # (items,)
    shifts = np.array([-0.15, 0.0, 0.15])  # (seeds,): what each seed moves every item by
    a = np.clip(items[None, :] + shifts[:, None], 0, 1)  # (seeds, items)
    b = np.clip(items[None, :] + shifts[:, None] - 0.05, 0, 1)  # a's seeds, 5 points lower
    paired = paired_bootstrap(a, b, resamples=4000, pair_seeds=True)
    unpaired = paired_bootstrap(a, b, resamples=4000)
    assert paired.difference == unpaired.difference
    width = lambda c: c.ci95[1] - c.ci95[0]  # noqa: E731
    assert width(paired) < 0.5 * width(unpaired)
    assert paired.verdict() == "holds" and unpaired.verdict() == "inconclusive"
    with pytest.raises(ConfigError, match="same seeds"):
        paired_bootstrap(a, b[:2], pair_seeds=True)


def test_spearman_gives_tied_scores_their_mean_rank():
    """Ties broken by order would call [1, 1, 2] and [2, 1, 3] less than perfectly ranked alike
    when the first two blocks are indistinguishable; with mean ranks the answer is the textbook one."""
    from scaleot_fed.stats import spearman

    # ranks (1.5, 1.5, 3) vs (2, 1, 3): Pearson of the ranks = 0.866
    assert spearman([1.0, 1.0, 2.0], [2.0, 1.0, 3.0]) == pytest.approx(np.sqrt(3) / 2)
    with pytest.raises(ConfigError, match="at least two"):
        spearman([1.0], [1.0])


def test_a_worst_owner_comparison_draws_items_within_owners_and_seeds_jointly():
    import numpy as np

    from scaleot_fed.stats import group_bootstrap

    rng = np.random.default_rng(0)
    # two seeds, three owners of 200 items; side a lifts only the weakest owner (0.5 -> 0.7), which
    # stays the worst by more than 2 standard errors on both sides (so the percentile interval)
    b = [[(rng.random(200) < p).astype(float) for p in (0.5, 0.85, 0.95)] for _ in range(2)]
    a = [[np.where(rng.random(200) < 0.4, 1.0, g) if i == 0 else g.copy() for i, g in enumerate(owners)]
         for owners in b]
    worst = group_bootstrap(a, b, "worst", resamples=2000)
    mean = group_bootstrap(a, b, "mean", resamples=2000)
    expected = np.mean([min(x.mean() for x in sa) - min(x.mean() for x in sb) for sa, sb in zip(a, b)])
    assert worst.difference == pytest.approx(expected) and worst.verdict() == "holds"
    assert worst.interval == "percentile"
    assert mean.difference == pytest.approx(expected / 3, abs=1e-9)  # one owner of three moved
    assert worst.n == 600 and worst.seeds == (2, 2)  # items, each once
    same = group_bootstrap(b, b, "worst", resamples=200)
    assert same.difference == 0.0 and same.ci95 == (0.0, 0.0)  # paired draws: no difference, no width
    with pytest.raises(ConfigError, match="same non-empty groups at the same seeds"):
        group_bootstrap(a, [owners[:2] for owners in b])


def test_a_worst_owner_not_identified_gets_a_simultaneous_interval_that_covers_the_true_minimum():
    rng = np.random.default_rng(0)
    # 8 owners tied at 0.6, 50 items each: the sample minimum sits well below 0.6, and so does the
    # bootstrap's percentile interval of it ([0.368, 0.540] on such a draw)
    tied = [[(rng.random(50) < 0.6).astype(float) for _ in range(8)]]
    c = group_bootstrap(tied, None, "worst", resamples=2000)
    assert c.interval == "simultaneous" and c.difference < 0.6 and c.ci95[0] <= 0.6 <= c.ci95[1]
    # one owner clearly worst (0.2 against 0.8 and 0.9, 200 items each): identified, percentiles
    clear = [[(rng.random(200) < p).astype(float) for p in (0.2, 0.8, 0.9)]]
    c = group_bootstrap(clear, None, "worst", resamples=2000)
    assert c.interval == "percentile" and c.ci95[1] - c.ci95[0] < 0.15
    assert group_bootstrap(tied, None, "mean", resamples=200).interval == "percentile"  # a smooth statistic
    # owners with every item right: no spread in the data, yet their true rates may be below 1
    perfect = group_bootstrap([[np.ones(50) for _ in range(8)]], None, "worst", resamples=200)
    assert perfect.difference == 1.0 and perfect.interval == "simultaneous" and perfect.ci95[0] < 0.99


def test_worst_owner_differences_keep_their_coverage_where_one_side_is_tied():
    # side a: one owner at 0.5, seven at 0.7; side b: eight tied at 0.6 (50 items each, the federated
    # study's per_owner_items): the true difference of the minima is -0.1. Percentiles alone cover it
    # in about 50-70 % of such draws (b's sample minimum sits ~10 points low); the procedure keeps 95 %.
    rng, truth, covered = np.random.default_rng(1), -0.1, 0
    for _ in range(100):
        a = [[(rng.random(50) < p).astype(float) for p in [0.5] + [0.7] * 7]]
        b = [[(rng.random(50) < 0.6).astype(float) for _ in range(8)]]
        lo, hi = group_bootstrap(a, b, "worst", resamples=500, seed=int(rng.integers(1 << 30))).ci95
        covered += lo <= truth <= hi
    assert covered >= 90


def test_a_worst_owner_comparison_over_tasks_weighs_each_task_the_same():
    rng = np.random.default_rng(2)

    def task(owners: int, items: int, lift: float):  # two seeds; side a lifts the clearly weakest owner
        b = [[(rng.random(items) < p).astype(float) for p in [0.3] + [0.9] * (owners - 1)] for _ in range(2)]
        a = [[np.where(rng.random(items) < lift, 1.0, g) if i == 0 else g for i, g in enumerate(o)] for o in b]
        return a, b

    (a1, b1), (a2, b2) = task(3, 300, 0.3), task(5, 100, 0.0)  # task 2: no change at all
    one = group_bootstrap(a1, b1, "worst", resamples=1000)
    two = group_bootstrap(a2, b2, "worst", resamples=1000)
    pooled = group_bootstrap(a1 + a2, b1 + b2, "worst", resamples=1000, tasks=2)
    assert pooled.difference == pytest.approx((one.difference + two.difference) / 2)  # not weighted by items
    assert two.difference == 0.0 and pooled.seeds == (2, 2) and pooled.n == 900 + 500
    assert pooled.ci95[0] <= pooled.difference <= pooled.ci95[1] and pooled.interval == "percentile"
    with pytest.raises(ConfigError, match="cannot be 3 tasks"):
        group_bootstrap(a1 + a2, b1 + b2, "worst", tasks=3)
