"""Paired comparisons of per-item results: bootstrap confidence intervals and verdicts.

Two models scored on the same items are compared item by item: a bootstrap draws items with
replacement (the same draw for both models) and, for a model trained with several seeds, draws
its seeds with replacement too (a two-level bootstrap), so the interval covers both the item
sample and the training noise the seeds show. A claim
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
    """``mean(A) - mean(B)`` with its paired bootstrap 95% interval, over ``n`` items."""

    difference: float
    ci95: tuple[float, float]
    n: int
    seeds: tuple[int, int]

    def verdict(self, kind: str = "greater", margin: float = 0.0) -> str:
        """``holds`` / ``does not hold`` / ``inconclusive`` for the claim "A > B" (``greater``) or
        "A is within ``margin`` of B" (``close``), decided by the interval."""
        lo, hi = self.ci95
        if kind == "greater":
            return "holds" if lo > 0 else "does not hold" if hi < 0 else "inconclusive"
        if kind == "close":
            if margin <= 0:
                raise ConfigError("a 'close' claim needs a margin > 0")
            return "holds" if -margin < lo and hi < margin else (
                "does not hold" if lo >= margin or hi <= -margin else "inconclusive")
        raise ConfigError(f"claim kind must be 'greater' or 'close', got {kind!r}")


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> Comparison:
    """Compare per-item results ``a`` ``(seeds_a, items)`` and ``b`` ``(seeds_b, items)`` (1-D:
    one seed) on the same items: the difference of means (each side's seeds averaged), and the
    2.5 / 97.5 percentiles of the difference over ``resamples`` draws of the items and, on each
    side, of its seeds."""
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ConfigError(f"paired comparison needs the same items on both sides, got {a.shape[1]} and {b.shape[1]}")
    n = a.shape[1]
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, CHUNK):  # (chunk, items) draws at a time: bounded memory
        m = min(CHUNK, resamples - start)
        per_item = _seed_draw(a, m, rng) - _seed_draw(b, m, rng)  # (chunk, items)
        draws = rng.integers(0, n, size=(m, n))
        means[start : start + m] = np.take_along_axis(per_item, draws, axis=1).mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Comparison(float((a.mean(axis=0) - b.mean(axis=0)).mean()), (float(lo), float(hi)), n,
                      (a.shape[0], b.shape[0]))


def _seed_draw(x: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` resamples of ``x``'s seeds (rows), each averaged per item: ``(m, items)``."""
    if x.shape[0] == 1:
        return np.broadcast_to(x[0], (m, x.shape[1]))
    return x[rng.integers(0, x.shape[0], size=(m, x.shape[0]))].mean(axis=1)  # (m, seeds, items) -> (m, items)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two score lists over the same blocks (ties broken by order)."""
    ra = np.argsort(np.argsort(np.asarray(a, dtype=float), kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(np.asarray(b, dtype=float), kind="stable"), kind="stable").astype(float)
    if len(ra) < 2:
        raise ConfigError("a rank correlation needs at least two blocks")
    return float(np.corrcoef(ra, rb)[0, 1])
