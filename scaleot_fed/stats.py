"""Paired comparisons of per-item results: bootstrap confidence intervals and verdicts.

Two models scored on the same items are compared item by item: a bootstrap draws items with
replacement (the same draw for both models) from the seed-averaged per-item difference, and adds
how far the mean moves when a model's seeds are drawn with replacement, so the interval covers
both the item sample and the training noise the seeds show. A claim
is a direction (``greater``: A beats B) or a closeness (``close``: A within ``margin`` of B); its
verdict follows from the interval alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

VERDICTS = ("holds", "does not hold", "inconclusive")
CHUNK = 256


def correct_from_scores(scores: list[list[float]], gold: list[int], lengths: list[list[int]] | None = None) -> np.ndarray:
    """Per item, 1.0 where the highest-scored choice is the gold one (``acc``), or with
    ``lengths`` (characters per choice) the highest score per character (``acc_norm``)."""
    out = np.empty(len(scores))
    for i, item in enumerate(scores):
        values = [s / n for s, n in zip(item, lengths[i])] if lengths is not None else item
        out[i] = float(int(np.argmax(values)) == gold[i])
    return out


@dataclass(frozen=True)
class Comparison:
    """``mean(A) - mean(B)`` with its 95% interval, over ``n`` items."""

    difference: float
    ci95: tuple[float, float]
    n: int
    seeds: tuple[int, int]
    interval: str = "percentile"
    """How the interval was made: ``percentile`` (bootstrap percentiles) or ``simultaneous``
    (bands that hold for every group at once: :func:`group_bootstrap`'s worst group when it is not
    identified)."""

    def verdict(self, kind: str = "greater", margin: float = 0.0) -> str:
        """``holds`` / ``does not hold`` / ``inconclusive`` for the claim "A > B" (``greater``) or
        "A is within ``margin`` of B" (``close``), decided by the interval."""
        lo, hi = self.ci95
        # one rule for both kinds: decided only when the interval lies strictly on one side of
        # each boundary (0; +-margin); an interval touching a boundary is inconclusive
        if kind == "greater":
            return "holds" if lo > 0 else "does not hold" if hi < 0 else "inconclusive"
        if kind == "close":
            if margin <= 0:
                raise ConfigError("a 'close' claim needs a margin > 0")
            return "holds" if -margin < lo and hi < margin else (
                "does not hold" if lo > margin or hi < -margin else "inconclusive")
        raise ConfigError(f"claim kind must be 'greater' or 'close', got {kind!r}")


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0,
                     strata: list[int] | None = None, pair_seeds: bool = False) -> Comparison:
    """Compare per-item results ``a`` ``(seeds_a, items)`` and ``b`` ``(seeds_b, items)`` (1-D:
    one seed) on the same items.

    The difference is of the seed-averaged means (with ``strata``, item counts of consecutive
    groups such as tasks: the mean of the groups' means). Its interval: the 2.5 / 97.5
    percentiles over ``resamples`` of (items drawn with replacement, within each stratum, from the
    per-item difference of the seed averages) plus, per side with several seeds, the shift its
    seeds' means show when drawn with replacement, scaled by ``sqrt(S / (S - 1))`` so that S
    seeds do not understate the seed variance. Items carry the item and per-item training noise;
    the shift adds what a seed moves every item by, which averaging over items cannot remove.
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ConfigError(f"paired comparison needs the same items on both sides, got {a.shape[1]} and {b.shape[1]}")
    if pair_seeds and a.shape[0] != b.shape[0]:
        raise ConfigError(f"pairing by seed needs the same seeds on both sides, got {a.shape[0]} and {b.shape[0]}")
    strata = strata or [a.shape[1]]
    if sum(strata) != a.shape[1] or min(strata) < 1:
        raise ConfigError(f"strata {strata} must be positive item counts summing to {a.shape[1]}")
    bounds = np.cumsum([0, *strata])
    groups = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def macro(x: np.ndarray) -> np.ndarray:  # (..., items) -> (...,): the mean of the strata's means
        return np.mean([x[..., g].mean(axis=-1) for g in groups], axis=0)

    per_item = a.mean(axis=0) - b.mean(axis=0)  # (items,)
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for start in range(0, resamples, CHUNK):  # (chunk, items) draws at a time: bounded memory
        m = min(CHUNK, resamples - start)
        parts = []
        for g in groups:
            values = per_item[g]
            parts.append(values[rng.integers(0, values.size, size=(m, values.size))].mean(axis=1))
        shift = _seed_shift(macro(a) - macro(b), m, rng) if pair_seeds else \
            _seed_shift(macro(a), m, rng) - _seed_shift(macro(b), m, rng)
        means[start : start + m] = np.mean(parts, axis=0) + shift
    lo, hi = np.percentile(_exact(means), [2.5, 97.5])
    return Comparison(float(_exact(macro(per_item))), (float(lo), float(hi)), a.shape[1], (a.shape[0], b.shape[0]))


GROUP_STATISTICS = ("worst", "mean")
"""Over a row's groups of items (a federation's owners): the lowest group mean, the mean of them."""

Z95 = 1.959964
"""The standard normal's 97.5th percentile: a single two-sided 95 % band's half-width in standard errors."""

SEPARATED = 2.0
"""How many standard errors of their difference the lowest group mean must lie below the second
lowest for the worst group to count as identified (see :func:`group_bootstrap`)."""


def group_bootstrap(a: list[list[np.ndarray]], b: list[list[np.ndarray]] | None, statistic: str = "worst",
                    resamples: int = 10_000, seed: int = 0, tasks: int = 1) -> Comparison:
    """Compare a statistic over groups of items (``worst``: the lowest group's mean, e.g. the worst
    data owner's accuracy on its own held-out items; ``mean``: the mean of the groups' means) between
    two sides scored at the same seeds on the same groups: ``a[s][g]`` is the per-item result of
    group ``g`` at the ``s``-th seed (groups may differ from seed to seed: a seed draws its own
    owners), ``b[s][g]`` the other side's on the same items; ``b=None``: the statistic of ``a`` alone.

    With ``tasks`` > 1, ``a`` holds ``tasks`` consecutive runs of the same seeds (task by task, the
    seeds in the same order) and the difference is the mean over tasks, each task weighing the
    same; the seeds are drawn jointly across tasks, as :func:`paired_bootstrap` draws them over strata.

    The difference is the mean over seeds of ``statistic(a's groups) - statistic(b's groups)``. Its
    interval: two-level bootstrap percentiles: items drawn with replacement within every (seed,
    group), the same draw for both sides, and the seeds' differences drawn with replacement (their
    spread scaled by ``sqrt(S / (S - 1))``, as in :func:`paired_bootstrap`).

    ``worst`` is not a smooth statistic: where two groups are nearly tied for the lowest, the
    sample minimum sits below the true one and the bootstrap cannot see by how much (its percentile
    interval of 8 tied owners of 50 items misses the truth most of the time;
    ``benchmarks/owner_intervals.py`` measures it). So the percentile interval is used only where,
    at every seed and on each side, the lowest group mean lies more than :data:`SEPARATED`
    standard errors of their difference below the second lowest. Elsewhere the interval is
    simultaneous (``interval="simultaneous"``): every group mean of each side, and every group's
    paired difference, gets a band from the same draws, wide enough that all of them hold at once
    in 95 % of the draws (the largest studentized deviation's 95th percentile). The statistic's
    bounds follow from the bands' ends (the minimum is monotone in each group's mean; the
    difference of two minima lies between the lowest and the highest paired group difference),
    widened by the seeds' spread (in quadrature). That interval is valid, up to the bootstrap's
    approximation, whichever group is truly the lowest, and wide: a tie for the worst owner is
    rarely decided, and more seeds do not narrow it (each seed's minimum is bounded on its own).

    ``n`` counts each item once (one seed's groups per task), as :func:`paired_bootstrap`'s does.
    """
    if statistic not in GROUP_STATISTICS:
        raise ConfigError(f"group statistic must be one of {GROUP_STATISTICS}, got {statistic!r}")
    sizes = [[np.asarray(g).size for g in groups] for groups in a]
    alone = b is None
    if alone:  # the statistic of a alone: a side of constant zeros, which adds nothing
        b = [[np.zeros(n) for n in counts] for counts in sizes]
    if not a or sizes != [[np.asarray(g).size for g in groups] for groups in b] or min(min(x) for x in sizes) < 1:
        raise ConfigError(f"a group comparison needs both sides on the same non-empty groups at the same seeds, got "
                          f"{sizes} and {[[np.asarray(g).size for g in groups] for groups in b]}")
    if tasks < 1 or len(a) % tasks:
        raise ConfigError(f"{len(a)} runs of groups cannot be {tasks} tasks at the same seeds")
    sides = [[[np.asarray(g, dtype=float) for g in groups] for groups in side] for side in (a, b)]  # [side][seed][group]
    sides.append([[x - y for x, y in zip(ga, gb)] for ga, gb in zip(*sides)])  # [2]: the paired differences
    mu = [[np.array([g.mean() for g in groups]) for groups in side] for side in sides]  # [side][seed] (groups,)
    se = [[np.array([_standard_error(g) for g in groups]) for groups in side] for side in sides]
    reduce = np.min if statistic == "worst" else np.mean
    cells, seeds = len(a), len(a) // tasks  # a cell: one (task, seed)
    # (cells,) -> (seeds,): each seed's difference, the mean over tasks (every task has every seed)
    point = np.array([reduce(ma) - reduce(mb) for ma, mb in zip(mu[0], mu[1])]).reshape(tasks, seeds).mean(axis=0)
    rng = np.random.default_rng(seed)
    values, deviation = np.zeros(resamples), np.zeros(resamples)
    for start in range(0, resamples, CHUNK):
        m = min(CHUNK, resamples - start)
        per_cell = np.empty((cells, m))  # each (task, seed)'s resampled difference of the statistic
        for s in range(cells):
            drawn_means = [[], []]  # [side] -> per group (m,)
            for g, x in enumerate(sides[0][s]):
                drawn = rng.integers(0, x.size, size=(m, x.size))  # (m, items): one draw for both sides
                for side in (0, 1):
                    drawn_means[side].append(sides[side][s][g][drawn].mean(axis=1))  # (m,)
                # studentized deviations of a's, b's and the paired difference's group means
                ends = (drawn_means[0][-1], drawn_means[1][-1], drawn_means[0][-1] - drawn_means[1][-1])
                for side, means in enumerate(ends):
                    t = np.abs(means - mu[side][s][g]) / max(se[side][s][g], 1e-12)
                    deviation[start : start + m] = np.maximum(deviation[start : start + m], t)
            per_cell[s] = reduce(np.stack(drawn_means[0]), axis=0) - reduce(np.stack(drawn_means[1]), axis=0)
        per_seed = per_cell.reshape(tasks, seeds, m).mean(axis=0)  # (seeds, m)
        centre = per_seed.mean(axis=0)  # (m,)
        if seeds > 1:
            picks = rng.integers(0, seeds, size=(m, seeds))
            drawn_seeds = np.take_along_axis(per_seed.T, picks, axis=1).mean(axis=1)
            centre = centre + (drawn_seeds - centre) * np.sqrt(seeds / (seeds - 1))
        values[start : start + m] = centre
    n = sum(sum(sizes[t * seeds]) for t in range(tasks))  # items, each counted once (as paired_bootstrap's n)
    checked = (0,) if alone else (0, 1)  # a side of zeros is tied throughout but has no minimum to find
    if statistic == "mean" or all(_separated(mu[k][s], se[k][s]) for k in checked for s in range(cells)):
        lo, hi = np.percentile(_exact(values), [2.5, 97.5])
        return Comparison(float(_exact(point.mean())), (float(lo), float(hi)), n, (seeds, seeds))
    # every group's band holds at once in 95 % of the draws; never narrower than one band alone
    # (where no item varies, no draw deviates, and the floored standard errors still need a width)
    c = max(float(np.percentile(deviation, 95)), Z95)
    band = [[(m_ - c * s_, m_ + c * s_) for m_, s_ in zip(ms, ss)] for ms, ss in zip(mu, se)]  # [side][seed]
    # min(a) - min(b) lies between the bands' ends, and (for any a, b) between the lowest and the
    # highest paired difference a_g - b_g: both hold where every band does, so their intersection
    # too; the paired bound is the tight one where the two sides get the same items right
    # (the mean over cells: every task has the same seeds, so it is the mean over tasks of each task's)
    lo = np.mean([max(band[0][s][0].min() - band[1][s][1].min(), band[2][s][0].min()) for s in range(cells)])
    hi = np.mean([min(band[0][s][1].min() - band[1][s][0].min(), band[2][s][1].max()) for s in range(cells)])
    # the seeds' spread joins each side's margin in quadrature (independent parts of the error; a
    # plain sum would count the items' noise, which the seeds' points carry too, twice over)
    spread = np.percentile(_seed_shift(point, resamples, rng), [2.5, 97.5])  # zeros for one seed
    centre = point.mean()
    lo, hi = centre - np.hypot(centre - lo, spread[0]), centre + np.hypot(hi - centre, spread[1])
    return Comparison(float(_exact(centre)), (float(_exact(lo)), float(_exact(hi))), n, (seeds, seeds),
                      interval="simultaneous")


def _standard_error(x: np.ndarray) -> float:
    """The standard error of ``x``'s mean, at least that of a 0/1 result with half an item
    disagreeing (``sqrt(p (1 - p) / n)`` at ``p = 0.5 / (n + 1)``): an owner with every item right
    (or two sides agreeing on every item) would otherwise get a band of zero width, though its true
    rate may well be below 1."""
    n = x.size
    spread = x.std(ddof=1) / np.sqrt(n) if n > 1 else 0.0
    p = 0.5 / (n + 1)
    return float(max(spread, np.sqrt(p * (1 - p) / n)))


def _separated(means: np.ndarray, errors: np.ndarray) -> bool:
    """Whether the lowest of ``means`` lies more than :data:`SEPARATED` standard errors of the
    difference below the second lowest (one group: trivially)."""
    if means.size < 2:
        return True
    first, second = np.argsort(means, kind="stable")[:2]
    return bool(means[second] - means[first] > SEPARATED * np.hypot(errors[first], errors[second]))


def _exact(x):
    """``x`` rounded to 1e-12 (``+ 0.0`` turns -0.0 into 0.0): seed averages such as 1/3 are not
    exact in floats, so a resample whose true mean is 0 comes out as +-1e-19 with a random sign,
    and a verdict must not turn on that sign."""
    return np.round(x, 12) + 0.0


def _seed_shift(seed_means: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` draws of how far a resample of the seeds moves the mean: ``(m,)`` (zeros for one seed)."""
    s = seed_means.size
    if s == 1:
        return np.zeros(m)
    drawn = seed_means[rng.integers(0, s, size=(m, s))].mean(axis=1)  # (m,)
    return (drawn - seed_means.mean()) * np.sqrt(s / (s - 1))


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two score lists over the same blocks (tied scores share their
    mean rank, as :func:`scipy.stats.spearmanr` ranks them)."""
    from scipy.stats import spearmanr

    if len(a) < 2 or len(a) != len(b):
        raise ConfigError(f"a rank correlation needs two equally long lists of at least two scores, got {len(a)}, {len(b)}")
    return float(spearmanr(np.asarray(a, dtype=float), np.asarray(b, dtype=float)).statistic)
