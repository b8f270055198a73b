"""``scaleot-fed estimate``: what a federation needs, before launching it (config only, no weights)."""

from __future__ import annotations

import argparse
import os

GB = 2**30


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gpu_bytes(args: argparse.Namespace) -> int | None:
    if args.gpu_memory_gb:
        return int(args.gpu_memory_gb * GB)
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def cmd_estimate(args: argparse.Namespace) -> None:
    from scaleot_fed.config import from_dict
    from scaleot_fed.emulator import EmulatorConfig
    from scaleot_fed.estimate import PROCESS_BASELINE, estimate
    from scaleot_fed.finetune import FinetuneConfig
    from scaleot_fed.models import load_model_config

    emulator = from_dict(EmulatorConfig, {"method": args.method, "num_adapter_layers": args.adapters,
                                          "alpha": args.alpha, "rank_keep_ratio": args.rank_keep_ratio,
                                          "dtype": args.emulator_dtype})
    finetune = from_dict(FinetuneConfig, {"mode": args.mode, "lora_r": args.lora_r, "dtype": args.dtype})
    est = estimate(load_model_config(args.model), emulator, finetune, args.batch_size, args.seq_len,
                   answer_fraction=args.answer_fraction)
    device = "cuda" if args.client_num_gpus > 0 else "cpu"
    client = est.client_bytes(device)
    server = est.full_bytes + est.emulator_bytes + int(PROCESS_BASELINE["cpu"])
    print(f"{args.model}: {est.full_params:,} parameters ({est.full_bytes / GB:.2f} GB as stored)")
    print(f"emulator ({emulator.method}, N_a={emulator.num_adapter_layers}, alpha={emulator.alpha}, "
          f"rank_keep_ratio={emulator.rank_keep_ratio}): {est.emulator_params:,} parameters "
          f"({est.emulator_params / est.full_params:.0%}), {est.emulator_bytes / GB:.2f} GB to send ({args.emulator_dtype})")
    print(f"trainable per owner ({finetune.mode}): {est.trainable_params:,} parameters; per round each owner "
          f"downloads {est.round_bytes['down'] / 2**20:.1f} MB and uploads {est.round_bytes['up'] / 2**20:.1f} MB "
          f"(the emulator once: {est.emulator_bytes / 2**20:.0f} MB)")
    parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in client.items() if k != "total")
    print(f"one owner's training, batch {args.batch_size} x {args.seq_len} tokens on {device}: "
          f"{client['total'] / GB:.2f} GB ({parts})")
    print(f"the model owner (server): about {server / GB:.2f} GB (full model, emulator, process; scoring a "
          f"plug-in copies the full model: +{est.full_bytes / GB:.2f} GB while it runs)")
    gpu = _gpu_bytes(args)
    if device == "cuda":
        per_gpu = int(gpu // client["total"]) if gpu else None
        print(f"clients per GPU: {per_gpu if per_gpu is not None else 'unknown (no GPU here; pass --gpu-memory-gb)'}"
              f" (client_num_gpus = {args.client_num_gpus} reserves {int(1 / args.client_num_gpus)} per GPU)")
    ram = _ram_bytes()
    fit = max(0, int((ram - server) // client["total"]))
    print(f"concurrent clients in this machine's RAM ({ram / GB:.0f} GB): {fit}"
          + (f"; {args.clients} requested" if args.clients else ""))
    if args.clients and device == "cpu" and args.clients > fit:
        print(f"warning: {args.clients} concurrent clients need about {(server + args.clients * client['total']) / GB:.1f}"
              " GB; Ray runs at most as many at once as fit its CPU/GPU reservations (client_num_cpus / gpus)")


def add_parser(sub, default_model: str, model_help: str) -> None:
    from scaleot_fed.emulator import EmulatorConfig, strategy_names
    from scaleot_fed.finetune import MODES

    from .main import add_method_argument

    p = sub.add_parser("estimate", help="memory and bytes of a federation from the model's config (no weights)")
    p.add_argument("--model", default=default_model, help=model_help)
    add_method_argument(p, strategy_names())
    p.add_argument("--adapters", type=int, default=EmulatorConfig.num_adapter_layers, help="N_a")
    p.add_argument("--alpha", type=float, default=EmulatorConfig.alpha)
    p.add_argument("--rank-keep-ratio", type=float, default=EmulatorConfig.rank_keep_ratio)
    p.add_argument("--mode", choices=MODES, default="lora")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the owners' [finetune] dtype (frozen weights while training)")
    p.add_argument("--emulator-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="precision the emulator is stored and sent in (auto: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training example (padded batch width)")
    p.add_argument("--answer-fraction", type=float, default=0.25,
                   help="share of each example's tokens the loss is on (PIQA: about 0.6)")
    p.add_argument("--clients", type=int, help="concurrent clients you plan to run on this machine")
    p.add_argument("--client-num-gpus", type=float, default=0.0)
    p.add_argument("--gpu-memory-gb", type=float, help="GPU memory when this machine has no GPU")
    p.set_defaults(func=cmd_estimate)
