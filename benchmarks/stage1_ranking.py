"""How much of stage 1's seed-to-seed disagreement is the ranking fit's own noise.

Re-runs the regression ranking (:func:`scaleot_fed.candidates.regression_scores`) on saved
stage-1 artifacts, with their own trained harmonizers and reward texts, but other candidate
draws (and optionally more candidates or reward batches). The replaced set at the artifact's
alpha is compared with the one the artifact ships: if fresh draws on the *same* harmonizers
disagree as much as two seeds do, the fit's sampling noise dominates (more candidates help); if
they agree, the harmonizers themselves differ between seeds.

    python benchmarks/stage1_ranking.py runs/study-smollm2/stage1/na4-a0.5/seed0 --draws 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch


def replaced_set(scores: dict[int, float], alpha: float) -> set[int]:
    """The ``alpha`` share of blocks with the lowest scores (ties by index, as the emulator)."""
    order = sorted(scores, key=lambda i: (scores[i], i))
    return set(order[: int(round(alpha * len(order)))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", help="stage-1 artifact folders (layer_replace.json)")
    parser.add_argument("--draws", type=int, default=2, help="fresh candidate draws per artifact")
    parser.add_argument("--candidates", type=int, default=None, help="default: the artifact's ranking_candidates")
    parser.add_argument("--batches", type=int, default=None, help="default: the artifact's ranking_batches")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "stage1_ranking.json"))
    args = parser.parse_args()

    from scaleot_fed.artifact import load_artifact
    from scaleot_fed.candidates import regression_scores
    from scaleot_fed.layer_replace import LayerReplaceConfig, split_heldout
    from scaleot_fed.models import load_model
    from scaleot_fed.stats import spearman
    from scaleot_fed.text import lambada_passages, token_blocks

    if args.threads:
        torch.set_num_threads(args.threads)
    report = []
    for folder in args.artifacts:
        artifact = load_artifact(folder)
        meta = artifact.meta
        fields = {f.name for f in dataclasses.fields(LayerReplaceConfig)}
        config = LayerReplaceConfig(**{k: v for k, v in meta["config"].items() if k in fields})
        config = dataclasses.replace(config, ranking_candidates=args.candidates or config.ranking_candidates,
                                     ranking_batches=args.batches or config.ranking_batches)
        loaded = load_model(meta["source_model"])
        artifact.check_matches(loaded.model)
        model = loaded.model.eval().requires_grad_(False)
        ids = token_blocks(loaded.tokenizer, lambada_passages(), config.block_size, max_blocks=config.blocks_needed())
        _, reward_ids, _ = split_heldout(ids, config)
        middle = sorted(artifact.harmonizers)
        shipped = replaced_set(artifact.scores, config.alpha)
        for draw in range(args.draws):
            generator = torch.Generator().manual_seed(10_000 + draw)
            start = time.perf_counter()
            scores, fit = regression_scores(model, reward_ids, artifact.harmonizers, middle, config, generator)
            fresh = {middle[j]: float(scores[j]) for j in range(len(middle))}
            overlap = len(replaced_set(fresh, config.alpha) & shipped) / len(shipped)
            rho = spearman([artifact.scores[i] for i in middle], [fresh[i] for i in middle])
            row = {"artifact": str(folder), "draw": draw, "candidates": config.ranking_candidates,
                   "batches": fit["batches"], "r2": fit["r2"], "overlap_with_shipped": overlap, "spearman": rho,
                   "seconds": time.perf_counter() - start}
            report.append(row)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))  # after every draw: a stopped run keeps its draws
            print(f"{folder} draw {draw}: {config.ranking_candidates} candidates x {fit['batches']} batches, "
                  f"R^2 {fit['r2']:.2f}: replaced set shares {overlap:.0%} with the shipped one "
                  f"({len(shipped)} blocks), Spearman {rho:.2f} ({row['seconds']:.0f} s)", flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
