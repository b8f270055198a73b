"""The study's configuration: ``[study]``, one ``[[claim]]`` per claim, the offsite tables, and
the row families a claim may name (see :mod:`recipes.study` for the rows themselves)."""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaleot_fed.config import from_dict, load_toml
from scaleot_fed.errors import ConfigError
from scaleot_fed.files import file_name
from scaleot_fed.finetune import MODES
from scaleot_fed.single_owner import NamedEmulatorConfig
from scaleot_fed.tasks import ANCHOR_SPLITS, SPLITS

from ..offsite import PipelineConfig, read_pipeline_toml

METRICS = ("acc", "acc_norm")
ROWS = ("emulator_zero_shot", "emulator_finetune", "plug_in", "gap", "emulator_attack")
"""What a claim may name after ``<cell>/`` (``gap``: plug-in minus emulator fine-tuned, per item)."""
FEDERATED_ROWS = ("emulator_finetune", "plug_in", "gap")
"""A federation's rows (and its twin's), per seed and mode, like a cell's."""
OWNER_ROWS = ("worst_owner", "owner_mean")
"""A federation's per-owner rows: the plug-in on each owner's held-out items, its worst owner and
the owners' mean (decided with :func:`scaleot_fed.stats.group_bootstrap`)."""


@dataclass
class StudyGridConfig:
    """``[study]``: the grid's fixed part."""

    out: str = "runs/study"
    results: str | None = None
    """Folder for what is committed: ``summary.json``, ``REPORT.md``, the plots and ``items/``
    (default: the run folder)."""
    model: str = "smollm2-135m"
    tasks: list[str] = field(default_factory=lambda: ["piqa", "arc_easy", "openbookqa", "hellaswag"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    metric: str = "acc"
    """The primary metric, declared before running (OT's tables: lm-eval ``acc`` on every task);
    the other is reported beside it."""
    metrics: dict[str, str] = field(default_factory=dict)
    """Per-task exceptions to ``metric``."""
    modes: list[str] = field(default_factory=lambda: ["lora"])
    mode_lrs: dict[str, float] = field(default_factory=dict)
    """The learning rate of each mode's cells (a mode not named here trains at ``[finetune] lr``):
    declared in the config, after the mode's sweep, before any of its cells runs."""
    mode_sweeps: dict[str, list[float]] = field(default_factory=dict)
    """Per mode, the learning rates tried before its cells: the ``sweep_emulator`` trained in the mode
    on ``sweep_task`` at the first seed, judged by dev loss alone (the lowest wins; the evaluation
    items are never scored). Cells of a swept mode wait until ``mode_lrs`` names the winner."""
    mode_tasks: dict[str, list[str]] = field(default_factory=dict)
    """Per mode after the first, the tasks its cells run on (default: every task; the first mode
    always runs on every task). Its claims over tasks pool these tasks only."""
    sweep_task: str | None = None
    """The task of the mode sweeps (default: the first of ``tasks``)."""
    sweep_emulator: str | None = None
    """The ``[[emulator]]`` (by name) trained in the mode sweeps (default: the first)."""
    train_limit: int | None = 2000
    dev_items: int = 64
    eval_limit: int | None = None
    """Evaluation items per task (None: the whole evaluation split)."""
    added_tasks: list[str] = field(default_factory=list)
    """Tasks of ``tasks`` added after the study's first row: every claim over tasks is also
    decided without them (the list declared before running is the study's; an addition is shown
    beside it, never silently folded in)."""
    eval_split: str = "validation"
    """The split every task is scored on: ``validation``, ``test``, or ``anchor``: the split lm-eval
    scores the task on (:data:`scaleot_fed.tasks.ANCHOR_SPLITS`: ARC's and OpenBookQA's labelled
    test splits, PIQA's and HellaSwag's validation), so rows sit beside the published tables."""
    eval_splits: dict[str, str] = field(default_factory=dict)
    """Per-task exceptions to ``eval_split``."""
    eval_limits: dict[str, int] = field(default_factory=dict)
    """Per-task exceptions to ``eval_limit`` (e.g. ``{ hellaswag = 2000 }``)."""
    random_subsets: list[str] = field(default_factory=list)
    """Tasks whose ``train_limit`` / eval limit keep a fixed pseudo-random subset, the same in every
    cell (:mod:`recipes.study.data`), instead of the first items: for files ordered by source
    (HellaSwag's first 2,000 validation items are all ActivityNet, none WikiHow)."""
    eval_batch_size: int = 16
    full_finetune_lrs: list[float] = field(default_factory=list)
    """Full-parameter fine-tuning of the whole model, swept over these learning rates (empty: no
    full fine-tuning row)."""
    variant_emulator: str | None = None
    """The PEFT comparison: the ``[[emulator]]`` (by name) that is also trained with ``variant_modes``."""
    variant_modes: list[str] = field(default_factory=list)
    attack_emulator: str | None = None
    """The ``[[emulator]]`` attacked: a data owner fine-tunes every weight of it (``[attack]``)."""
    attack_lrs: list[float] = field(default_factory=list)
    federated: str | None = None
    """A simulation config (``simulations/configs/...``) run once per seed on its ``[run] task``
    with the ``[[emulator]]`` its ``[emulator] name`` names: the rows ``federated/...`` and, on the
    same owners' pooled data trained centrally, ``centralised/...`` (:mod:`recipes.study.federated`)."""
    resamples: int = 10_000
    """Bootstrap resamples per confidence interval."""
    rebuilt_differently: str = "refuse"
    """What a resumed study does when a build it lost with the run folder (a seed's stage 1, a trained
    emulator) comes out different when rebuilt from its seed (another CPU, torch or code):
    ``refuse`` (the error names what to delete to make it all again), or ``accept``: the units still
    to run use the new build, and the ledger keeps the old build's record with the rows made from
    it (``ledger/earlier_builds/``, listed in the report). Seeds stay paired: where a seed's two
    sides come from two builds, pairing by seed stays valid (for independent sides it targets the
    variance the unpaired interval does), only less tight."""

    def __post_init__(self) -> None:
        self._check_grid()
        self._check_items()
        self._check_rates()

    def _check_grid(self) -> None:
        """Tasks, seeds, modes and metrics: what the grid is made of."""
        if not self.tasks or not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"study.tasks and study.seeds must be non-empty, seeds distinct; got {self.tasks}, {self.seeds}")
        for name in ("dev_items", "eval_batch_size", "train_limit", "eval_limit", "resamples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"study.{name} must be >= 1, got {getattr(self, name)}")
        for key in ("modes", "variant_modes"):
            modes = getattr(self, key)
            if [m for m in modes if m not in MODES] or (key == "modes" and not modes):
                raise ConfigError(f"study.{key} must be a list of {', '.join(MODES)}; got {modes}")
        bad = {t: m for t, m in self.metrics.items() if t not in self.tasks or m not in METRICS}
        if self.metric not in METRICS or bad:
            raise ConfigError(f"study.metric is one of {', '.join(METRICS)} and study.metrics maps a task of "
                              f"study.tasks to one; got {self.metric!r}, {bad} with tasks {self.tasks}")
        folders = [task_folder(t) for t in self.tasks]
        if len(set(folders)) != len(folders) or set(folders) & set(RUN_FOLDER_NAMES):
            raise ConfigError(f"study.tasks {self.tasks} would share a folder, or take one the run folder uses "
                              f"({', '.join(RUN_FOLDER_NAMES)}), as {folders}; name each task's file differently")
        if self.rebuilt_differently not in ("refuse", "accept"):
            raise ConfigError(f"study.rebuilt_differently is \"refuse\" or \"accept\", got {self.rebuilt_differently!r}")
        if bool(self.variant_emulator) != bool(self.variant_modes):
            raise ConfigError("study.variant_emulator and study.variant_modes go together: name the emulator "
                              "and the extra fine-tuning modes to train it with")

    def _check_items(self) -> None:
        """Which items each task is scored and trained on."""
        if [t for t in self.eval_limits if t not in self.tasks] or [n for n in self.eval_limits.values() if n < 1]:
            raise ConfigError(f"study.eval_limits maps tasks of study.tasks to counts >= 1, got {self.eval_limits}")
        if [t for t in self.random_subsets if t not in self.tasks]:
            raise ConfigError(f"study.random_subsets names tasks of study.tasks, got {self.random_subsets}")
        if [t for t in self.added_tasks if t not in self.tasks]:
            raise ConfigError(f"study.added_tasks names tasks of study.tasks, got {self.added_tasks}")
        if self.eval_split not in (*SPLITS[1:], "anchor") or [t for t, v in self.eval_splits.items()
                                                               if t not in self.tasks or v not in SPLITS[1:]]:
            raise ConfigError(f"study.eval_split is validation, test or anchor, and study.eval_splits maps tasks of "
                              f"study.tasks to validation or test; got {self.eval_split!r}, {self.eval_splits}")

    def _check_rates(self) -> None:
        """The learning rates: swept, declared, the attacker's."""
        if [lr for lr in self.full_finetune_lrs + self.attack_lrs if lr <= 0]:
            raise ConfigError("study.full_finetune_lrs and study.attack_lrs must be positive learning rates")
        for key in ("mode_lrs", "mode_sweeps"):
            if [m for m in getattr(self, key) if m not in self.modes + self.variant_modes]:
                raise ConfigError(f"study.{key} names modes of study.modes / variant_modes ({self.modes + self.variant_modes}); "
                                  f"got {sorted(getattr(self, key))}")
        if [r for r in self.mode_lrs.values() if r <= 0] or [s for s in self.mode_sweeps.values()
                                                             if len(s) < 2 or min(s) <= 0]:
            raise ConfigError(f"study.mode_lrs are positive rates and each of study.mode_sweeps lists two or more; got "
                              f"{self.mode_lrs}, {self.mode_sweeps}")
        if self.sweep_task is not None and self.sweep_task not in self.tasks:
            raise ConfigError(f"study.sweep_task = {self.sweep_task!r} is not one of study.tasks {self.tasks}")
        swept_on = self.sweep_task or self.tasks[0]
        if [m for m, tasks in self.mode_tasks.items() if m not in self.modes[1:] + self.variant_modes or not tasks
                or [t for t in tasks if t not in self.tasks] or (m in self.mode_sweeps and swept_on not in tasks)]:
            raise ConfigError(f"study.mode_tasks maps modes after the first ({self.modes[1:] + self.variant_modes}) to "
                              f"non-empty lists of study.tasks, a swept mode's including the sweep task "
                              f"{swept_on!r}; got {self.mode_tasks}")
        if bool(self.attack_emulator) != bool(self.attack_lrs):
            raise ConfigError("study.attack_emulator and study.attack_lrs go together: name the emulator to "
                              "attack and the attacker's learning rates (three or more to find the strongest)")

    def tasks_of(self, mode: str | None) -> list[str]:
        """The tasks ``mode``'s cells run on (``None``: rows of no mode, on every task)."""
        return self.mode_tasks.get(mode, self.tasks) if mode is not None else self.tasks

    def metric_of(self, task: str) -> str:
        return self.metrics.get(task, self.metric)

    def eval_limit_of(self, task: str) -> int | None:
        return self.eval_limits.get(task, self.eval_limit)

    def eval_split_of(self, task: str) -> str:
        """The split ``task`` is scored on (``anchor``: lm-eval's; a user file: its only split)."""
        split = self.eval_splits.get(task, self.eval_split)
        return ANCHOR_SPLITS.get(task, "validation") if split == "anchor" else split


@dataclass
class FederationConfig:
    """One ``[[federation]]``: a Flower + Ray simulation config run at every seed with the study's
    emulator, seed, evaluation items and the owners' mode and rate (``[study] modes``), on each of
    ``tasks``; its rows are ``<name>/seed<s>/{emulator_finetune,plug_in}`` (like a cell's), and
    ``<name>/worst_owner``, ``<name>/owner_mean`` over the owners' held-out items."""

    name: str = ""
    config: str = ""
    """The simulation TOML (``simulations/configs/...``) its runs start from."""
    set: dict[str, Any] = field(default_factory=dict)
    """Tables of that config replaced key by key: ``{ strategy = { name = "fedprox", params =
    { proximal_mu = 0.01 } }, partition = { kind = "iid" } }``."""
    tasks: list[str] = field(default_factory=list)
    """Tasks of the study it is scored on (default: its ``[run] task``). A mixture task
    (``"arc_easy+piqa"``, owners holding different tasks) runs once per seed and is scored on each
    of these; a single task's config runs once per task."""
    centralised: str | None = None
    """The rows' name of the same owners' pooled data trained centrally for as many steps (None: no
    such twin)."""
    folder: str | None = None
    """Its runs' folder in a task's run folder (default ``federations/<name>``)."""

    def __post_init__(self) -> None:
        if not self.name or not self.config or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"every [[federation]] needs a name (letters, digits, _ . -) and a config (a simulation "
                              f"TOML); got name {self.name!r}, config {self.config!r}")
        if self.centralised is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.centralised):
            raise ConfigError(f"[[federation]] {self.name}: centralised names its twin's rows (letters, digits, _ . -)")


