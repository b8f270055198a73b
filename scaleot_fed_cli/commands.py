"""The ``scaleot-fed`` subcommands: each a thin shell over the library or a program. Parse,
call, print where it wrote what. Heavy modules are imported inside each command so that
``--help`` and bad input answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from scaleot_fed.env import USER_SET_THREADS
from scaleot_fed.errors import ConfigError
from scaleot_fed.rundir import check_output, check_writable, clear_output

DEFAULT_MODEL = "smollm2-135m"


def dataclass_from_args(cls, args: argparse.Namespace, base: dict | None = None, where: str = ""):
    """Build ``cls`` from TOML values (``base``) overridden by the options given on the command line."""
    from scaleot_fed.config import from_dict

    values = dict(base or {})
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return from_dict(cls, values, where)


def _toml_section(args: argparse.Namespace, section: str, beside: tuple[str, ...] = ()) -> dict:
    """Table ``section`` of ``--config`` (empty without one); tables other than it and ``beside``
    are refused."""
    if not getattr(args, "config", None):
        return {}
    from scaleot_fed.config import load_toml

    data = load_toml(args.config)
    unknown = sorted(set(data) - {section, *beside})
    if unknown:
        raise ConfigError(f"{args.config}: unknown section(s) {', '.join(unknown)}; this command reads "
                          + ", ".join(f"[{s}]" for s in (section, *beside)))
    return data.get(section, {})


def _use_all_cores() -> None:
    """Single-process commands use every core unless the user pinned OMP_NUM_THREADS (the
    one-thread default exists for many parallel client processes, not for one job)."""
    if not USER_SET_THREADS:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)


def cmd_layer_replace(args: argparse.Namespace) -> None:
    from scaleot_fed.artifact import save_artifact
    from scaleot_fed.devices import resolve_dtype
    from scaleot_fed.layer_replace import LayerReplaceConfig, run_layer_replace
    from scaleot_fed.models import load_model
    from scaleot_fed.text import load_text_corpus, token_blocks

    config = dataclass_from_args(LayerReplaceConfig, args, _toml_section(args, "layer_replace"), "layer_replace")
    check_output(args.out, args.overwrite)
    _use_all_cores()
    print(f"layer-replace: loading {args.model} ...", flush=True)
    if args.device_map:  # loaded straight into dtype, spread over the devices (never whole in float32)
        loaded = load_model(args.model, dtype=resolve_dtype(config.dtype), device_map=args.device_map)
    else:
        loaded = load_model(args.model)
    texts = load_text_corpus(args.data)
    ids = token_blocks(loaded.tokenizer, texts, config.block_size, max_blocks=config.blocks_needed())
    print(f"layer-replace: {args.model}, {len(ids)} blocks of {config.block_size} tokens from {args.data!r}, {config.steps} steps")
    result = run_layer_replace(loaded.model, ids, config, source_model=args.model, progress=not args.no_progress)
    clear_output(args.out)
    out = save_artifact(result, args.out, data=args.data)
    ev = result.evaluation
    print(f"least important blocks first: {result.ranking()}")
    print(f"held-out loss: full {ev['heldout_loss_full']:.3f}; blocks {ev['replaced']} harmonized "
          f"{ev['heldout_loss_harmonized']:.3f}, dropped {ev['heldout_loss_dropped']:.3f}")
    print(f"{result.seconds:.1f} s ({result.seconds / config.steps:.2f} s/step)")
    print(f"wrote {out / 'layer_replace.json'} and {out / 'harmonizers.safetensors'}")


def cmd_build_emulator(args: argparse.Namespace) -> None:
    from scaleot_fed.artifact import load_artifact
    from scaleot_fed.config import from_dict
    from scaleot_fed.emulator import EmulatorConfig, save_emulator
    from scaleot_fed.emulator.build import build_emulator
    from scaleot_fed.models import load_model
    from scaleot_fed.text import load_text_corpus

    # Validated before anything heavy is loaded.
    config = from_dict(EmulatorConfig, {"method": args.method, "num_adapter_layers": args.adapters,
                                        "alpha": args.alpha, "rank_keep_ratio": args.rank_keep_ratio,
                                        "dtype": args.dtype})
    importance = load_artifact(args.importance) if args.importance else None
    texts = load_text_corpus(args.calibration) if config.emulator_strategy.needs_calibration else None
    check_output(args.out, args.overwrite)
    if args.stream:
        from scaleot_fed.emulator.streaming import build_emulator_streaming, local_folder
        from scaleot_fed.models import saved_tokenizer

        clear_output(args.out)
        out = build_emulator_streaming(folder := local_folder(args.model), config, args.out, importance,
                                       source_model=args.model, tokenizer=saved_tokenizer(folder))
        print(f"wrote emulator to {out} (streamed from {folder}, one block at a time)")
        return
    print(f"build-emulator: loading {args.model} ...", flush=True)
    loaded = load_model(args.model)
    print(f"build-emulator: {config.method}, N_a={config.num_adapter_layers}, alpha={config.alpha}, "
          f"rank_keep_ratio={config.rank_keep_ratio} (SRC factorises each kept middle block) ...", flush=True)
    calibration = config.emulator_strategy.calibration(loaded.tokenizer, texts) if texts is not None else None
    emulator = build_emulator(loaded.model, config, importance, source_model=args.model, calibration=calibration)
    clear_output(args.out)
    out = save_emulator(emulator, args.out, tokenizer=loaded.tokenizer)
    print(emulator.summary())
    print(f"wrote emulator to {out} (manifest {out / 'manifest.json'}, weights {out / 'model.safetensors'})")


def cmd_plug_in(args: argparse.Namespace) -> None:
    from scaleot_fed.emulator import read_manifest
    from scaleot_fed.models import load_model
    from scaleot_fed.plugin import plug_in_path, save_plugged

    manifest = read_manifest(args.emulator)
    check_output(args.out, args.overwrite)
    if args.stream:
        from scaleot_fed.emulator.streaming import local_folder, plug_in_streaming

        clear_output(args.out)
        out = plug_in_streaming(local_folder(args.model), manifest, args.trained, args.out)
        print(f"wrote the plugged-in model to {out}, one shard per block (loads with from_pretrained)")
        return
    loaded = load_model(args.model)
    model = plug_in_path(loaded.model, manifest, args.trained)
    out = Path(args.out)
    clear_output(out)
    save_plugged(model, loaded.tokenizer, out)
    print(f"plugged {args.trained} into {args.model} (adapter blocks {manifest['adapter_layers']})")
    print(f"wrote the plugged-in model to {out} (loads with AutoModelForCausalLM.from_pretrained)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from scaleot_fed.devices import place, resolve_device, resolve_dtype
    from scaleot_fed.evaluate import evaluate_multiple_choice, perplexity
    from scaleot_fed.models import load_model_or_emulator
    from scaleot_fed.score_state import SAVE_EVERY_S, ScoreLog
    from scaleot_fed.tasks import load_task
    from scaleot_fed.text import load_text_corpus, token_blocks
    from scaleot_fed.train_state import Checkpoint

    if (args.task is None) == (args.text is None):
        raise ConfigError("give exactly one of --task (multiple choice) or --text (perplexity)")
    if args.save_to and not args.task:
        raise ConfigError("--save-to saves a multiple-choice scoring; it needs --task")
    checkpoint = Checkpoint(args.save_to, every_s=SAVE_EVERY_S) if args.save_to else None
    if checkpoint is not None and (saved := ScoreLog.check_file(checkpoint.path)):
        print(f"evaluate: {checkpoint.path} holds {saved} scored batches; reused if they are this scoring's",
              file=sys.stderr)
    elif checkpoint is not None:
        check_writable(checkpoint.path.parent, "--save-to")
    # bad task names or missing files fail before the model loads
    items = load_task(args.task, args.split, args.limit) if args.task else None
    texts = load_text_corpus(args.text) if args.text else None
    _use_all_cores()
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if args.device_map:  # loaded straight into dtype, spread over the devices (never whole in float32)
        from scaleot_fed.models import load_model

        loaded = load_model(args.model, dtype=dtype, device_map=args.device_map)
        model, tokenizer = loaded.model.requires_grad_(False), loaded.tokenizer
    else:
        model, tokenizer, _ = load_model_or_emulator(args.model)
        place(model.requires_grad_(False), device, dtype)  # scoring trains nothing: every weight in dtype
    if tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer files; evaluation needs one")
    if items is not None:
        result = {"model": args.model, "task": args.task, "split": args.split} | evaluate_multiple_choice(
            model, tokenizer, items, batch_size=args.batch_size, progress=not args.json, checkpoint=checkpoint)
        if checkpoint is not None:
            checkpoint.remove()
        line = f"{args.task} ({args.split}, n={result['n']}): acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}"
    else:
        ids = token_blocks(tokenizer, texts, args.block_size, max_blocks=args.limit)
        result = {"model": args.model, "text": args.text, "block_size": args.block_size} | perplexity(
            model, ids, batch_size=args.batch_size)
        line = f"{args.text}: perplexity {result['perplexity']:.2f} over {result['tokens']} tokens"
    print(json.dumps(result) if args.json else line)


def cmd_finetune(args: argparse.Namespace) -> None:
    from scaleot_fed.config import as_dict, from_dict
    from scaleot_fed.finetune import FinetuneConfig, finetune, make_trainable
    from scaleot_fed.models import load_model_or_emulator
    from scaleot_fed.plugin import export_trained, save_plugged
    from scaleot_fed.tasks import load_task
    from scaleot_fed.tracking import TrackingConfig, track_once
    from scaleot_fed.train_state import Checkpoint

    config = dataclass_from_args(FinetuneConfig, args, _toml_section(args, "finetune", ("tracking",)), "finetune")
    tracked = _toml_section(args, "tracking", ("finetune",)) | ({"backend": args.tracking} if args.tracking else {})
    tracking = from_dict(TrackingConfig, tracked, "tracking")
    tracking.check_installed()
    checkpoint = Checkpoint(f"{str(args.out).rstrip('/')}.training.pt", args.save_every)  # a stopped run resumes from it
    items = load_task(args.task, "train", args.train_limit)
    if len(items) <= args.dev_items:
        raise ConfigError(f"{len(items)} training items; need more than --dev-items {args.dev_items}")
    train, dev = items[: -args.dev_items], items[-args.dev_items :]
    config.eval_items = len(dev)
    check_output(args.out, args.overwrite)
    _use_all_cores()
    print(f"finetune: loading {args.model}; {len(train)} train / {len(dev)} dev items; the dev loss is "
          "measured before the first step and at every eval_every steps ...", flush=True)
    model, tokenizer, emulator = load_model_or_emulator(args.model)  # an emulator trains its adapter blocks only
    positions = (list(emulator.adapter_positions()) if emulator is not None
                 else list(range(model.config.num_hidden_layers)))
    trained = make_trainable(model, positions, config)
    if checkpoint.path.exists():
        print(f"finetune: resuming the run saved in {checkpoint.path}", flush=True)
    result = finetune(trained, tokenizer, train, dev, config, progress=not args.no_progress, checkpoint=checkpoint)
    print(f"dev loss {result.initial_val_loss:.4f} -> {result.best_val_loss:.4f} (best at step {result.best_step}); "
          f"{result.trainable_params:,} trainable parameters, {result.tokens_per_second:.0f} tokens/s")
    clear_output(args.out)
    if emulator is not None:
        out = export_trained(trained, emulator, args.out)
        print(f"wrote the trained adapter state to {out} (plug in with `scaleot-fed plug-in --trained {out}`)")
    else:
        merged = trained.merge_and_unload() if hasattr(trained, "merge_and_unload") else trained
        out = save_plugged(merged, tokenizer, args.out)
        print(f"wrote the fine-tuned full model to {out}")
    summary = {"initial_dev_loss": result.initial_val_loss, "best_dev_loss": result.best_val_loss,
               "best_step": result.best_step, "trainable_params": result.trainable_params,
               "tokens_per_second": result.tokens_per_second}
    track_once(tracking, Path(f"{str(args.out).rstrip('/')}.tracking"), {"finetune": as_dict(config), "model": args.model, "task": args.task,
                                          "train_items": len(train), "dev_items": len(dev)}, summary, result.history)
    checkpoint.remove()


def cmd_offsite(args: argparse.Namespace, attack: bool = False) -> dict:
    from recipes.offsite import load_offsite_config, run_offsite
    from scaleot_fed.report import markdown_table

    overrides = ({"out": args.out} if args.out else {}) | ({"attack": True} if attack else {})
    config = load_offsite_config(args.config, overrides)
    _use_all_cores()
    results = run_offsite(config, progress=not args.no_progress, overwrite=args.overwrite)
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
            raise ConfigError(f"--set takes section.key=value, got {pair!r}")
        try:
            overrides[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key] = raw  # a bare string
    return overrides


def cmd_certs(args: argparse.Namespace) -> None:
    from simulations.deployment import make_certificates

    out = Path(args.out)
    if (out / "ca.key").exists() and not args.force:
        raise ConfigError(f"{out} already holds a CA; use another --out or --force to replace it")
    make_certificates(out, args.host or ["127.0.0.1", "localhost"], args.supernode or [])
    print(f"wrote {out}/ca.crt (give it to every organisation), {out}/server.pem + server.key (the SuperLink's)")
    for name in args.supernode or []:
        print(f"  {out}/keys/{name} (private: stays with {name}), {out}/keys/{name}.pub (register it on the SuperLink)")
    print("self-signed test certificates: use your organisation's CA in production (docs/deployment.md)")


def cmd_simulate(args: argparse.Namespace) -> None:
    import logging

    from simulations.config import load_fed_config, with_run
    from simulations.resume import load_run_config
    from simulations.runner import simulate

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s scaleot-fed: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("scaleot_fed")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    overrides = _parse_overrides(args.set)
    if args.resume:
        config = load_run_config(args.resume, overrides, args.config)
    else:
        if not args.config:
            raise ConfigError("give --config FILE.toml (or --resume RUN_DIR)")
        config = load_fed_config(args.config, overrides)
        if args.out:
            config = with_run(config, out=args.out)
    out = simulate(config, resume=bool(args.resume), overwrite=args.overwrite)
    if (out / "results.md").exists():
        print((out / "results.md").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"{len(metrics['rounds'])} rounds; bytes down {metrics['bytes_down_total'] / 1e6:.1f} MB "
          f"(emulator {metrics['emulator_bytes'] / 1e6:.1f} MB once per data-owner machine), up "
          f"{metrics['bytes_up_total'] / 1e6:.1f} MB; full model {metrics['full_model_bytes'] / 1e6:.1f} MB")
    print(f"wrote the run to {out}: metrics.json, metrics.csv, rounds.png, partitions.png, checkpoint/, "
          "results.json/.md/.png, plugged/")


def cmd_study(args: argparse.Namespace) -> None:
    from recipes.study import load_study_config
    from recipes.study.federated import load_federations
    from recipes.study.markdown import closing_text
    from recipes.study.report import report_study
    from recipes.study.run import run_study
    from recipes.study.schedule import Schedule, parse_until

    config = load_study_config(args.config)
    schedule = Schedule(builds_last=args.builds_last, until=parse_until(args.until) if args.until else None)
    if args.report_only and (args.until or args.builds_last):
        raise ConfigError("--report-only runs no unit: drop --until and --builds-last")
    config.study.out = args.out or config.study.out
    if args.rate_from and not args.plan:
        raise ConfigError("--rate-from prices a --plan; add --plan, or drop it")
    _use_all_cores()
    # the federated rows come from the simulations package, a program beside the study
    federations = load_federations(config, args.config, check=not args.overwrite, owners=not args.report_only)
    if args.plan:
        from recipes.study.plan import plan_study

        if args.overwrite or args.report_only:
            raise ConfigError("--plan shows what a resume would run: drop --overwrite and --report-only")
        plan_study(config, federations=federations, rate_from=args.rate_from, schedule=schedule)
        return
    summary = report_study(config) if args.report_only else run_study(
        config, not args.no_progress, overwrite=args.overwrite, federations=federations, schedule=schedule)
    print(closing_text(summary, config))


def cmd_verdicts(args: argparse.Namespace) -> None:
    from recipes.study.verdicts import write_verdicts

    print(write_verdicts(args.results, args.into))


def cmd_info(args: argparse.Namespace) -> None:
    from scaleot_fed.emulator import read_manifest
    from scaleot_fed.manifest import manifest_summary

    manifest = read_manifest(args.dir)
    print(json.dumps(manifest, indent=1) if args.json else manifest_summary(manifest))
