"""Coverage of the worst data owner's 95 % interval (``scaleot_fed.stats.group_bootstrap``).

    python benchmarks/owner_intervals.py [--replicates 400 --resamples 1000 --items 50]

The worst owner's accuracy is the minimum of the owners' means, a statistic the bootstrap does
not reproduce where owners are nearly tied (the sample minimum of tied owners sits below the true
one, and the bootstrap cannot see by how much). Per scenario (true owner accuracies on both sides,
items per owner, how correlated the two sides' per-item results are) this draws ``--replicates``
data sets and counts how often the interval holds the true difference of the minima: the plain
two-level percentile interval next to the procedure the study uses (percentiles where the worst
owner is identified on both sides, simultaneous bands elsewhere), with their mean widths and how
often the procedure fell back to the bands; one seed, and two scenarios again at three seeds.
Ideal: 95 % coverage at the smallest width. Writes benchmarks/results/owner_intervals.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaleot_fed.stats import group_bootstrap  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "owner_intervals.json"
SCENARIOS = {  # name: (side a's owner accuracies, side b's); 8 owners, as the federated study's
    "both tied at 0.6": ([0.6] * 8, [0.6] * 8),
    "a: one owner at 0.5; b: tied at 0.6": ([0.5] + [0.7] * 7, [0.6] * 8),
    "a: tied at 0.6; b: one owner at 0.5": ([0.6] * 8, [0.5] + [0.7] * 7),
    "the same owner worst, 0.45 vs 0.5": ([0.45] + [0.7] * 7, [0.5] + [0.7] * 7),
    "graded 0.45..0.75 vs 0.43..0.73": (list(np.linspace(0.45, 0.75, 8)), list(np.linspace(0.43, 0.73, 8))),
    "clear worst, 0.3 vs 0.4": ([0.3] + [0.75] * 7, [0.4] + [0.75] * 7),
    "a: two tied at 0.5; b: one at 0.5": ([0.5, 0.5] + [0.85] * 6, [0.5] + [0.85] * 7),
}
SEEDED = {  # the same at 3 seeds, each side's owners moved together by a seed's N(0, 0.03) shift
    "3 seeds: a: one owner at 0.5; b: tied at 0.6": ([0.5] + [0.7] * 7, [0.6] * 8),
    "3 seeds: clear worst, 0.3 vs 0.4": ([0.3] + [0.75] * 7, [0.4] + [0.75] * 7),
}
SEED_SHIFT = 0.03


def draw(rng: np.random.Generator, pa: list[float], pb: list[float], items: int, rho: float, seeds: int = 1):
    """Per-item 0/1 results of both sides on the same items at each seed, ``[seed][owner]``; with
    probability ``rho`` an item's two results share their uniform draw (two models fine-tuned alike
    get the same items right). With several seeds, each side's owners move together by a seed's
    shift (training noise); it has mean 0, so the truth stays the difference of the minima."""
    a, b = [], []
    for _ in range(seeds):
        shift = rng.normal(0, SEED_SHIFT, size=2) if seeds > 1 else np.zeros(2)
        a.append([]), b.append([])
        for p, q in zip(pa, pb):
            u = rng.random(items)
            v = np.where(rng.random(items) < rho, u, rng.random(items))
            a[-1].append((u < p + shift[0]).astype(float))
            b[-1].append((v < q + shift[1]).astype(float))
    return a, b


def percentile_only(a, b, resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """The plain two-level percentile interval: what the study used before (items drawn within
    each seed's owners, the same draw on both sides; seeds drawn with replacement, scaled)."""
    per_seed = []
    for sa, sb in zip(a, b):
        ga, gb = np.stack(sa), np.stack(sb)  # (owners, items)
        drawn = rng.integers(0, ga.shape[1], size=(resamples, *ga.shape))  # (resamples, owners, items)
        ma = np.take_along_axis(np.broadcast_to(ga, drawn.shape), drawn, axis=2).mean(axis=2)
        mb = np.take_along_axis(np.broadcast_to(gb, drawn.shape), drawn, axis=2).mean(axis=2)
        per_seed.append(ma.min(axis=1) - mb.min(axis=1))  # (resamples,)
    per_seed = np.stack(per_seed)  # (seeds, resamples)
    centre, seeds = per_seed.mean(axis=0), len(a)
    if seeds > 1:
        picks = rng.integers(0, seeds, size=(resamples, seeds))
        drawn_seeds = np.take_along_axis(per_seed.T, picks, axis=1).mean(axis=1)
        centre = centre + (drawn_seeds - centre) * np.sqrt(seeds / (seeds - 1))
    lo, hi = np.percentile(centre, [2.5, 97.5])
    return float(lo), float(hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicates", type=int, default=400)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--items", type=int, default=50, help="held-out items per owner (the federated study's per_owner_items: 50)")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.0, 0.8])
    args = parser.parse_args()
    rng, out, start = np.random.default_rng(0), [], time.perf_counter()
    print(f"{args.replicates} data sets per line, {args.items} items per owner, {args.resamples} resamples; "
          "coverage of the true difference of the minima (ideal 0.95) and mean width in points")
    print(f"{'scenario':46s} {'rho':>4s}  {'percentile':>18s}  {'study procedure':>18s}  {'bands used':>10s}")
    lines = [(rho, name, pair, 1) for rho in args.rhos for name, pair in SCENARIOS.items()] + \
            [(rho, name, pair, 3) for rho in args.rhos for name, pair in SEEDED.items()]
    for rho, name, (pa, pb), seeds in lines:
        truth = min(pa) - min(pb)
        hits, widths, bands = np.zeros(2), np.zeros(2), 0
        for _ in range(args.replicates):
            a, b = draw(rng, pa, pb, args.items, rho, seeds)
            c = group_bootstrap(a, b, "worst", args.resamples, seed=int(rng.integers(1 << 31)))
            for k, (lo, hi) in enumerate((percentile_only(a, b, args.resamples, rng), c.ci95)):
                hits[k] += lo <= truth <= hi
                widths[k] += hi - lo
            bands += c.interval == "simultaneous"
        cover, width = hits / args.replicates, 100 * widths / args.replicates
        out.append({"scenario": name, "rho": rho, "items": args.items, "seeds": seeds, "truth": truth,
                    "coverage": {"percentile": cover[0], "study": cover[1]},
                    "width_points": {"percentile": width[0], "study": width[1]},
                    "simultaneous_share": bands / args.replicates})
        print(f"{name:46s} {rho:4.1f}  {cover[0]:6.2f} ({width[0]:5.1f} pts)  {cover[1]:6.2f} ({width[1]:5.1f} pts)"
              f"  {bands / args.replicates:10.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"replicates": args.replicates, "resamples": args.resamples, "items": args.items,
                                   "seconds": time.perf_counter() - start, "lines": out}, indent=1) + "\n")
    print(f"wrote {RESULTS} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
