"""``scaleot-fed`` command line: the parser and the entry point.

The commands themselves are in :mod:`scaleot_fed_cli.commands`. User errors
(:class:`~scaleot_fed.errors.ScaleOTError`) print one line on stderr and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from scaleot_fed.env import configure_environment

configure_environment()  # before torch / ray / flwr are imported anywhere below

from scaleot_fed.errors import ScaleOTError  # noqa: E402
from scaleot_fed.tracking import BACKENDS as TRACKING_BACKENDS  # noqa: E402

from . import commands as c  # noqa: E402

OVERWRITE_HELP = "replace what --out holds (without it, a non-empty --out is refused)"
MODEL_HELP = "local HF folder, hub id, or the offline alias smollm2-135m (default)"
DEVICE_MAPS = ("auto", "balanced", "sequential")


class _OldFlag(argparse.Action):
    """A renamed flag, still accepted: sets the new one's value and says the new name (one line)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"scaleot-fed: {option_string} is now called --method", file=sys.stderr)  # (argparse checked the choice)
        setattr(namespace, self.dest, values)


def add_method_argument(p: argparse.ArgumentParser, names: list[str]) -> None:
    """``--method`` (the emulator strategy by name) and its old spelling ``--strategy``."""
    p.add_argument("--method", choices=names, default="scaleot",
                   help="the emulator's method: " + ", ".join(names) + " (or one registered from your code)")
    p.add_argument("--strategy", dest="method", action=_OldFlag, choices=names, help=argparse.SUPPRESS)


def _output_arguments(p: argparse.ArgumentParser, out_help: str, stream_help: str) -> None:
    """``--out``, ``--overwrite`` and ``--stream`` of the commands that write a model folder."""
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--stream", action="store_true", help="never hold the full model: " + stream_help)


def _scalar_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--field-name`` option per dataclass field (default: the dataclass's own default)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (also settable in a TOML --config)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _scalar_type(hints[f.name])
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=kind.__name__.upper(),
                               help=f"default: {f.default}")


