"""Streaming build-emulator and plug-in on a checkpoint of ~1.5B parameters: peak memory vs bounds.

    python benchmarks/streaming.py [--layers 28] [--hidden 2048] [--work /tmp/streaming-bench]

A random Llama (hidden 2048, MLP 5632, 28 blocks, vocab 32000, untied head: ~1.57B parameters,
~6.3 GB in float32) is written as sharded safetensors, a few blocks per shard, never whole in
memory (generated on the fly, deleted afterwards, never committed). Then, each in a fresh process
whose peak resident memory (ru_maxrss) is read when it exits:

* ``scaleot-fed build-emulator --stream`` (uniform drop, N_a 4, alpha 0.5, SRC 0.5), against
  the bound "emulator size + 1 GB";
* ``scaleot-fed plug-in --stream`` of a LoRA (r 8, every linear of the 4 adapter blocks) against
  "two blocks + trained state + 1 GB".

Writes benchmarks/results/streaming.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaleot_fed.env import configure_environment  # noqa: E402

configure_environment(offline=True)
GB = 2**30


def write_checkpoint(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int, per_shard: int) -> dict:
    """A random Llama as sharded safetensors, ``per_shard`` blocks per file (one block in memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=vocab,
                         tie_word_embeddings=False, dtype="float32")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)

    def tensor(shape) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02) if len(shape) > 1 else torch.ones(shape)

    groups: list[list[str]] = [[k for k in shapes if ".layers." not in k]]
    for start in range(0, layers, per_shard):
        groups.append([k for k in shapes if any(f".layers.{i}." in k for i in range(start, start + per_shard))])
    weight_map, total = {}, 0
    for n, keys in enumerate(groups, 1):
        name = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        shard = {k: tensor(shapes[k]) for k in keys}
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, name)
        total += sum(v.numel() * 4 for v in shard.values())
        del shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    block = sum(shapes[k].numel() * 4 for k in shapes if ".layers.0." in k)
    return {"params": sum(s.numel() for s in shapes.values()), "bytes": total, "block_bytes": block}


def peak_of(command: list[str]) -> tuple[int, float]:
    """Run ``command`` in a fresh process; its peak resident bytes and seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(command, check=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("ru_maxrss did not grow: run each measurement in its own benchmark process")
    return peak * 1024, time.perf_counter() - start


def make_lora(emulator_dir: Path, out: Path) -> None:
    """A LoRA (r 8, every linear of the adapter blocks, B random) exported as a data owner would."""
    from scaleot_fed.emulator import load_emulator
    from scaleot_fed.finetune import FinetuneConfig, make_trainable
    from scaleot_fed.plugin import export_trained

    emulator = load_emulator(emulator_dir, tokenizer=False)  # (a random checkpoint has no tokenizer)
    model = make_trainable(emulator.model, list(emulator.adapter_positions()), FinetuneConfig(mode="lora", lora_r=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    export_trained(model, emulator, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--per-shard", type=int, default=4, help="blocks per checkpoint shard")
    parser.add_argument("--work", default="/tmp/streaming-bench", help="scratch folder (deleted at the end)")
    parser.add_argument("--step", choices=("all", "build", "lora", "plug-in"), default="all",
                        help="one measurement per process (ru_maxrss is a process-lifetime peak)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "streaming.json"))
    args = parser.parse_args()
    work = Path(args.work)
    cli = [sys.executable, "-m", "scaleot_fed_cli"]
    report = json.loads(Path(args.out).read_text()) if args.step != "all" else {}
    if args.step == "all":
        shutil.rmtree(work, ignore_errors=True)
        start = time.perf_counter()
        report["checkpoint"] = write_checkpoint(work / "model", args.layers, args.hidden, args.intermediate,
                                                args.vocab, args.per_shard)
        report["checkpoint"]["seconds_to_write"] = time.perf_counter() - start
        print(f"checkpoint: {report['checkpoint']['params'] / 1e9:.2f}B parameters, "
              f"{report['checkpoint']['bytes'] / GB:.2f} GB in {args.layers} blocks", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        for step in ("build", "lora", "plug-in"):  # each in a process of its own (ru_maxrss is per process,
            # and a child forked from a big process starts with the parent's pages counted)
            subprocess.run([sys.executable, __file__, "--step", step, "--work", str(work), "--out", args.out]
                           + [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in ("layers", "hidden")], check=True)
        shutil.rmtree(work, ignore_errors=True)
        return
    if args.step == "build":
        peak, seconds = peak_of(cli + ["build-emulator", "--model", str(work / "model"), "--method", "uniform-drop",
                                       "--adapters", "4", "--alpha", "0.5", "--rank-keep-ratio", "0.5",
                                       "--out", str(work / "emulator"), "--stream", "--overwrite"])
        size = (work / "emulator" / "model.safetensors").stat().st_size
        bound = size + GB
        report["build"] = {"peak_bytes": peak, "seconds": seconds, "emulator_bytes": size, "bound_bytes": bound,
                           "peak_over_bound": peak / bound}
        print(f"build-emulator --stream: peak {peak / GB:.2f} GB vs bound {bound / GB:.2f} GB (emulator "
              f"{size / GB:.2f} GB + 1 GB) = {peak / bound:.2f}x of the bound, {seconds:.0f} s", flush=True)
    elif args.step == "lora":
        make_lora(work / "emulator", work / "lora")
        return
    else:
        trained = sum(p.stat().st_size for p in (work / "lora").iterdir())
        peak, seconds = peak_of(cli + ["plug-in", "--model", str(work / "model"), "--emulator", str(work / "emulator"),
                                       "--trained", str(work / "lora"), "--out", str(work / "plugged"), "--stream",
                                       "--overwrite"])
        bound = 2 * report["checkpoint"]["block_bytes"] + trained + GB
        report["plug_in"] = {"peak_bytes": peak, "seconds": seconds, "trained_bytes": trained, "bound_bytes": bound,
                             "peak_over_bound": peak / bound}
        print(f"plug-in --stream: peak {peak / GB:.2f} GB vs bound {bound / GB:.2f} GB (two blocks "
              f"{2 * report['checkpoint']['block_bytes'] / GB:.2f} GB + trained state {trained / 2**20:.1f} MB + 1 GB) "
              f"= {peak / bound:.2f}x of the bound, {seconds:.0f} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
