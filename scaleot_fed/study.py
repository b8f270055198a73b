"""A study: the offsite pipeline over a grid of emulators x tasks x fine-tuning modes.

Every emulator is built once (stage 1 and distillation once, their cost recorded); every
(task, mode) is one offsite run whose rows are cached, so a stopped study continues where it
was. The summary holds one cell per (task, mode, emulator): five rows, the gap, the build cost.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .attack import AttackConfig
from .config import as_dict
from .errors import ConfigError
from .distill import DistillConfig
from .finetune import MODES, FinetuneConfig
from .layer_replace import LayerReplaceConfig
from .models import load_model
from .offsite import EmulatorSection, OffsiteConfig, RunSection, prepare_emulator, read_pipeline_toml, run_offsite


@dataclass
class StudySection:
    """``[study]``: the grid's fixed part."""

    out: str = "runs/study"
    model: str = "smollm2-135m"
    tasks: list[str] = field(default_factory=lambda: ["piqa", "arc_easy", "openbookqa", "hellaswag"])
    modes: list[str] = field(default_factory=lambda: ["lora"])
    train_limit: int | None = 2000
    dev_items: int = 64
    eval_limit: int | None = 200
    eval_batch_size: int = 16
    full_finetune: bool = True
    variant_emulator: str | None = None
    """The PEFT comparison: the ``[[emulator]]`` (by name) that is also trained with ``variant_modes``."""
    variant_modes: list[str] = field(default_factory=list)
    attack: bool = False
    """Add the model-privacy row (``[attack]``) to every cell of the main modes."""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("study.tasks is empty")
        for key in ("modes", "variant_modes"):
            modes = getattr(self, key)
            if [m for m in modes if m not in MODES] or (key == "modes" and not modes):
                raise ValueError(f"study.{key} must be a list of {', '.join(MODES)}; got {modes}")
        if bool(self.variant_emulator) != bool(self.variant_modes):
            raise ValueError("study.variant_emulator and study.variant_modes go together: name the emulator "
                             "and the extra fine-tuning modes to train it with")


