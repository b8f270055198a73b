"""`scaleot-fed estimate` against a measured data owner, on SmolLM2-135M.

    python benchmarks/estimate_check.py [--seq-lens 128 256 --batch-size 8]

For each batch shape: the estimate (from the config alone) of one owner's training memory next
to the peak resident memory (VmHWM) of a fresh process that loads the emulator and runs three
LoRA steps of exactly that shape (loss on the last quarter of the positions, as the estimate
assumes). Writes benchmarks/results/estimate_check.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaleot_fed.env import configure_environment  # noqa: E402

configure_environment(offline=True)

EMULATOR = ("uniform-drop", 4, 0.5, 0.5)


def worker(args) -> None:
    import peft  # noqa: F401 - loaded before the baseline, as in a client process
    import torch
    import transformers  # noqa: F401

    from scaleot_fed.emulator import load_emulator
    from scaleot_fed.finetune import FinetuneConfig, make_trainable
    from scaleot_fed.heads import answer_token_loss
    from scaleot_fed.procs import status_bytes

    baseline = status_bytes("VmRSS")
    emulator = load_emulator(args.emulator)
    model = make_trainable(emulator.model, list(emulator.adapter_positions()), FinetuneConfig(mode="lora"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
        labels = torch.full_like(ids, -100)
        labels[:, -args.seq_len // 4:] = ids[:, -args.seq_len // 4:]
        loss, _ = answer_token_loss(model, ids, torch.ones_like(ids), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"peak": status_bytes("VmHWM"), "baseline": baseline}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--emulator", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.emulator:
        return worker(args)

    from scaleot_fed.emulator import EmulatorConfig, save_emulator
    from scaleot_fed.emulator.build import build_emulator
    from scaleot_fed.estimate import estimate
    from scaleot_fed.finetune import FinetuneConfig
    from scaleot_fed.models import load_model

    loaded = load_model("smollm2-135m")
    config = EmulatorConfig(*EMULATOR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_emulator(build_emulator(loaded.model, config), tmp, tokenizer=loaded.tokenizer)
        for seq_len in args.seq_lens:
            est = estimate(loaded.model.config, config, FinetuneConfig(mode="lora"), args.batch_size, seq_len)
            cmd = [sys.executable, __file__, "--emulator", tmp, "--seq-len", str(seq_len),
                   "--batch-size", str(args.batch_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if proc.returncode:
                raise SystemExit(proc.stderr[-2000:])
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            client = est.client_bytes("cpu")
            rows.append({"batch_size": args.batch_size, "seq_len": seq_len, "estimate": client,
                         "measured_peak": measured["peak"], "measured_baseline": measured["baseline"],
                         "ratio": client["total"] / measured["peak"]})
    print(f"SmolLM2-135M, emulator {EMULATOR}, LoRA r 8, float32, CPU")
    for r in rows:
        parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in r["estimate"].items() if k != "total")
        print(f"batch {r['batch_size']} x {r['seq_len']}: estimate {r['estimate']['total'] / 2**20:.0f} MB ({parts}) vs "
              f"measured peak {r['measured_peak'] / 2**20:.0f} MB (baseline {r['measured_baseline'] / 2**20:.0f}): "
              f"estimate / measured {r['ratio']:.2f}")
    out = Path(__file__).parent / "results" / "estimate_check.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
