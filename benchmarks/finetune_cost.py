"""(a) A data owner's training cost: emulator + LoRA vs full-parameter fine-tuning, next to the ideal.

    python benchmarks/finetune_cost.py [--steps 8 --repeats 3 --adapters 4 --alpha 0.5 --rank-keep-ratio 0.5]

Both sides run the project's real training path (``scaleot_fed.finetune.finetune``: answer-only
LM head, length-bucketed batches) on PIQA training items, each in a fresh subprocess so that its
peak memory is its own; repeats are paired and interleaved. The emulator is the shipped kind
(ScaleOT layout: harmonizers from a short stage 1, SRC on the kept middle blocks).

Printed side by side, with the ideal each ratio could reach on this hardware:

- tokens/s: the FLOP ideal is full FT's FLOPs per token over the emulator's. Full FT runs 3
  passes over every block (forward, activation gradients, weight gradients); emulator + LoRA
  runs 2 over its (smaller) blocks (no weight gradients outside LoRA's few). Attention scores
  and the answer-row head are counted too.
- peak memory: the byte ideal of each side is the process baseline (interpreter, torch,
  tokenizer: measured before the model loads) + weights + gradients + AdamW state (2 x the
  trained parameters) + the activations autograd saves for the longest batch (measured with
  ``saved_tensors_hooks``, parameters excluded).

Writes benchmarks/results/finetune_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaleot_fed.env import configure_environment  # noqa: E402
from scaleot_fed.procs import status_bytes  # noqa: E402

configure_environment(offline=True)

VARIANTS = {"full FT": ("full", "full"), "emulator + LoRA": ("emulator", "lora")}
BATCH = 8


def saved_activation_bytes(model, batch) -> int:
    """Bytes autograd keeps for one forward of ``batch`` (each storage once, parameters not)."""
    import torch

    from scaleot_fed.heads import answer_token_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = answer_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def worker(args) -> None:
    import peft  # noqa: F401 - imported before the baseline is read: the libraries count in it
    import torch
    import transformers  # noqa: F401

    from scaleot_fed.emulator import load_emulator
    from scaleot_fed.finetune import IGNORE, FinetuneConfig, collate, encode_example, finetune, make_trainable
    from scaleot_fed.models import load_model
    from scaleot_fed.tasks import load_task

    baseline = status_bytes("VmRSS")  # libraries loaded, no model yet
    torch.set_num_threads(args.threads)
    kind, mode = VARIANTS[args.worker]
    if kind == "emulator":
        emulator = load_emulator(args.emulator)
        model, tokenizer, positions = emulator.model, emulator.tokenizer, list(emulator.adapter_positions())
    else:
        loaded = load_model(args.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        positions = list(range(model.config.num_hidden_layers))
    items = load_task("piqa", "train", BATCH * args.steps)
    config = FinetuneConfig(mode=mode, steps=args.steps, batch_size=BATCH, lr=1e-5, eval_items=1,
                            eval_every=args.steps, select_best=False, device="cpu")
    torch.manual_seed(0)
    trained = make_trainable(model, positions, config)
    result = finetune(trained, tokenizer, items, items[:1], config, progress=False)
    peak = status_bytes("VmHWM")
    params = [p for p in trained.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    optimizer.step()  # allocates its state
    start = time.perf_counter()
    for _ in range(3):
        optimizer.step()
    optimizer_s = (time.perf_counter() - start) / 3
    optimizer.zero_grad(set_to_none=True)
    examples = sorted((encode_example(tokenizer, i, config.max_length) for i in items), key=lambda e: -len(e[0]))
    longest = collate(examples[:BATCH], tokenizer.pad_token_id or 0)
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    print(json.dumps({
        "tokens_per_s": result.tokens_per_second,
        "peak_rss": peak,
        "baseline_rss": baseline,
        "weights": sum(p.numel() * p.element_size() for p in trained.parameters()),
        "trainable_params": trainable,
        "saved_activations": saved_activation_bytes(trained, longest),
        "mean_tokens_per_item": result.tokens / (args.steps * BATCH),
        "answer_fraction": sum(sum(t != IGNORE for t in labels) for _, labels in examples)
        / sum(len(ids) for ids, _ in examples),
        "step_s": result.seconds / args.steps,
        "optimizer_step_s": optimizer_s,
    }))


def flops_per_token(model, kind: str, tokens_per_item: float, answer_fraction: float) -> float:
    """Training FLOPs per token: 2 per multiply-add; full FT 3 passes, emulator + LoRA 2 (see top)."""
    from scaleot_fed.arch import get_layers
    from scaleot_fed.harmonizer import Harmonizer

    cfg = model.config
    blocks = get_layers(model)
    weights = sum(p.numel() for b in blocks for p in b.parameters())
    attention_blocks = sum(not isinstance(b, Harmonizer) for b in blocks)
    forward = 2 * weights + 2 * 2 * attention_blocks * cfg.hidden_size * tokens_per_item / 2
    # the head runs on answer rows only (their share measured by the workers): forward and input gradient
    head = 2 * 2 * cfg.hidden_size * cfg.vocab_size * answer_fraction
    return (3 if kind == "full" else 2) * forward + head


def ideal_bytes(r: dict) -> int:
    return r["baseline_rss"] + r["weights"] + 4 * r["trainable_params"] * 3 + r["saved_activations"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rank-keep-ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--emulator", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune_cost.json"))
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from scaleot_fed.artifact import load_artifact, save_artifact
    from scaleot_fed.emulator import EmulatorConfig, load_emulator, save_emulator
    from scaleot_fed.emulator.build import build_emulator
    from scaleot_fed.layer_replace import LayerReplaceConfig, run_layer_replace
    from scaleot_fed.models import load_model
    from scaleot_fed.text import lambada_passages, token_blocks

    loaded = load_model(args.model)
    # harmonizers and a ranking from a short stage 1: the emulator's shapes are what matter here
    stage1 = LayerReplaceConfig(num_adapter_layers=args.adapters, steps=2, batch_size=2, block_size=64,
                                eval_batches=1, device="cpu")
    ids = token_blocks(loaded.tokenizer, lambada_passages()[:50], 64, max_blocks=16)
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        artifact = save_artifact(run_layer_replace(loaded.model, ids, stage1, args.model, progress=False),
                                 Path(tmp) / "stage1")
        emulator_config = EmulatorConfig("scaleot", args.adapters, args.alpha, args.rank_keep_ratio)
        emulator = build_emulator(loaded.model, emulator_config, load_artifact(artifact), source_model=args.model)
        tmp = str(Path(tmp) / "emulator")
        save_emulator(emulator, tmp, tokenizer=loaded.tokenizer)
        emulator_model = load_emulator(tmp).model
        for _ in range(args.repeats):  # paired and interleaved
            for name in VARIANTS:
                cmd = [sys.executable, __file__, "--worker", name, "--emulator", tmp, "--model", args.model,
                       "--steps", str(args.steps), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
                runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    full, emu = runs["full FT"], runs["emulator + LoRA"]
    tokens_per_item = statistics.mean(r["mean_tokens_per_item"] for r in full)
    answers = statistics.mean(r["answer_fraction"] for r in full)
    flop_ideal = (flops_per_token(loaded.model, "full", tokens_per_item, answers)
                  / flops_per_token(emulator_model, "lora", tokens_per_item, answers))
    speed = statistics.median(e["tokens_per_s"] / f["tokens_per_s"] for f, e in zip(full, emu))
    memory = statistics.median(e["peak_rss"] / f["peak_rss"] for f, e in zip(full, emu))
    memory_ideal = ideal_bytes(emu[0]) / ideal_bytes(full[0])
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print(f"{args.model}; emulator: scaleot, N_a={args.adapters}, alpha={args.alpha}, rank_keep_ratio="
          f"{args.rank_keep_ratio}; PIQA, batch {BATCH}, {args.steps} steps, {args.threads} threads, "
          f"median of {args.repeats} paired repeats")
    print(f"{'':18}{'tokens/s':>10}{'peak MB':>10}{'ideal MB':>10}{'peak/ideal':>11}  (baseline + weights + "
          "grads + AdamW + saved activations, MB)")
    for name, r in med.items():
        parts = [r["baseline_rss"], r["weights"], 4 * r["trainable_params"], 8 * r["trainable_params"],
                 r["saved_activations"]]
        print(f"{name:18}{r['tokens_per_s']:>10.0f}{r['peak_rss'] / 2**20:>10.0f}{ideal_bytes(r) / 2**20:>10.0f}"
              f"{r['peak_rss'] / ideal_bytes(r):>11.2f}  ({' + '.join(f'{p / 2**20:.0f}' for p in parts)})")
    for name, r in med.items():
        print(f"{name}: {r['step_s']:.2f} s per step, of which the AdamW update {r['optimizer_step_s']:.2f} s "
              "(memory-bound, not in the FLOP ideal)")
    print(f"emulator + LoRA / full FT: tokens/s {speed:.2f}x (FLOP ideal {flop_ideal:.2f}x, "
          f"{speed / flop_ideal:.0%} of it); peak memory {memory:.2f}x (byte ideal {memory_ideal:.2f}x, "
          f"measured/ideal {memory / memory_ideal:.2f})")
    report = {"model": args.model, "emulator": {"method": "scaleot", "num_adapter_layers": args.adapters,
                                                "alpha": args.alpha, "rank_keep_ratio": args.rank_keep_ratio},
              "task": "piqa", "batch": BATCH, "steps": args.steps, "threads": args.threads, "repeats": args.repeats,
              "speed_ratio": speed, "flop_ideal_ratio": flop_ideal, "memory_ratio": memory,
              "memory_ideal_ratio": memory_ideal, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
