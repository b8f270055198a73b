"""A study: the offsite pipeline over a grid of emulators x tasks x fine-tuning modes.

Every emulator is built once (stage 1 and distillation once, their cost recorded); every
(task, mode) is one offsite run whose rows are cached, so a stopped study continues where it
was. The summary holds one cell per (task, mode, emulator): five rows, the gap, the build cost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from scaleot_fed.config import as_dict
from scaleot_fed.errors import ConfigError
from scaleot_fed.finetune import MODES
from scaleot_fed.models import load_model

from .offsite import OffsiteConfig, PipelineSections, RunSection, read_pipeline_toml, run_offsite
from .rundir import open_run_dir, write_json
from .single_owner import EmulatorSection, prepare_emulator

METRICS = ("acc", "acc_norm")


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
    metrics: dict[str, str] = field(default_factory=dict)
    """Summary metric per task, ``acc`` or ``acc_norm`` (unnamed tasks: ``acc``). Both are always
    computed and kept in the cells; this picks what the table, averages and frontier show."""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("study.tasks is empty")
        for name in ("dev_items", "eval_batch_size", "train_limit", "eval_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"study.{name} must be >= 1, got {getattr(self, name)}")
        for key in ("modes", "variant_modes"):
            modes = getattr(self, key)
            if [m for m in modes if m not in MODES] or (key == "modes" and not modes):
                raise ConfigError(f"study.{key} must be a list of {', '.join(MODES)}; got {modes}")
        bad = {t: m for t, m in self.metrics.items() if t not in self.tasks or m not in METRICS}
        if bad:
            raise ConfigError(f"study.metrics maps a task of study.tasks to one of {', '.join(METRICS)}; "
                             f"got {bad} with tasks {self.tasks}")
        if bool(self.variant_emulator) != bool(self.variant_modes):
            raise ConfigError("study.variant_emulator and study.variant_modes go together: name the emulator "
                             "and the extra fine-tuning modes to train it with")


@dataclass
class StudyConfig(PipelineSections):
    study: StudySection = field(default_factory=StudySection)


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


GRID_EXTENT = ("emulators", "study.tasks", "study.modes", "study.variant_emulator", "study.variant_modes",
               "study.metrics", "study.attack")
"""Config keys a resumed study may change: they add or relabel cells, never change a finished one."""


def run_study(config: StudyConfig, progress: bool = False, log=print, overwrite: bool = False) -> dict:
    """Run (or resume) the grid; writes ``summary.json``, ``summary.md`` and ``frontier.png``."""
    study = config.study
    out = open_run_dir(study.out, as_dict(config), overwrite, may_change=GRID_EXTENT)

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
                       "metrics": {t: study.metrics.get(t, METRICS[0]) for t in study.tasks},
                       "n_eval": study.eval_limit, "finetune": as_dict(config.finetune), "cells": cells}
            write_json(out / "summary.json", summary)
            (out / "summary.md").write_text(summary_markdown(summary))
            plot_frontier(summary, out / "frontier.png")
    return summary


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def _metrics(summary: dict) -> dict[str, str]:
    """Each task's summary metric (summaries written before ``[study] metrics`` existed: ``acc``)."""
    given = summary.get("metrics") or {}
    return {t: given.get(t, METRICS[0]) for t in summary["tasks"]}


def _standard_error(n: int, tasks: int = 1) -> float:
    """One standard error, in points, of an accuracy near 50 % averaged over ``tasks`` tasks of
    ``n`` items each (the worst case of sqrt(p (1 - p) / n))."""
    return 100 * (0.25 / n / tasks) ** 0.5


def _by_row(summary: dict) -> dict[tuple[str, str], dict[str, dict]]:
    """``{(emulator, mode): {task: cell}}``, sorted by mode then emulator."""
    table: dict[tuple[str, str], dict[str, dict]] = {}
    for c in summary["cells"]:
        table.setdefault((c["emulator"], c["mode"]), {})[c["task"]] = c
    return dict(sorted(table.items(), key=lambda item: (item[0][1], item[0][0])))


def common_tasks(summary: dict) -> list[str]:
    """The tasks every (emulator, mode) row has a cell for: averages over anything else would
    compare rows on different tasks."""
    rows = _by_row(summary).values()
    return [t for t in summary["tasks"] if rows and all(t in cells for cells in rows)]


def cell_scores(cell: dict, metric: str = "acc") -> tuple[float, float, float]:
    """``(plug-in, emulator fine-tuned, gap)`` of one cell, as fractions, in ``metric``."""
    plug_in = cell["rows"]["plug_in"][metric]
    emulator = cell["rows"]["emulator_finetune"][metric]
    return plug_in, emulator, plug_in - emulator