@dataclass
class FederationGridConfig:
    """``[federations]``: one ``[[federation]]`` per strategy x partition (x owners setting), each
    named ``<strategy>-<partition>[-<owners>]``, all on the same config, tasks, seeds and data."""

    config: str = ""
    tasks: list[str] = field(default_factory=list)
    strategies: dict[str, Any] = field(default_factory=dict)
    """Name -> the tables it sets (``{ fedprox = { strategy = { name = "fedprox" } } }``)."""
    partitions: dict[str, Any] = field(default_factory=dict)
    owners: dict[str, Any] = field(default_factory=dict)
    """Optional third axis (``[owners]`` settings, or any other tables)."""
    centralised: bool = False
    """A pooled-data twin per partition (``centralised-<partition>``), run beside its first strategy."""

    def expand(self) -> list[FederationConfig]:
        axes = [self.strategies, self.partitions] + ([self.owners] if self.owners else [])
        bad = [name for axis in axes for name, value in axis.items() if not isinstance(value, dict)]
        if not self.config or not self.strategies or not self.partitions or bad:
            raise ConfigError("[federations] needs config, and strategies and partitions as tables of named tables "
                              f"(each the config tables it sets){'; not tables: ' + ', '.join(bad) if bad else ''}")
        found = []
        for combo in itertools.product(*(axis.items() for axis in axes)):
            sets: dict[str, Any] = {}
            for _, value in combo:
                sets = merge_tables(sets, value)
            first = combo[0][0] == next(iter(self.strategies))
            found.append(FederationConfig(name="-".join(name for name, _ in combo), config=self.config, set=sets,
                                          tasks=list(self.tasks), centralised=f"centralised-{'-'.join(n for n, _ in combo[1:])}"
                                          if self.centralised and first else None))
        return found