def _stage_parsers(sub) -> None:
    """The method's steps, one command each: stage 1, stage 2, plug-in."""
    from scaleot_fed.emulator import EmulatorConfig, strategy_names
    from scaleot_fed.layer_replace import LayerReplaceConfig

    p = sub.add_parser("layer-replace", help="stage 1: importance scores + harmonizers (Dynamic LayerReplace)")
    p.add_argument("--model", default=c.DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--data", default="lambada",
                   help="owner's general text: 'lambada' (built in), a .txt/.jsonl file, a datasets folder or a hub dataset")
    p.add_argument("--config", help="TOML file with a [layer_replace] table")
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--adapters", dest="num_adapter_layers", type=int, help="alias of --num-adapter-layers")
    p.add_argument("--device-map", choices=DEVICE_MAPS,
                   help="a model too big for one device: spread its blocks over the GPUs (and CPU) as it loads, in "
                        "--dtype (accelerate); each harmonizer trains on its block's device; instead of --device")
    add_dataclass_arguments(p, LayerReplaceConfig)
    p.set_defaults(func=c.cmd_layer_replace)

    p = sub.add_parser("build-emulator", help="stage 2: build an emulator (N_a, alpha, rank_keep_ratio)")
    p.add_argument("--model", default=c.DEFAULT_MODEL, help=MODEL_HELP)
    add_method_argument(p, strategy_names())
    p.add_argument("--adapters", type=int, default=EmulatorConfig.num_adapter_layers, help="N_a, even (default 4)")
    p.add_argument("--alpha", type=float, default=EmulatorConfig.alpha, help="share of middle blocks replaced (default 0.5)")
    p.add_argument("--rank-keep-ratio", type=float, default=EmulatorConfig.rank_keep_ratio,
                   help="SRC: share of attention rank kept in kept middle blocks (default 1 = off)")
    p.add_argument("--importance", help="layer-replace artifact folder (scaleot, importance-drop)")
    p.add_argument("--calibration", default="lambada",
                   help="text crash clusters the blocks on: 'lambada' (offline), a .txt/.jsonl file or a folder")
    p.add_argument("--dtype", default=EmulatorConfig.dtype, choices=("auto", "float32", "bfloat16", "float16"),
                   help="precision the emulator is stored and shipped in (auto: the model's; bfloat16 halves it)")
    _output_arguments(p, "emulator folder to write", "read its safetensors tensor by tensor, one block at a time "
                      "(checkpoints bigger than memory; the same files as without it)")
    p.set_defaults(func=c.cmd_build_emulator)

    p = sub.add_parser("plug-in", help="put trained adapter blocks into the full model")
    p.add_argument("--model", default=c.DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--emulator", required=True, help="emulator folder the state was trained on")
    p.add_argument("--trained", required=True, help="adapter state (.safetensors) or peft LoRA folder")
    _output_arguments(p, "folder for the plugged-in model", "read and write it one block at a time (sharded "
                      "safetensors with an index; LoRA folders and full/BitFit states)")
    p.set_defaults(func=c.cmd_plug_in)


def _model_parsers(sub) -> None:
    """Train and score one model (full or emulator)."""
    from scaleot_fed.finetune import FinetuneConfig

    p = sub.add_parser("evaluate", help="zero-shot multiple-choice acc / acc_norm, lm-evaluation-harness style")
    p.add_argument("--model", default=c.DEFAULT_MODEL, help=MODEL_HELP + ", or an emulator folder")
    p.add_argument("--task", help="piqa, arc_easy, arc_challenge, openbookqa, hellaswag, sciq, or a .jsonl/.csv file")
    p.add_argument("--text", help="perplexity instead: 'lambada', a .txt/.jsonl file or a datasets folder")
    p.add_argument("--split", default="validation", choices=("train", "validation", "test"),
                   help="test: the labelled test splits of ARC-Easy, ARC-Challenge and OpenBookQA (lm-eval's)")
    p.add_argument("--limit", type=int, help="first N items (or N token blocks with --text) only")
    p.add_argument("--block-size", type=int, default=512, help="tokens per block for --text")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else MPS, else CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="precision of the weights (the forward runs under autocast)")
    p.add_argument("--device-map", choices=DEVICE_MAPS,
                   help="a full model too big for one device: spread its blocks over the GPUs (and CPU) as it "
                        "loads, in --dtype (accelerate); instead of --device")
    p.add_argument("--save-to", metavar="FILE",
                   help="save the finished scoring batches to FILE as they come (every minute and on Ctrl-C); "
                        "rerun with the same FILE to score only what is left (FILE is deleted at the end)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=c.cmd_evaluate)

    p = sub.add_parser("finetune", help="train adapter blocks of an emulator (or a full model) on a task")
    p.add_argument("--model", required=True, help="emulator folder (adapter blocks train) or full model (all blocks)")
    p.add_argument("--task", required=True, help="built-in task name or a .jsonl/.csv file")
    p.add_argument("--train-limit", type=int, help="first N training items")
    p.add_argument("--dev-items", type=int, default=64,
                   help="items cut from the end of the training items for checkpoint selection")
    p.add_argument("--config", help="TOML file with a [finetune] table (and [tracking])")
    p.add_argument("--tracking", choices=tuple(TRACKING_BACKENDS),
                   help="also track the run there (overrides [tracking] backend; its files in OUT.tracking/)")
    p.add_argument("--out", required=True, help="adapter state (.safetensors) or LoRA folder to write; the run saves "
                   "itself to OUT.training.pt as it goes (every --save-every seconds), and a stopped run given the "
                   "same arguments resumes there")
    p.add_argument("--save-every", type=float, default=300.0, metavar="SECONDS",
                   help="seconds between saves of the training state (0: every step); a stop loses at most this "
                   "much training, each save writes the trained tensors and optimizer state (default: 300)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--no-progress", action="store_true")
    add_dataclass_arguments(p, FinetuneConfig, skip=("eval_items",))
    p.set_defaults(func=c.cmd_finetune)


def _pipeline_parsers(sub) -> None:
    """The programs: one owner's pipeline, the attack report, the study (same options each)."""
    programs = (
        ("offsite", c.cmd_offsite, "the one-data-owner pipeline: five rows and the privacy gap",
         "TOML: [run], [finetune], [layer_replace], [[emulator]]", "run folder (overrides [run].out)"),
        ("attack", c.cmd_attack, "model-privacy report: a data owner fine-tunes every emulator weight; how close "
         "does it get to the plug-in model?", "the offsite TOML ([attack] sets the attacker's training)",
         "run folder (overrides [run].out; rows already there are reused)"),
        ("study", c.cmd_study, "the offsite pipeline over emulators x tasks x modes (resumable)",
         "TOML: [study], [finetune], [layer_replace], [distill], [[emulator]]", "study folder (overrides [study].out)"),
    )
    for name, func, help_, config_help, out_help in programs:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", required=True, help=config_help)
        p.add_argument("--out", help=out_help)
        p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
        p.add_argument("--no-progress", action="store_true")
        p.set_defaults(func=func)
        if name == "study":
            p.add_argument("--report-only", action="store_true",
                           help="rewrite REPORT.md and summary.json from the finished rows; run nothing")
            p.add_argument("--plan", action="store_true",
                           help="list the units left, their cost and time, and the ETA; run, lock and write nothing")
            p.add_argument("--builds-last", action="store_true",
                           help="run the units that need no stage 1 or distillation built first: for machines "
                                "whose run folder does not outlive the run (the builds are lost with it)")
            p.add_argument("--until", metavar="HH:MM",
                           help="start only the units that finish before this local time (or ISO date and time) "
                                "at the measured rate, a build with a unit that uses it; leave the rest")
            p.add_argument("--rate-from", metavar="RESULTS",
                           help="with --plan, before this study has timed a unit: price it at the rate another "
                                "study's compute log measured (its results folder; same model and machine)")


def _verdicts_parser(sub) -> None:
    p = sub.add_parser("verdicts", help="the claims' verdicts across studies (models x modes) as one table")
    p.add_argument("results", nargs="+", help="studies' results folders (each holds summary.json)")
    p.add_argument("--into", nargs="*", default=[],
                   help="files whose generated part (between the verdicts markers) the table replaces")
    p.set_defaults(func=c.cmd_verdicts)


def _federation_parsers(sub) -> None:
    """Federated runs, certificates for deployments, emulator info."""
    p = sub.add_parser("simulate", help="federated offsite-tuning on Flower's simulation engine (Ray)")
    p.add_argument("--config", help="run file (TOML), e.g. simulations/configs/smoke.toml")
    p.add_argument("--out", help="run folder (overrides [run].out)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.set_defaults(func=c.cmd_simulate)

    p = sub.add_parser("certs", help="test TLS certificates for a SuperLink and key pairs for SuperNodes")
    p.add_argument("--out", required=True, help="folder for ca.crt, server.pem/.key and keys/<name>[.pub]")
    p.add_argument("--host", action="append",
                   help="the SuperLink's DNS name or IP (repeatable; default 127.0.0.1, localhost)")
    p.add_argument("--supernode", action="append", metavar="NAME",
                   help="an organisation to make a key pair for (repeatable)")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="overwrite an existing CA in --out")
    p.set_defaults(func=c.cmd_certs)

    from .estimate import add_parser

    add_parser(sub, c.DEFAULT_MODEL, MODEL_HELP)

    p = sub.add_parser("info", help="summary of an emulator folder")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=c.cmd_info)


def build_parser() -> argparse.ArgumentParser:
    """The ``scaleot-fed`` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="scaleot-fed", description="ScaleOT offsite-tuning across many data owners")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_stage_parsers, _model_parsers, _pipeline_parsers, _verdicts_parser, _federation_parsers):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scaleot-fed`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars drown the command's own output
    try:
        args.func(args)
    except ScaleOTError as exc:
        print(f"scaleot-fed {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scaleot-fed {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
