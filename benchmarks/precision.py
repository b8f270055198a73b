"""LoRA fine-tuning of SmolLM2-135M in float32 vs bfloat16 (frozen weights), side by side.

    python benchmarks/precision.py [--steps 6 --repeats 3 --batch-size 4]

Prints training tokens/s of both (median of paired, interleaved repeats) with the ratio, the
frozen weights' bytes of both next to their ideal ratio (0.5), and the final validation loss of
both (bf16 must stay close to fp32), on a CPU it names with whether it has bf16 instructions
(AVX512-BF16, AMX): without them bf16 is emulated and slower, with them faster. The ideal beside
the ratio: bf16 over fp32 matmul throughput alone at the model's shapes. Writes
benchmarks/results/precision.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaleot_fed.env import configure_environment  # noqa: E402

configure_environment(offline=True)

import torch  # noqa: E402

from scaleot_fed.devices import cpu_multiplies_natively  # noqa: E402
from scaleot_fed.finetune import FinetuneConfig, finetune, make_trainable  # noqa: E402
from scaleot_fed.models import load_model  # noqa: E402
from scaleot_fed.tasks import load_task  # noqa: E402


def run(dtype: str, args, items) -> dict:
    loaded = load_model("smollm2-135m")
    config = FinetuneConfig(mode="lora", steps=args.steps, batch_size=args.batch_size, eval_items=16,
                            eval_every=args.steps, select_best=False, device="cpu", dtype=dtype)
    model = make_trainable(loaded.model, list(range(loaded.model.config.num_hidden_layers)), config)
    result = finetune(model, loaded.tokenizer, items[16:], items[:16], config, progress=False)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {"tokens_per_s": result.tokens_per_second, "frozen_bytes": frozen, "val_loss": result.best_val_loss}


def matmul_ratio(tokens: int = 512, repeats: int = 20) -> float:
    """bf16 over fp32 throughput of one MLP matmul of SmolLM2-135M (tokens x 576 @ 576 x 1536),
    median of interleaved repeats: the most bf16 can gain where training is all matmuls."""
    import time

    times = {torch.float32: [], torch.bfloat16: []}
    for _ in range(repeats):
        for dtype in times:
            a, b = torch.randn(tokens, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
            start = time.perf_counter()
            a @ b
            times[dtype].append(time.perf_counter() - start)
    return statistics.median(times[torch.float32]) / statistics.median(times[torch.bfloat16])


def cpu_units() -> str:
    """The CPU and whether it multiplies bf16 natively: what decides the ratio."""
    native = cpu_multiplies_natively(torch.bfloat16)
    name = getattr(torch.cpu, "get_capabilities", dict)().get("cpu_name", platform.processor() or "CPU")
    return f"{name}, bf16 instructions: {'unknown' if native is None else 'yes' if native else 'no (emulated)'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    items = load_task("piqa", "train", 16 + args.steps * args.batch_size)
    runs = {"float32": [], "bfloat16": []}
    for _ in range(args.repeats):  # paired and interleaved
        for dtype in runs:
            runs[dtype].append(run(dtype, args, items))
    median = {d: statistics.median(r["tokens_per_s"] for r in rs) for d, rs in runs.items()}
    result = {"tokens_per_s": median, "ratio_bf16_over_fp32": median["bfloat16"] / median["float32"],
              "ideal_matmul_ratio": matmul_ratio(),
              "frozen_bytes": {d: rs[0]["frozen_bytes"] for d, rs in runs.items()},
              "val_loss": {d: rs[0]["val_loss"] for d, rs in runs.items()}, "runs": runs,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                         f"{cpu_units()}"}
    memory = result["frozen_bytes"]["bfloat16"] / result["frozen_bytes"]["float32"]
    print(f"LoRA (r 8) on every block of SmolLM2-135M, PIQA, {args.steps} steps x {args.batch_size}, "
          f"median of {args.repeats} paired repeats, {result['machine']}")
    print(f"  tokens/s   fp32 {median['float32']:.0f}   bf16 {median['bfloat16']:.0f}   "
          f"ratio {result['ratio_bf16_over_fp32']:.2f}x (ideal, matmuls alone: {result['ideal_matmul_ratio']:.2f}x)")
    print(f"  frozen weights bf16 / fp32: {memory:.2f} (ideal 0.50)")
    print(f"  validation loss after training: fp32 {result['val_loss']['float32']:.4f}  "
          f"bf16 {result['val_loss']['bfloat16']:.4f}")
    out = Path(__file__).resolve().parent / "results" / "precision.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
