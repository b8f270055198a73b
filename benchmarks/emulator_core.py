"""Emulator core on SmolLM2-135M: size, forward speed and stage-1 cost, side by side in one run.

    python benchmarks/emulator_core.py [--steps 5] [--adapters 4 --alpha 0.5 --rank-keep-ratio 0.5]

Prints emulator / full ratios (parameters, forward tokens/s) and stage-1 seconds per step at the
default stage-1 batch (8 x 128 tokens), and writes them to benchmarks/results/emulator_core.json.
Forward passes of the two models are interleaved, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaleot_fed.env import configure_environment  # noqa: E402

configure_environment(offline=True)

import torch  # noqa: E402

from scaleot_fed.artifact import load_artifact, save_artifact  # noqa: E402
from scaleot_fed.emulator import EmulatorConfig  # noqa: E402
from scaleot_fed.emulator.build import build_emulator  # noqa: E402
from scaleot_fed.layer_replace import LayerReplaceConfig, run_layer_replace  # noqa: E402
from scaleot_fed.models import count_parameters, load_model  # noqa: E402
from scaleot_fed.text import lambada_passages, token_blocks  # noqa: E402


@torch.no_grad()
def tokens_per_second(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return ids.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=5, help="stage-1 steps to time")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rank-keep-ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved forward timings per model")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "emulator_core.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    lr_config = LayerReplaceConfig(num_adapter_layers=args.adapters, steps=args.steps)
    ids = token_blocks(loaded.tokenizer, lambada_passages(), lr_config.block_size, max_blocks=200)
    result = run_layer_replace(loaded.model, ids, lr_config, source_model=args.model, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = load_artifact(save_artifact(result, tmp))
        emulator = build_emulator(
            loaded.model, EmulatorConfig("scaleot", args.adapters, args.alpha, args.rank_keep_ratio), artifact
        )

    batch = ids[: lr_config.batch_size]  # (8, 128) tokens
    tokens_per_second(loaded.model, batch), tokens_per_second(emulator.model, batch)  # warm-up
    full_tps, emu_tps = [], []
    for _ in range(args.repeats):
        full_tps.append(tokens_per_second(loaded.model, batch))
        emu_tps.append(tokens_per_second(emulator.model, batch))

    full_params, emu_params = count_parameters(loaded.model), count_parameters(emulator.model)
    report = {
        "model": args.model,
        "emulator": {"method": "scaleot", "num_adapter_layers": args.adapters, "alpha": args.alpha,
                     "rank_keep_ratio": args.rank_keep_ratio},
        "params_full": full_params,
        "params_emulator": emu_params,
        "params_ratio": emu_params / full_params,
        "forward_batch": list(batch.shape),
        "forward_tokens_per_s_full": statistics.median(full_tps),
        "forward_tokens_per_s_emulator": statistics.median(emu_tps),
        "forward_speedup": statistics.median(e / f for e, f in zip(emu_tps, full_tps)),
        "stage1_steps": args.steps,
        "stage1_batch": [lr_config.batch_size, lr_config.block_size],
        "stage1_seconds_per_step": result.seconds / args.steps,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
    }
    print(f"{'':34}{'full':>14}{'emulator':>14}{'ratio':>10}")
    print(f"{'parameters':34}{full_params:>14,}{emu_params:>14,}{report['params_ratio']:>10.3f}")
    print(f"{'forward tokens/s (8x128, median)':34}{report['forward_tokens_per_s_full']:>14.0f}"
          f"{report['forward_tokens_per_s_emulator']:>14.0f}{report['forward_speedup']:>10.2f}")
    print(f"stage-1 seconds per step (8x128, {lr_config.num_candidates} candidates): {report['stage1_seconds_per_step']:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