def summary_markdown(summary: dict) -> str:
    """Plug-in accuracy, emulator-FT accuracy and gap per (emulator, mode), per task and averaged
    over the tasks every row has."""
    tasks = summary["tasks"]
    metrics = _metrics(summary)
    common = common_tasks(summary)
    n = summary.get("n_eval")
    header = [f"{t} ({metrics[t]})" for t in tasks]
    lines = [f"# Study: {summary['model']}", "",
             "Per task: plug-in / emulator fine-tuned / gap, in % of the task's metric. Full rows are shared. "
             f"Average: over {', '.join(common) or 'no task every row has'}.",
             *([f"n = {n} items per task: one standard error of one accuracy near 50 % is "
                f"{_standard_error(n):.1f} points."] if n else []), "",
             "| emulator | mode | trainable | " + " | ".join(header) + " | average | build cost |",
             "|---|---|---|" + "---|" * (len(tasks) + 2)]
    for (name, mode), cells in _by_row(summary).items():
        scores = {t: cell_scores(c, metrics[t]) for t, c in cells.items()}
        parts = ["n/a" if t not in scores else
                 f"{100 * scores[t][0]:.1f} / {100 * scores[t][1]:.1f} / {100 * scores[t][2]:+.1f}" for t in tasks]
        avg = [_mean([scores[t][i] for t in common]) for i in range(3)]
        avg_text = f"{100 * avg[0]:.1f} / {100 * avg[1]:.1f} / {100 * avg[2]:+.1f}" if common else "n/a"
        cost = next((c.get("build_cost") for c in cells.values() if c.get("build_cost")), None)
        cost_text = "none" if not cost else f"{cost['kind']}: {cost['seconds']:.0f} s, {cost['tokens_forward_backward']:,} fb tokens"
        trainable = next(iter(cells.values()))["rows"]["emulator_finetune"].get("trainable_params")
        lines.append(f"| {name} | {mode} | {trainable or 0:,} | " + " | ".join(parts) + f" | {avg_text} | {cost_text} |")
    for row in ("full_zero_shot", "full_finetune"):
        values = {t: summary_row(summary, row, t) for t in tasks}
        known = [values[t] for t in common]
        avg_text = f"{100 * _mean(known):.1f}" if common and None not in known else ""
        lines.append(f"| *{row.replace('_', ' ')}* | | | " + " | ".join(
            "n/a" if v is None else f"{100 * v:.1f}" for v in values.values()) + f" | {avg_text} | |")
    return "\n".join(lines) + "\n"


def summary_row(summary: dict, row: str, task: str) -> float | None:
    """A shared full-model row (``full_zero_shot``/``full_finetune``) on one task, in its metric."""
    metric = _metrics(summary)[task]
    return next((c["rows"][row][metric] for c in summary["cells"] if c["task"] == task and row in c["rows"]), None)


def plot_frontier(summary: dict, path: Path) -> None:
    """Privacy-utility frontier: average plug-in accuracy vs average gap, one point per emulator
    and mode, averaged over the tasks every row has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _metrics(summary)
    common = common_tasks(summary)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for (name, mode), cells in _by_row(summary).items():
        scores = [cell_scores(cells[t], metrics[t]) for t in common]
        x = 100 * _mean([s[2] for s in scores])
        y = 100 * _mean([s[0] for s in scores])
        ax.scatter(x, y)
        ax.annotate(f"{name} ({mode})", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for row, style, label in (("full_finetune", "--", "full fine-tuning"), ("full_zero_shot", ":", "full zero-shot")):
        values = [summary_row(summary, row, t) for t in common]
        if common and None not in values:
            ax.axhline(100 * _mean(values), linestyle=style, color="grey", label=label)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    n = summary.get("n_eval")
    if n and common:
        # one standard error of a task-averaged accuracy near 50 %, so readers see what is noise
        ax.text(0.99, 0.99, f"n = {n} per task: 1 SE of an average = {_standard_error(n, len(common)):.1f} points",
                transform=ax.transAxes, fontsize=7, ha="right", va="top", color="grey")
    ax.set_xlabel("gap = plug-in - emulator fine-tuned (points; larger = more privacy)")
    ax.set_ylabel("plug-in accuracy (%)")
    names = ", ".join(f"{t} ({metrics[t]})" for t in common) or "no common task"
    ax.set_title(f"{summary['model']}, average over\n{names}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
