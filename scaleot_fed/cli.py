"""``scaleot-fed`` command line.

Each subcommand is a thin shell over the library: parse, call, print where it wrote what. User
errors (:class:`~scaleot_fed.errors.ScaleOTError`) print one line and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

import os

from .env import configure_environment

_USER_SET_THREADS = "OMP_NUM_THREADS" in os.environ
configure_environment()  # before torch / ray / flwr are imported anywhere below

from .errors import ScaleOTError  # noqa: E402

DEFAULT_MODEL = "smollm2-135m"


# ----------------------------------------------------------------------------- dataclass <-> argparse


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


def dataclass_from_args(cls, args: argparse.Namespace, base: dict | None = None, where: str = ""):
    """Build ``cls`` from TOML values (``base``) overridden by the options given on the command line."""
    from .config import from_dict

    values = dict(base or {})
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return from_dict(cls, values, where)


def _toml_section(args: argparse.Namespace, section: str) -> dict:
    if not getattr(args, "config", None):
        return {}
    from .config import load_toml

    data = load_toml(args.config)
    unknown = sorted(set(data) - {section})
    if unknown:
        raise ScaleOTError(f"{args.config}: unknown section(s) {', '.join(unknown)}; this command reads [{section}]")
    return data.get(section, {})


# ----------------------------------------------------------------------------- commands


def _use_all_cores() -> None:
    """Single-process commands use every core unless the user pinned OMP_NUM_THREADS (the
    one-thread default exists for many parallel client processes, not for one job)."""
    if not _USER_SET_THREADS:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)


def cmd_layer_replace(args: argparse.Namespace) -> None:
    from .layer_replace import LayerReplaceConfig, run_layer_replace, save_artifact
    from .models import load_model
    from .text import load_text_corpus, token_blocks

    config = dataclass_from_args(LayerReplaceConfig, args, _toml_section(args, "layer_replace"), "layer_replace")
    _use_all_cores()
    loaded = load_model(args.model)
    texts = load_text_corpus(args.data)
    ids = token_blocks(loaded.tokenizer, texts, config.block_size, max_blocks=config.blocks_needed())
    print(f"layer-replace: {args.model}, {len(ids)} blocks of {config.block_size} tokens from {args.data!r}, {config.steps} steps")
    result = run_layer_replace(loaded.model, ids, config, source_model=args.model, progress=not args.no_progress)
    out = save_artifact(result, args.out)
    ev = result.evaluation
    print(f"least important blocks first: {result.ranking()}")
    print(
        f"held-out loss: full {ev['heldout_loss_full']:.3f}, half the middle harmonized "
        f"{ev['heldout_loss_half_harmonized']:.3f}, dropped {ev['heldout_loss_half_dropped']:.3f}"
    )
    print(f"{result.seconds:.1f} s ({result.seconds / config.steps:.2f} s/step)")
    print(f"wrote {out / 'layer_replace.json'} and {out / 'harmonizers.safetensors'}")


def cmd_build_emulator(args: argparse.Namespace) -> None:
    from .config import from_dict
    from .emulator import EmulatorConfig, build_emulator, save_emulator
    from .layer_replace import load_artifact
    from .models import load_model

    # Validated before anything heavy is loaded.
    config = from_dict(EmulatorConfig, {"strategy": args.strategy, "num_adapter_layers": args.adapters,
                                        "alpha": args.alpha, "rank_keep_ratio": args.rank_keep_ratio})
    importance = load_artifact(args.importance) if args.importance else None
    loaded = load_model(args.model)
    emulator = build_emulator(loaded.model, config, importance, source_model=args.model)
    out = save_emulator(emulator, args.out, tokenizer=loaded.tokenizer)
    print(emulator.summary())
    print(f"wrote emulator to {out} (manifest {out / 'manifest.json'}, weights {out / 'model.safetensors'})")


def cmd_plug_in(args: argparse.Namespace) -> None:
    from .emulator import read_manifest
    from .models import load_model
    from .plugin import plug_in_path, save_plugged

    manifest = read_manifest(args.emulator)
    loaded = load_model(args.model)
    model = plug_in_path(loaded.model, manifest, args.trained)
    out = Path(args.out)
    save_plugged(model, loaded.tokenizer, out)
    print(f"plugged {args.trained} into {args.model} (adapter blocks {manifest['adapter_layers']})")
    print(f"wrote the plugged-in model to {out} (loads with AutoModelForCausalLM.from_pretrained)")


def load_any_model(spec: str):
    """A full model (folder, hub id, alias) or an emulator folder, as (model, tokenizer)."""
    from .emulator import MANIFEST, load_emulator
    from .models import load_model

    if (Path(spec) / MANIFEST).is_file():
        emulator = load_emulator(spec)
        return emulator.model, emulator.tokenizer
    loaded = load_model(spec)
    return loaded.model, loaded.tokenizer


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate_multiple_choice, perplexity
    from .tasks import load_task
    from .text import load_text_corpus, token_blocks

    if (args.task is None) == (args.text is None):
        raise ScaleOTError("give exactly one of --task (multiple choice) or --text (perplexity)")
    # bad task names or missing files fail before the model loads
    items = load_task(args.task, args.split, args.limit) if args.task else None
    texts = load_text_corpus(args.text) if args.text else None
    _use_all_cores()
    model, tokenizer = load_any_model(args.model)
    if tokenizer is None:
        raise ScaleOTError(f"{args.model} has no tokenizer files; evaluation needs one")
    if items is not None:
        result = {"model": args.model, "task": args.task, "split": args.split} | evaluate_multiple_choice(
            model, tokenizer, items, batch_size=args.batch_size)
        line = f"{args.task} ({args.split}, n={result['n']}): acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}"
    else:
        ids = token_blocks(tokenizer, texts, args.block_size, max_blocks=args.limit)
        result = {"model": args.model, "text": args.text, "block_size": args.block_size} | perplexity(
            model, ids, batch_size=args.batch_size)
        line = f"{args.text}: perplexity {result['perplexity']:.2f} over {result['tokens']} tokens"
    print(json.dumps(result) if args.json else line)


def cmd_finetune(args: argparse.Namespace) -> None:
    from .emulator import MANIFEST, load_emulator
    from .finetune import FinetuneConfig, finetune, make_trainable
    from .models import load_model
    from .plugin import export_trained, save_plugged
    from .tasks import load_task

    config = dataclass_from_args(FinetuneConfig, args, _toml_section(args, "finetune"), "finetune")
    items = load_task(args.task, "train", args.train_limit)
    if len(items) <= args.dev_items:
        raise ScaleOTError(f"{len(items)} training items; need more than --dev-items {args.dev_items}")
    train, dev = items[: -args.dev_items], items[-args.dev_items :]
    config.eval_items = len(dev)
    _use_all_cores()
    if (Path(args.model) / MANIFEST).is_file():
        emulator = load_emulator(args.model)
        model, tokenizer, positions = emulator.model, emulator.tokenizer, list(emulator.adapter_positions())
    else:
        emulator = None
        loaded = load_model(args.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        positions = list(range(model.config.num_hidden_layers))
    trained = make_trainable(model, positions, config)
    result = finetune(trained, tokenizer, train, dev, config, progress=not args.no_progress)
    print(f"dev loss {result.initial_val_loss:.4f} -> {result.best_val_loss:.4f} (best at step {result.best_step}); "
          f"{result.trainable_params:,} trainable parameters, {result.tokens_per_second:.0f} tokens/s")
    if emulator is not None:
        out = export_trained(trained, emulator, args.out)
        print(f"wrote the trained adapter state to {out} (plug in with `scaleot-fed plug-in --trained {out}`)")
    else:
        merged = trained.merge_and_unload() if hasattr(trained, "merge_and_unload") else trained
        out = save_plugged(merged, tokenizer, args.out)
        print(f"wrote the fine-tuned full model to {out}")


def cmd_offsite(args: argparse.Namespace, attack: bool = False) -> dict:
    from .offsite import load_offsite_config, markdown_table, run_offsite

    overrides = ({"out": args.out} if args.out else {}) | ({"attack": True} if attack else {})
    config = load_offsite_config(args.config, overrides)
    _use_all_cores()
    results = run_offsite(config, progress=not args.no_progress)
    print()
    print(markdown_table(results))
    out = Path(config.run.out)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'results.png'}")
    return results


def cmd_attack(args: argparse.Namespace) -> None:
    """The offsite pipeline with the attack row (cached rows of an earlier run are reused)."""
    results = cmd_offsite(args, attack=True)
    for name, entry in results["emulators"].items():
        rows = entry["rows"]
        print(f"{name}: attacker (all {rows['emulator_attack']['trainable_params']:,} emulator weights trained) "
              f"{100 * rows['emulator_attack']['acc']:.1f} vs plug-in {100 * rows['plug_in']['acc']:.1f} "
              f"(attack gap {100 * entry['attack_gap']:+.1f}; honest emulator FT gap {100 * entry['gap']:+.1f})")


def _parse_overrides(pairs: list[str]) -> dict:
    import tomllib

    overrides = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or "." not in key:
            raise ScaleOTError(f"--set takes section.key=value, got {pair!r}")
        try:
            overrides[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key] = raw  # a bare string
    return overrides


def cmd_certs(args: argparse.Namespace) -> None:
    from simulations.deployment import make_certificates

    out = Path(args.out)
    if (out / "ca.key").exists() and not args.force:
        raise ScaleOTError(f"{out} already holds a CA; use another --out or --force to replace it")
    make_certificates(out, args.host or ["127.0.0.1", "localhost"], args.supernode or [])
    print(f"wrote {out}/ca.crt (give it to every organisation), {out}/server.pem + server.key (the SuperLink's)")
    for name in args.supernode or []:
        print(f"  {out}/keys/{name} (private: stays with {name}), {out}/keys/{name}.pub (register it on the SuperLink)")
    print("self-signed test certificates: use your organisation's CA in production (docs/deployment.md)")


def cmd_simulate(args: argparse.Namespace) -> None:
    import logging

    from simulations.config import load_fed_config, with_run
    from simulations.runner import load_run_config, simulate

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s scaleot-fed: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("scaleot_fed")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    if args.resume:
        config = load_run_config(args.resume)
        resume = True
    else:
        if not args.config:
            raise ScaleOTError("give --config FILE.toml (or --resume RUN_DIR)")
        config = load_fed_config(args.config, _parse_overrides(args.set))
        if args.out:
            config = with_run(config, out=args.out)
        resume = False
    out = simulate(config, resume=resume)
    if (out / "results.md").exists():
        print((out / "results.md").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"{len(metrics['rounds'])} rounds; bytes down {metrics['bytes_down_total'] / 1e6:.1f} MB "
          f"(emulator {metrics['emulator_bytes'] / 1e6:.1f} MB once per data-owner machine), up "
          f"{metrics['bytes_up_total'] / 1e6:.1f} MB; full model {metrics['full_model_bytes'] / 1e6:.1f} MB")
    print(f"wrote the run to {out}: metrics.json, metrics.csv, rounds.png, partitions.png, checkpoint/, "
          "results.json/.md/.png, plugged/")


def cmd_study(args: argparse.Namespace) -> None:
    from .study import load_study_config, run_study

    config = load_study_config(args.config)
    if args.out:
        config.study.out = args.out
    _use_all_cores()
    summary = run_study(config, progress=not args.no_progress)
    out = Path(config.study.out)
    print((out / "summary.md").read_text())
    print(f"wrote {out / 'summary.json'}, {out / 'summary.md'} and {out / 'frontier.png'} ({len(summary['cells'])} cells)")


def cmd_info(args: argparse.Namespace) -> None:
    from .emulator import manifest_summary, read_manifest

    manifest = read_manifest(args.dir)
    print(json.dumps(manifest, indent=1) if args.json else manifest_summary(manifest))


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .emulator import STRATEGIES, EmulatorConfig
    from .layer_replace import LayerReplaceConfig

    parser = argparse.ArgumentParser(prog="scaleot-fed", description="ScaleOT offsite-tuning across many data owners")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_help = "local HF folder, hub id, or the offline alias smollm2-135m (default)"

    p = sub.add_parser("layer-replace", help="stage 1: importance scores + harmonizers (Dynamic LayerReplace)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--data", default="lambada",
                   help="owner's general text: 'lambada' (built in), a .txt/.jsonl file, a datasets folder or a hub dataset")
    p.add_argument("--config", help="TOML file with a [layer_replace] table")
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--adapters", dest="num_adapter_layers", type=int, help="alias of --num-adapter-layers")
    add_dataclass_arguments(p, LayerReplaceConfig)
    p.set_defaults(func=cmd_layer_replace)

    p = sub.add_parser("build-emulator", help="stage 2: build an emulator (N_a, alpha, rank_keep_ratio)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--strategy", choices=STRATEGIES, default="scaleot")
    p.add_argument("--adapters", type=int, default=EmulatorConfig.num_adapter_layers, help="N_a, even (default 4)")
    p.add_argument("--alpha", type=float, default=EmulatorConfig.alpha, help="share of middle blocks replaced (default 0.5)")
    p.add_argument("--rank-keep-ratio", type=float, default=EmulatorConfig.rank_keep_ratio,
                   help="SRC: share of attention rank kept in kept middle blocks (default 1 = off)")
    p.add_argument("--importance", help="layer-replace artifact folder (scaleot, importance-drop)")
    p.add_argument("--out", required=True, help="emulator folder to write")
    p.set_defaults(func=cmd_build_emulator)

    p = sub.add_parser("plug-in", help="put trained adapter blocks into the full model")
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--emulator", required=True, help="emulator folder the state was trained on")
    p.add_argument("--trained", required=True, help="adapter state (.safetensors) or peft LoRA folder")
    p.add_argument("--out", required=True, help="folder for the plugged-in model")
    p.set_defaults(func=cmd_plug_in)

    p = sub.add_parser("evaluate", help="zero-shot multiple-choice acc / acc_norm, lm-evaluation-harness style")
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help + ", or an emulator folder")
    p.add_argument("--task", help="piqa, arc_easy, arc_challenge, openbookqa, hellaswag, sciq, or a .jsonl/.csv file")
    p.add_argument("--text", help="perplexity instead: 'lambada', a .txt/.jsonl file or a datasets folder")
    p.add_argument("--split", default="validation", choices=("train", "validation"))
    p.add_argument("--limit", type=int, help="first N items (or N token blocks with --text) only")
    p.add_argument("--block-size", type=int, default=512, help="tokens per block for --text")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)

    from .finetune import FinetuneConfig

    p = sub.add_parser("finetune", help="train adapter blocks of an emulator (or a full model) on a task")
    p.add_argument("--model", required=True, help="emulator folder (adapter blocks train) or full model (all blocks)")
    p.add_argument("--task", required=True, help="built-in task name or a .jsonl/.csv file")
    p.add_argument("--train-limit", type=int, help="first N training items")
    p.add_argument("--dev-items", type=int, default=64, help="items cut from the end of the training items for checkpoint selection")
    p.add_argument("--config", help="TOML file with a [finetune] table")
    p.add_argument("--out", required=True, help="adapter state (.safetensors) or LoRA folder to write")
    p.add_argument("--no-progress", action="store_true")
    add_dataclass_arguments(p, FinetuneConfig, skip=("eval_items",))
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("offsite", help="the one-data-owner pipeline: five rows and the privacy gap")
    p.add_argument("--config", required=True, help="TOML: [run], [finetune], [layer_replace], [[emulator]]")
    p.add_argument("--out", help="run folder (overrides [run].out)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_offsite)

    p = sub.add_parser("attack", help="model-privacy report: a data owner fine-tunes every emulator weight; "
                                      "how close does it get to the plug-in model?")
    p.add_argument("--config", required=True, help="the offsite TOML ([attack] sets the attacker's training)")
    p.add_argument("--out", help="run folder (overrides [run].out; rows already there are reused)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("study", help="the offsite pipeline over emulators x tasks x modes (resumable)")
    p.add_argument("--config", required=True, help="TOML: [study], [finetune], [layer_replace], [distill], [[emulator]]")
    p.add_argument("--out", help="study folder (overrides [study].out)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("simulate", help="federated offsite-tuning on Flower's simulation engine (Ray)")
    p.add_argument("--config", help="run file (TOML), e.g. simulations/configs/smoke.toml")
    p.add_argument("--out", help="run folder (overrides [run].out)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("certs", help="test TLS certificates for a SuperLink and key pairs for SuperNodes")
    p.add_argument("--out", required=True, help="folder for ca.crt, server.pem/.key and keys/<name>[.pub]")
    p.add_argument("--host", action="append", help="the SuperLink's DNS name or IP (repeatable; default 127.0.0.1, localhost)")
    p.add_argument("--supernode", action="append", metavar="NAME", help="an organisation to make a key pair for (repeatable)")
    p.add_argument("--force", action="store_true", help="overwrite an existing CA in --out")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("info", help="summary of an emulator folder")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_info)
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
