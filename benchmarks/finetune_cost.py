"""Data-owner training cost: emulator + LoRA vs full fine-tuning, same batch, one run.

    python benchmarks/finetune_cost.py [--importance artifacts/smollm2-stage1] [--steps 6]

Each variant trains in a fresh subprocess (so peak memory is its own): it loads only what a data
owner would hold (the emulator folder, or the full model for the baselines), then runs AdamW
steps on 8 x 128-token batches. Prints tokens/s and peak resident memory side by side with ratios
to full fine-tuning, and writes benchmarks/results/finetune_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaleot_fed.env import configure_environment  # noqa: E402

configure_environment(offline=True)

VARIANTS = {
    # name: (which model, fine-tuning mode, trainable blocks)
    "full model, full FT": ("full", "full", "all"),
    "full model, LoRA (all blocks)": ("full", "lora", "all"),
    "emulator, full adapter blocks": ("emulator", "full", "adapters"),
    "emulator, LoRA (adapter blocks)": ("emulator", "lora", "adapters"),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args) -> None:
    import torch

    from scaleot_fed.emulator import load_emulator
    from scaleot_fed.finetune import FinetuneConfig, make_trainable
    from scaleot_fed.models import load_model
    from scaleot_fed.text import lambada_passages, token_blocks

    torch.set_num_threads(args.threads)
    kind, mode, blocks = VARIANTS[args.worker]
    if kind == "emulator":
        emulator = load_emulator(args.emulator)
        model, tokenizer, positions = emulator.model, emulator.tokenizer, list(emulator.adapter_positions())
    else:
        loaded = load_model(args.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        positions = list(range(model.config.num_hidden_layers))
    rss_loaded = _rss_mb()
    ids = token_blocks(tokenizer, lambada_passages()[:400], 128, max_blocks=8 * (args.steps + 1))
    trained = make_trainable(model, positions, FinetuneConfig(mode=mode))
    trained.train()
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for step in range(args.steps + 1):  # step 0 is warm-up
        x = ids[8 * step : 8 * step + 8]
        start = time.perf_counter()
        loss = trained(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    print(json.dumps({
        "tokens_per_s": 8 * 128 * len(times) / sum(times),
        "peak_rss_mb": _rss_mb(),
        "rss_after_load_mb": rss_loaded,
        "trainable_params": sum(p.numel() for p in params),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--importance", help="stage-1 artifact: ScaleOT emulator; without it uniform-drop")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rank-keep-ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--emulator", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune_cost.json"))
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from scaleot_fed.artifact import load_artifact
    from scaleot_fed.emulator import EmulatorConfig, save_emulator
    from scaleot_fed.emulator_build import build_emulator
    from scaleot_fed.models import load_model

    loaded = load_model(args.model)
    strategy = "scaleot" if args.importance else "uniform-drop"
    ratio = args.rank_keep_ratio if args.importance else 1.0
    importance = load_artifact(args.importance) if args.importance else None
    emulator = build_emulator(loaded.model, EmulatorConfig(strategy, args.adapters, args.alpha, ratio), importance)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_emulator(emulator, tmp, tokenizer=loaded.tokenizer)
        del loaded, emulator
        for name in VARIANTS:
            cmd = [sys.executable, __file__, "--worker", name, "--emulator", tmp, "--model", args.model,
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results["full model, full FT"]
    print(f"emulator: {strategy}, N_a={args.adapters}, alpha={args.alpha}, rank_keep_ratio={ratio}; batch 8 x 128 tokens")
    print(f"{'variant':34}{'tokens/s':>10}{'speed x':>9}{'peak MB':>10}{'mem /':>8}{'trainable':>13}")
    for name, r in results.items():
        print(f"{name:34}{r['tokens_per_s']:>10.0f}{r['tokens_per_s'] / base['tokens_per_s']:>9.2f}"
              f"{r['peak_rss_mb']:>10.0f}{base['peak_rss_mb'] / r['peak_rss_mb']:>8.2f}{r['trainable_params']:>13,}")
    report = {"emulator": {"strategy": strategy, "num_adapter_layers": args.adapters, "alpha": args.alpha,
                           "rank_keep_ratio": ratio}, "batch": [8, 128], "steps": args.steps,
              "threads": args.threads, "variants": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
