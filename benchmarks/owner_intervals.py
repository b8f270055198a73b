"""Coverage of the worst data owner's 95 % interval (``scaleot_fed.stats.group_bootstrap``).

    python benchmarks/owner_intervals.py [--replicates 400 --resamples 1000 --items 71]

The worst owner's accuracy is the minimum of the owners' means, a statistic the bootstrap does
not reproduce where owners are nearly tied (the sample minimum of tied owners sits below the true
one, and the bootstrap cannot see by how much). Per scenario (true owner accuracies on both sides,
items per owner, how correlated the two sides' per-item results are) this draws ``--replicates``
data sets and counts how often the interval holds the true difference of the minima: the plain
two-level percentile interval next to the procedure the study uses (percentiles where the worst
owner is identified on both sides, simultaneous bands elsewhere), with their mean widths and how
often the procedure fell back to the bands. Ideal: 95 % coverage at the smallest width. Writes
benchmarks/results/owner_intervals.json.
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
}


def draw(rng: np.random.Generator, pa: list[float], pb: list[float], items: int, rho: float):
    """Per-item 0/1 results of both sides on the same items; with probability ``rho`` an item's
    two results share their uniform draw (two models fine-tuned alike get the same items right)."""
    a, b = [], []
    for p, q in zip(pa, pb):
        u = rng.random(items)
        v = np.where(rng.random(items) < rho, u, rng.random(items))
        a.append((u < p).astype(float))
        b.append((v < q).astype(float))
    return [a], [b]


def percentile_only(a, b, resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """The plain two-level percentile interval (one seed): what the study used before."""
    ga, gb = np.stack(a[0]), np.stack(b[0])  # (owners, items)
    drawn = rng.integers(0, ga.shape[1], size=(resamples, ga.shape[0], ga.shape[1]))  # (resamples, owners, items)
    ma = np.take_along_axis(np.broadcast_to(ga, drawn.shape), drawn, axis=2).mean(axis=2)
    mb = np.take_along_axis(np.broadcast_to(gb, drawn.shape), drawn, axis=2).mean(axis=2)
    lo, hi = np.percentile(ma.min(axis=1) - mb.min(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicates", type=int, default=400)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--items", type=int, default=71, help="items per owner (ARC-Easy's 570 over 8: 71)")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.0, 0.8])
    args = parser.parse_args()
    rng, out, start = np.random.default_rng(0), [], time.perf_counter()
    print(f"{args.replicates} data sets per line, {args.items} items per owner, {args.resamples} resamples; "
          "coverage of the true difference of the minima (ideal 0.95) and mean width in points")
    print(f"{'scenario':38s} {'rho':>4s}  {'percentile':>18s}  {'study procedure':>18s}  {'bands used':>10s}")
    for rho in args.rhos:
        for name, (pa, pb) in SCENARIOS.items():
            truth = min(pa) - min(pb)
            hits, widths, bands = np.zeros(2), np.zeros(2), 0
            for _ in range(args.replicates):
                a, b = draw(rng, pa, pb, args.items, rho)
                c = group_bootstrap(a, b, "worst", args.resamples, seed=int(rng.integers(1 << 31)))
                for k, (lo, hi) in enumerate((percentile_only(a, b, args.resamples, rng), c.ci95)):
                    hits[k] += lo <= truth <= hi
                    widths[k] += hi - lo
                bands += c.interval == "simultaneous"
            cover, width = hits / args.replicates, 100 * widths / args.replicates
            out.append({"scenario": name, "rho": rho, "items": args.items, "truth": truth,
                        "coverage": {"percentile": cover[0], "study": cover[1]},
                        "width_points": {"percentile": width[0], "study": width[1]},
                        "simultaneous_share": bands / args.replicates})
            print(f"{name:38s} {rho:4.1f}  {cover[0]:6.2f} ({width[0]:5.1f} pts)  {cover[1]:6.2f} ({width[1]:5.1f} pts)"
                  f"  {bands / args.replicates:10.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"replicates": args.replicates, "resamples": args.resamples, "items": args.items,
                                   "seconds": time.perf_counter() - start, "lines": out}, indent=1) + "\n")
    print(f"wrote {RESULTS} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