def merge_tables(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, table by table (a value that is not a table replaces)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge_tables(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class ClaimConfig:
    """One ``[[claim]]``: "``a`` beats ``b``" (``greater``) or "``a`` is within ``margin`` of
    ``b``" (``close``), rows named as in the module docstring without the seed and learning rate
    (``full_finetune``, ``scaleot/plug_in``, ``scaleot/gap``). Declared before running."""

    claim: str = ""
    a: str = ""
    b: str = ""
    kind: str = "greater"
    margin: float = 0.0
    """For ``close``: the largest difference (a fraction, 0.02 = 2 points) still called close."""
    mode: str | None = None
    """Set by the study, not the config: the mode a claim over cells was expanded to (with several
    ``[study] modes``, a claim is decided once per mode, its cells in that mode)."""

    def __post_init__(self) -> None:
        if not (self.claim and self.a and self.b):
            raise ConfigError("every [[claim]] needs claim (the sentence), a and b (the rows compared)")
        if self.kind not in ("greater", "close") or (self.kind == "close") != (self.margin > 0):
            raise ConfigError(f"[[claim]] {self.claim!r}: kind is 'greater', or 'close' with a margin > 0; "
                              f"got kind {self.kind!r}, margin {self.margin}")


@dataclass
class StudyConfig(PipelineConfig):
    study: StudyGridConfig = field(default_factory=StudyGridConfig)
    claims: list[ClaimConfig] = field(default_factory=list)
    federations: list[FederationConfig] = field(default_factory=list)
    """``[[federation]]`` and ``[federations]``, and ``[study] federated`` as the federation
    ``federated`` (its twin ``centralised``, its runs in ``<task>/federated``)."""

    def __post_init__(self) -> None:
        if self.study.federated and not any(f.name == "federated" for f in self.federations):
            self.federations.insert(0, FederationConfig(name="federated", config=self.study.federated,
                                                        centralised="centralised", folder="federated"))
        names = [n for f in self.federations for n in (f.name, f.centralised) if n]
        taken = {e.name for e in self.emulators} | {"full_zero_shot", "full_finetune", "sweep"}
        if len(set(names)) != len(names) or set(names) & taken:
            raise ConfigError(f"federation rows' names must be distinct and not an emulator's or a fixed row's "
                              f"({', '.join(sorted(taken))}); got {names}")

    def cells(self) -> list[tuple[NamedEmulatorConfig, str]]:
        """``(emulator, mode)`` pairs: every emulator in the main modes, the variant in its own."""
        s = self.study
        return [(e, m) for e in self.emulators
                for m in s.modes + ([m for m in s.variant_modes if m not in s.modes] if e.name == s.variant_emulator else [])]

    def cell_name(self, emulator: NamedEmulatorConfig, mode: str) -> str:
        return emulator.name if mode == self.study.modes[0] else f"{emulator.name}:{mode}"


def load_study_config(path: str | Path) -> StudyConfig:
    """Read a study TOML file: ``[study]``, the offsite tables (at least one ``[[emulator]]``) and
    the ``[[claim]]`` tables; every claim's rows must exist in the grid."""
    values = read_pipeline_toml(path, "study", StudyGridConfig, default_emulator=False,
                                extra=("claim", "federation", "federations"))
    data = load_toml(path)
    claims, federations = data.get("claim", []), data.get("federation", [])
    if not isinstance(claims, list) or not isinstance(federations, list):
        raise ConfigError(f"{path}: write each claim as a [[claim]] table, each federation as a [[federation]] table")
    federations = [from_dict(FederationConfig, f, f"federation {i}") for i, f in enumerate(federations)]
    if "federations" in data:
        federations += from_dict(FederationGridConfig, data["federations"], "federations").expand()
    config = StudyConfig(**values, claims=[from_dict(ClaimConfig, c, f"claim {i}") for i, c in enumerate(claims)],
                         federations=federations)
    if [c for c in config.claims if c.mode is not None]:
        raise ConfigError(f"{path}: [[claim]] mode is set by the study (one claim per mode); remove it")
    names = [e.name for e in config.emulators]
    given = [e.name for e in config.emulators if e.path or e.importance]
    if given:
        raise ConfigError(f"{path}: the study builds every emulator itself, once per seed where stage 1 or the "
                          f"distillation is random; remove path / importance from {given}")
    for key in ("variant_emulator", "attack_emulator", "sweep_emulator"):
        if getattr(config.study, key) and getattr(config.study, key) not in names:
            raise ConfigError(f"{path}: study.{key} = {getattr(config.study, key)!r} is not one of the "
                              f"[[emulator]] names {names}")
    known = row_families(config)
    for claim in config.claims:
        for side in (claim.a, claim.b):
            if side not in known:
                raise ConfigError(f"{path}: [[claim]] {claim.claim!r} names {side!r}, not a row of this grid; "
                                  f"rows: {', '.join(sorted(known))}")
        kinds = {side.rsplit("/", 1)[-1] for side in (claim.a, claim.b)}
        if kinds & set(OWNER_ROWS) and len(kinds) > 1:
            raise ConfigError(f"{path}: [[claim]] {claim.claim!r} compares {claim.a!r} with {claim.b!r}: an owner row "
                              f"({', '.join(OWNER_ROWS)}) is compared with the same owner row of another federation")
    config.claims = [c for claim in config.claims for c in per_mode(config, claim)]
    return config


MODE_ROWS = ("emulator_finetune", "plug_in", "gap") + OWNER_ROWS
"""A cell's (or federation's) rows that depend on its mode (its zero-shot and the attack do not)."""


def per_mode(config: StudyConfig, claim: ClaimConfig) -> list[ClaimConfig]:
    """``claim`` once per mode of ``[study] modes`` when it names a cell's trained rows
    (``<emulator>/plug_in`` is the first mode's cell; ``<emulator>:<mode>/plug_in`` the others'),
    each with its ``mode`` set; as it is otherwise (only the first mode's cells, or none)."""
    names, modes = {e.name for e in config.emulators} | set(federation_sides(config)), config.study.modes
    def in_mode(side: str, mode: str) -> str:
        cell, _, row = side.rpartition("/")
        return f"{cell}:{mode}/{row}" if cell in names and row in MODE_ROWS and mode != modes[0] else side

    if not any(in_mode(side, m) != side for side in (claim.a, claim.b) for m in modes):
        return [claim]
    return [dataclasses.replace(claim, a=in_mode(claim.a, m), b=in_mode(claim.b, m), mode=m) for m in modes]


def row_families(config: StudyConfig) -> set[str]:
    """The rows a claim may name: a row over its seeds (and, for swept rows, the chosen rate)."""
    rows = {"full_zero_shot"} | ({"full_finetune"} if config.study.full_finetune_lrs else set())
    for emulator, mode in config.cells():
        rows |= {f"{config.cell_name(emulator, mode)}/{r}" for r in ROWS if r != "emulator_attack"}
    if config.study.attack_emulator:
        rows.add(f"{config.study.attack_emulator}/emulator_attack")
    for federation in config.federations:
        for m in config.study.modes:
            suffix = "" if m == config.study.modes[0] else f":{m}"
            rows |= {f"{federation.name}{suffix}/{r}" for r in FEDERATED_ROWS + OWNER_ROWS}
            rows |= {f"{federation.centralised}{suffix}/{r}" for r in FEDERATED_ROWS if federation.centralised}
    return rows


def federation_sides(config: StudyConfig) -> list[str]:
    """The names of the federations' rows and their twins'."""
    return [n for f in config.federations for n in (f.name, f.centralised) if n]


def chosen_rate(rows, name: str, lrs: list[float], seed: int, attack: bool) -> float | None:
    """The sweep's choice at the first seed: the rate with the lowest dev loss (ties: the lower
    rate), for fine-tuning and for the attack alike. Never a score on the evaluation items: that
    would select on the items the claims are decided on (for the attack, the strongest attacker
    by dev loss, the loss its own data owner can see). ``rows``: a :class:`scaleot_fed.rundir.RowCache`,
    or anything with its ``get``. ``None`` while a rate of the sweep is missing."""
    return lowest_dev_loss({lr: rows.get(f"{name}/lr{lr:g}/seed{seed}/" + ("emulator_attack" if attack else "row"))
                            for lr in lrs})


def lowest_dev_loss(found: dict[float, dict | None]) -> float | None:
    """The rate whose row has the lowest dev loss (ties: the lower rate); ``None`` while a rate's
    row is missing. Every sweep of the study chooses this way."""
    if not found or any(v is None for v in found.values()):
        return None
    return min(found, key=lambda lr: (found[lr]["best_dev_loss"], lr))


def mode_sweep_rows(rows, mode: str, lrs: list[float], seed: int) -> dict[float, dict | None]:
    """A mode sweep's rows by rate (None where not run yet)."""
    return {lr: rows.get(sweep_key(mode, lr, seed)) for lr in lrs}


def sweep_key(mode: str, lr: float, seed: int) -> str:
    """The row of a mode sweep's run at ``lr`` (dev loss only, no scoring)."""
    return f"sweep/{mode}/lr{lr:g}/seed{seed}/row"


GRID_EXTENT = ("emulators", "claims", "federations", "study.out", "study.results", "study.resamples", "study.tasks", "study.seeds", "study.modes",
               "study.variant_emulator", "study.variant_modes", "study.metric", "study.metrics",
               "study.mode_lrs", "study.mode_sweeps", "study.mode_tasks", "study.sweep_task", "study.sweep_emulator", "study.added_tasks",
               "study.full_finetune_lrs", "study.attack_emulator", "study.attack_lrs", "study.federated",
               "layer_replace.ranking_candidates", "layer_replace.ranking_batches", "tracking",
               "study.rebuilt_differently")
"""Config keys a resumed study may change: they add or relabel cells, never change a finished one
(the ranking's settings re-rank saved stage-1 runs, refused once emulators were built from them)."""


RUN_FOLDER_NAMES = ("stage1", "emulators", "config.json", "units.jsonl")
"""What the run folder holds beside its tasks' folders."""


def task_folder(task: str) -> str:
    """The folder name of a task's rows and items (in the run folder and in ``items/``): a built-in
    task's (or mixture's) name as it is; a file given by path, that path made one name
    (``data/mine.jsonl`` -> ``data_mine.jsonl``), so it stays inside the study's folders; a long
    one, its end and a hash of the whole (:func:`scaleot_fed.files.file_name`)."""
    return file_name(task, "task")


def seeded(section: NamedEmulatorConfig) -> bool:
    """Whether building the emulator draws random numbers (stage 1, distillation)."""
    return section.needs_importance or section.distill


def zero_shot_key(section: NamedEmulatorConfig, seed: int) -> str:
    """The row of the emulator's zero-shot at ``seed``: one per seed where building it draws
    random numbers, else one for every seed."""
    return f"{section.name}/seed{seed}/emulator_zero_shot" if seeded(section) else f"{section.name}/emulator_zero_shot"