@dataclass
class StudyConfig:
    study: StudySection = field(default_factory=StudySection)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    layer_replace: LayerReplaceConfig = field(default_factory=LayerReplaceConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    emulators: list[EmulatorSection] = field(default_factory=list)
    attack: AttackConfig = field(default_factory=AttackConfig)


def load_study_config(path: str | Path) -> StudyConfig:
    """Read a study TOML file: ``[study]`` plus the offsite tables, at least one ``[[emulator]]``."""
    config = StudyConfig(**read_pipeline_toml(path, "study", StudySection, default_emulator=False))
    names = [e.name for e in config.emulators]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: emulator names must be unique (they name folders); got {names}")
    if config.study.variant_emulator and config.study.variant_emulator not in names:
        raise ConfigError(f"{path}: study.variant_emulator = {config.study.variant_emulator!r} is not one of "
                          f"the [[emulator]] names {names}")
    return config


def run_study(config: StudyConfig, progress: bool = False, log=print) -> dict:
    """Run (or resume) the grid; writes ``summary.json``, ``summary.md`` and ``frontier.png``."""
    study = config.study
    out = Path(study.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(as_dict(config), indent=1))

    built: dict[str, EmulatorSection] = {}

    def ready(section: EmulatorSection) -> EmulatorSection:
        # Built once, on first use, and from then on read from disk (stage 1 and the distillation
        # too: their folders are the cache).
        if section.path:
            return section
        if section.name not in built:
            loaded = load_model(study.model)
            prepare_emulator(section, loaded.model, loaded.tokenizer, config.layer_replace, study.model,
                             out / "emulators", log, config.distill)
            del loaded
            built[section.name] = dataclasses.replace(
                section, path=str(out / "emulators" / section.name / "emulator"))
        return built[section.name]

    cells: list[dict] = []
    summary: dict = {}
    # Task by task, so a long study has complete comparisons (every method on one task) early;
    # each (task, mode) folder caches its rows, the full-model rows included, so a stopped study
    # continues where it was and nothing is computed twice.
    for task in study.tasks:
        for section in config.emulators:
            modes = study.modes + ([m for m in study.variant_modes if m not in study.modes]
                                   if section.name == study.variant_emulator else [])
            for mode in modes:
                log(f"study: {section.name} on {task}, mode {mode}")
                run = RunSection(out=str(out / task / mode), model=study.model, task=task,
                                 train_limit=study.train_limit, dev_items=study.dev_items,
                                 eval_limit=study.eval_limit, eval_batch_size=study.eval_batch_size,
                                 # the full-model reference is trained in the study's main modes only
                                 full_finetune=study.full_finetune and mode in study.modes,
                                 attack=study.attack and mode in study.modes)
                results = run_offsite(OffsiteConfig(run=run, finetune=dataclasses.replace(config.finetune, mode=mode),
                                                    layer_replace=config.layer_replace, distill=config.distill,
                                                    emulators=[ready(section)], attack=config.attack), progress=progress, log=log)
                cells += [{"task": task, "mode": mode, "emulator": name} | entry
                          for name, entry in results["emulators"].items()]
            summary = {"model": study.model, "tasks": study.tasks, "modes": study.modes,
                       "variant_emulator": study.variant_emulator, "variant_modes": study.variant_modes,
                       "n_eval": study.eval_limit, "finetune": as_dict(config.finetune), "cells": cells}
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
            (out / "summary.md").write_text(summary_markdown(summary))
            plot_frontier(summary, out / "frontier.png")
    return summary


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def summary_markdown(summary: dict) -> str:
    """Plug-in accuracy, emulator-FT accuracy and gap per (emulator, mode), per task and averaged."""
    tasks = summary["tasks"]
    lines = [f"# Study: {summary['model']}", "",
             "Per task: plug-in / emulator fine-tuned / gap, accuracy in %. Full rows are shared.", "",
             "| emulator | mode | trainable | " + " | ".join(tasks) + " | average | build cost |",
             "|---|---|---|" + "---|" * (len(tasks) + 2)]
    keys = sorted({(c["emulator"], c["mode"]) for c in summary["cells"]}, key=lambda k: (k[1], k[0]))
    for name, mode in keys:
        cells = {c["task"]: c for c in summary["cells"] if c["emulator"] == name and c["mode"] == mode}
        parts = []
        for task in tasks:
            c = cells.get(task)
            parts.append("n/a" if c is None else
                         f"{100 * c['rows']['plug_in']['acc']:.1f} / {100 * c['rows']['emulator_finetune']['acc']:.1f} / {100 * c['gap']:+.1f}")
        avg = (f"{100 * _mean([c['rows']['plug_in']['acc'] for c in cells.values()]):.1f} / "
               f"{100 * _mean([c['rows']['emulator_finetune']['acc'] for c in cells.values()]):.1f} / "
               f"{100 * _mean([c['gap'] for c in cells.values()]):+.1f}")
        cost = next((c.get("build_cost") for c in cells.values() if c.get("build_cost")), None)
        cost_text = "none" if not cost else f"{cost['kind']}: {cost['seconds']:.0f} s, {cost['tokens_forward_backward']:,} fb tokens"
        trainable = next(iter(cells.values()))["rows"]["emulator_finetune"].get("trainable_params")
        lines.append(f"| {name} | {mode} | {trainable or 0:,} | " + " | ".join(parts) + f" | {avg} | {cost_text} |")
    for row in ("full_zero_shot", "full_finetune"):
        values = []
        for task in tasks:
            c = next((c for c in summary["cells"] if c["task"] == task and row in c["rows"]), None)
            values.append("n/a" if c is None else f"{100 * c['rows'][row]['acc']:.1f}")
        lines.append(f"| *{row.replace('_', ' ')}* | | | " + " | ".join(values) + " | | |")
    return "\n".join(lines) + "\n"


def plot_frontier(summary: dict, path: Path) -> None:
    """Privacy-utility frontier: average plug-in accuracy vs average gap, one point per emulator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    keys = sorted({(c["emulator"], c["mode"]) for c in summary["cells"]})
    for name, mode in keys:
        cells = [c for c in summary["cells"] if c["emulator"] == name and c["mode"] == mode]
        x = 100 * _mean([c["gap"] for c in cells])
        y = 100 * _mean([c["rows"]["plug_in"]["acc"] for c in cells])
        ax.scatter(x, y)
        ax.annotate(f"{name} ({mode})", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    full = [c["rows"]["full_finetune"]["acc"] for c in summary["cells"] if "full_finetune" in c["rows"]]
    if full:
        ax.axhline(100 * _mean(full), linestyle="--", color="grey", label="full fine-tuning")
        ax.legend(fontsize=7)
    ax.set_xlabel("gap: plug-in - emulator fine-tuned (accuracy points; more = more privacy)")
    ax.set_ylabel("plug-in accuracy (%)")
    ax.set_title(f"{summary['model']}: average over {', '.join(summary['tasks'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
