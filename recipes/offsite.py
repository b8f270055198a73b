"""The one-data-owner offsite-tuning pipeline: the five rows of Offsite-Tuning's table
(:mod:`scaleot_fed.report`) for one task and one or more emulators of the same full model.

Each row is written to ``rows/`` as soon as it is known, so a stopped run continues where it was.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from scaleot_fed.attack import AttackConfig
from scaleot_fed.config import as_dict, from_dict, load_toml
from scaleot_fed.distill import DistillConfig
from scaleot_fed.errors import ConfigError
from scaleot_fed.finetune import FinetuneConfig
from scaleot_fed.layer_replace import LayerReplaceConfig
from scaleot_fed.models import load_model
from scaleot_fed.report import emulator_entry, write_results
from scaleot_fed.rundir import RowCache, cached_rows, open_run_dir
from scaleot_fed.single_owner import NamedEmulatorConfig, SingleOwner, TaskRunConfig, prepare_emulator, trained_path
from scaleot_fed.tasks import load_task
from scaleot_fed.tracking import TrackingConfig, track_once


@dataclass
class OffsiteRunConfig(TaskRunConfig):
    """``[run]``: what to run on (see :class:`TaskRunConfig`) and which rows to compute."""

    out: str = "runs/offsite"
    dev_items: int = 64
    """Items cut from the end of the training items to pick the best checkpoint (the evaluation
    split is never used for selection)."""
    full_finetune: bool = True
    """Compute the Full fine-tuning row (the most expensive one)."""
    attack: bool = False
    """Also the model-privacy row: a data owner fine-tunes every emulator weight (``[attack]``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dev_items < 1:
            raise ConfigError(f"dev_items must be >= 1, got {self.dev_items}")


@dataclass
class PipelineConfig:
    """The tables an ``offsite`` and a ``study`` file share (the head table is each one's own)."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    layer_replace: LayerReplaceConfig = field(default_factory=LayerReplaceConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    emulators: list[NamedEmulatorConfig] = field(default_factory=list)
    attack: AttackConfig = field(default_factory=AttackConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class OffsiteConfig(PipelineConfig):
    run: OffsiteRunConfig = field(default_factory=OffsiteRunConfig)
    emulators: list[NamedEmulatorConfig] = field(default_factory=lambda: [NamedEmulatorConfig()])


def read_pipeline_toml(path: str | Path, head: str, head_cls, overrides: dict | None = None,
                       default_emulator: bool = True, extra: tuple[str, ...] = ()) -> dict:
    """The tables shared by ``offsite`` and ``study`` files: ``[<head>]``, ``[finetune]``,
    ``[layer_replace]``, ``[distill]`` and ``[[emulator]]``, as keyword arguments of the config
    (tables named in ``extra`` are allowed and left to the caller)."""
    data = load_toml(path)
    known = {head, "finetune", "layer_replace", "distill", "emulator", "attack", "tracking", *extra}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    emulators = data.get("emulator", [{}] if default_emulator else [])
    if not isinstance(emulators, list) or not emulators:
        raise ConfigError(f"{path}: give at least one [[emulator]] table")
    head_values = data.get(head, {})  # not a table: from_dict says so in one line
    if isinstance(head_values, dict):
        head_values = dict(head_values) | (overrides or {})
    values = {
        head: from_dict(head_cls, head_values, head),
        "finetune": from_dict(FinetuneConfig, data.get("finetune", {}), "finetune"),
        "layer_replace": from_dict(LayerReplaceConfig, data.get("layer_replace", {}), "layer_replace"),
        "distill": from_dict(DistillConfig, data.get("distill", {}), "distill"),
        "attack": from_dict(AttackConfig, data.get("attack", {}), "attack"),
        "tracking": from_dict(TrackingConfig, data.get("tracking", {}), "tracking"),
        "emulators": [from_dict(NamedEmulatorConfig, e, f"emulator {i}") for i, e in enumerate(emulators)],
    }
    names = [e.name for e in values["emulators"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: emulator names must be unique, got {names}")
    values["tracking"].check_installed()
    return values


def load_offsite_config(path: str | Path, overrides: dict | None = None) -> OffsiteConfig:
    """Read an offsite TOML file: ``[run]``, ``[finetune]``, ``[layer_replace]``, ``[distill]``,
    ``[[emulator]]`` (``overrides`` replace ``[run]`` values)."""
    return OffsiteConfig(**read_pipeline_toml(path, "run", OffsiteRunConfig, overrides))


def _owner(config: OffsiteConfig, out: Path, progress: bool, log) -> SingleOwner:
    """The owner's data (a bad task name fails before any model is loaded) and the full model."""
    run = config.run
    train_all = load_task(run.task, "train", run.train_limit)
    if len(train_all) <= run.dev_items:
        raise ConfigError(f"{run.task}: {len(train_all)} training items, need more than dev_items={run.dev_items}")
    train, dev = train_all[: -run.dev_items], train_all[-run.dev_items :]
    evaluation = run.evaluation_items()
    log(f"offsite: {run.model} on {run.task}: {len(train)} train, {len(dev)} dev, {len(evaluation)} eval items")
    loaded, rows = load_model(run.model), RowCache(out)
    return SingleOwner(loaded.model, loaded.tokenizer, train, dev, evaluation,
                       dataclasses.replace(config.finetune, eval_items=len(dev)), run.eval_batch_size, progress,
                       cache=cached_rows(rows, log), checkpoint=rows.checkpoint, eval_placement=run.eval_placement())


ADDS_ROWS = ("run.attack", "run.full_finetune", "run.eval_batch_size", "emulators", "tracking")
"""Config keys a rerun into the same folder may change: they add rows (rows are cached by name),
or send them elsewhere too."""


def run_offsite(config: OffsiteConfig, progress: bool = True, log=print, overwrite: bool = False) -> dict:
    """Run (or resume) the pipeline; returns the results dict also written to ``results.json``.

    A folder holding a run of another config is refused unless ``overwrite`` (see
    :func:`scaleot_fed.rundir.open_run_dir`)."""
    run = config.run
    out = open_run_dir(run.out, as_dict(config), overwrite, may_change=ADDS_ROWS)
    owner = _owner(config, out, progress, log)
    shared = {"full_zero_shot": owner.full_zero_shot()}
    if run.full_finetune:
        shared["full_finetune"] = owner.full_finetune()
    per_emulator = {}
    for section in config.emulators:
        emulator = prepare_emulator(section, owner.full, owner.tokenizer, config.layer_replace, run.model, out, log,
                                    config.distill)
        trained = trained_path(out / section.name, owner.finetune.mode)
        rows = shared | {"emulator_zero_shot": owner.emulator_zero_shot(section.name, emulator)}
        rows |= owner.emulator_finetune_and_plug_in(section.name, emulator, trained)
        if run.attack:
            rows["emulator_attack"] = owner.attack(section.name, section.emulator_dir(out), config.attack)
        per_emulator[section.name] = emulator_entry(rows, emulator.manifest, as_dict(section)) | {
            "build_cost": emulator.manifest.get("build_cost")}
    results = {"model": run.model, "task": run.task, "n_train": len(owner.train), "n_eval": len(owner.evaluation),
               "finetune": as_dict(owner.finetune), "emulators": per_emulator}
    write_results(out, results)
    track_once(config.tracking, out, as_dict(config), results, artifacts=[out / "results.md", out / "results.json",
                                                                          out / "results.png"])
    return results
