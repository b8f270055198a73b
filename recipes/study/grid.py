"""The study's grid: the offsite pipeline over emulators x tasks x fine-tuning modes x seeds.

The grid is a list of units (a stage-1 run, an emulator build, a training run, a scoring), each
cached on disk as soon as it is done, so a stopped study continues where it was; a progress bar
over the units' estimated cost gives the ETA. Every scoring keeps per-item log-likelihoods
(``items/``), so any metric can be recomputed without rerunning. The seed governs everything
random in a cell: stage 1 and the distillation of the seed-dependent emulators, the fine-tuning.

Rows, per task (keys of the task's row cache):

* ``full_zero_shot``;
* ``full_finetune/lr<lr>/seed<s>``: full-parameter fine-tuning of every block; the first seed at
  each learning rate of the sweep, the other seeds at the one with the lowest dev loss;
* ``<emulator>[/seed<s>]/emulator_zero_shot`` (per seed when the emulator depends on it);
* ``<cell>/seed<s>/emulator_finetune`` and ``.../plug_in``, a cell being an emulator in a mode;
* ``<emulator>/attack/lr<lr>/seed<s>/emulator_attack``: every emulator weight trained; the first
  seed at each learning rate, the other seeds at the strongest (the lowest dev loss);
* ``sweep/<mode>/lr<lr>/seed<s>/row`` (``[study] mode_sweeps``, on the sweep task only): a mode's
  learning rates tried on the sweep emulator, judged by dev loss alone (no item is scored); the
  mode's cells wait until ``[study] mode_lrs`` declares the rate;
* ``<federation>/seed<s>/...`` (and its twin's) per ``[[federation]]`` / ``[federations]``,
  ``federated/...`` and ``centralised/...`` for ``[study] federated`` (:mod:`recipes.study.federated`,
  given to :func:`recipes.study.run.run_study` by the CLI).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scaleot_fed.artifact import load_artifact, save_artifact
from scaleot_fed.emulator import load_emulator
from scaleot_fed.errors import ConfigError
from scaleot_fed.layer_replace import LayerReplaceConfig, run_layer_replace
from scaleot_fed.models import load_model
from scaleot_fed.rerank import rerank, rerank_changes
from scaleot_fed.rundir import RowCache, cached_rows
from scaleot_fed.single_owner import NamedEmulatorConfig, SingleOwner, prepare_emulator, trained_path
from scaleot_fed.text import lambada_passages, token_blocks

from . import ledger
from .config import (
    StudyConfig,
    chosen_rate,
    lowest_dev_loss,
    mode_sweep_rows,
    seeded,
    sweep_key,
    task_folder,
    zero_shot_key,
)
from .costs import emulator_blocks, eta_line, model_facts, task_tokens
from .data import task_items


@dataclass
class Unit:
    """One cached piece of the grid: ``done()`` says whether it is on disk, ``run()`` makes it."""

    label: str
    cost: float
    """Estimated block-token passes (for the ETA: the bar's rate is measured in them)."""
    done: Callable[[], bool]
    run: Callable[[], object]
    needs: tuple[NamedEmulatorConfig, int] | None = None
    """The emulator (section, seed) it builds if that is not on disk (its build is charged once)."""
    resumed: Callable[[], float] = lambda: 0.0
    """After ``run()``: the seconds of its training and scoring done by earlier processes (resumed)."""
    waits: Callable[[], str | None] = lambda: None
    """Why it cannot run yet (a decision the config must declare first), or None: it can."""
    seed: int | None = None
    """The seed it runs at (None: a row no seed changes, the full model's zero-shot)."""
    charged: float = 0.0
    """The part of ``cost`` that is a build it pays for the ETA (charged once per build)."""
    build: Callable[[], float] = lambda: 0.0
    """What it must build first, now (a distillation, a stage 1 not on disk), in block-token passes;
    0 once its builds are on disk (:class:`recipes.study.schedule.Schedule` weighs it)."""
    makes: Path | None = None
    """The stage-1 folder this unit builds (a stage-1 unit), else None."""
    uses: Path | None = None
    """The stage-1 folder the emulator it runs on is built from, else None."""


class Grid:
    """The study's units over one loaded full model, in the order they run (:meth:`ordered`): seed
    by seed, so every comparison exists on every task at the first seed before the next starts, and
    in a seed the units of one emulator together, across tasks; a seed's stage 1 runs just before
    the first unit built from it. A session without the run folder rebuilds a seed's stage 1 and
    emulators once for all the tasks it reaches, reaches few seeds, and loses no stage 1 it has not
    used yet. A run may take the pending units in another order (:mod:`recipes.study.schedule`)."""

    def __init__(self, config: StudyConfig, out: Path, full, tokenizer, log, federations=(),
                 records: Path | None = None) -> None:
        self.config, self.out, self.full, self.tokenizer, self.log = config, out, full, tokenizer, log
        self.federations, self.records = list(federations or ()), records
        self.layers = int(full.config.num_hidden_layers)
        facts = model_facts(full)  # the LM head in blocks: a 262k-token head costs Gemma-3-270M 30 of them
        self.head_blocks = facts["head_params"] / facts["block_params"]
        self._pristine: dict[Path, object] = {}
        self._costed: set[Path] = set()  # emulators, stage-1 runs whose build an earlier unit's cost holds
        self._items: dict[str, tuple] = {}  # (train, dev, evaluation) per task, read once

    # -- shared artefacts: stage 1 and emulators ------------------------------------------------
    def stage1_dir(self, section: NamedEmulatorConfig, seed: int) -> Path:
        return self.out / "stage1" / f"na{section.num_adapter_layers}-a{section.alpha}" / f"seed{seed}"

    def stage1_config(self, section: NamedEmulatorConfig, seed: int) -> LayerReplaceConfig:
        return dataclasses.replace(self.config.layer_replace, num_adapter_layers=section.num_adapter_layers,
                                   alpha=section.alpha, seed=seed)

    def stage1(self, section: NamedEmulatorConfig, seed: int) -> Path:
        path, stage1_cfg = self.stage1_dir(section, seed), self.stage1_config(section, seed)
        meta = path / "layer_replace.json"
        if meta.exists():
            self.check_rebuild(path, seed)
            artifact = load_artifact(path)  # read once: its record and its source check
            if not (changes := self.ranking_changes(path, artifact.meta, stage1_cfg, seed)):
                artifact.check_matches(self.full)  # (a rerank checks it itself)
            else:  # only the ranking's settings: measured again with the trained harmonizers
                self.log(f"study: stage 1 seed {seed}: ranking again ({', '.join(changes)} changed)")
                save_artifact(rerank(self.full, self.stage1_text(stage1_cfg), artifact, stage1_cfg), path)
            return path
        if self.records and (recorded := ledger.stage1_record(self.records, meta)).is_file():
            self.ranking_changes(path, json.loads(recorded.read_text()), stage1_cfg, seed)  # refused before the run, not after
        self.log(f"study: stage 1 ({stage1_cfg.steps} steps) seed {seed} for N_a={stage1_cfg.num_adapter_layers}, alpha={stage1_cfg.alpha}")
        save_artifact(run_layer_replace(self.full, self.stage1_text(stage1_cfg), stage1_cfg, self.config.study.model, progress=False), path)
        if self.check_rebuild(path, seed):
            self.log(f"study: stage 1 seed {seed} rebuilt: the same run as the one the study's rows were made with")
        return path

    def ranking_changes(self, path: Path, meta: dict, stage1_cfg: LayerReplaceConfig, seed: int) -> list[str]:
        """The ranking settings ``stage1_cfg`` changes against stage 1's record ``meta`` (its run folder's or
        the ledger's); refused when it changes more, or when an emulator was built from the ranking."""
        changes = rerank_changes(meta, stage1_cfg)
        if changes is None or meta.get("data", "lambada") != "lambada":
            raise ConfigError(f"{path} was trained with another [layer_replace] config or text; delete it to "
                              "retrain, or restore the config it was made with")
        users = self.users(path, seed)
        if changes and any((m := self.emulator_dir(e, seed) / "manifest.json").exists()
                           or (self.records and ledger.emulator_record(self.records, m).is_file()) for e in users):
            raise ConfigError(f"{path}: {', '.join(changes)} changed, but emulators were built from its ranking; restore "
                              f"the ranking settings, or delete {self.made_from(users, seed)} to rebuild")
        return changes

    def check_rebuild(self, path: Path, seed: int) -> bool:
        """Whether the ledger records the stage-1 run at ``path`` (:meth:`checked_rebuild`)."""
        meta = path / "layer_replace.json"
        return bool(self.records) and self.checked_rebuild(ledger.stage1_record(self.records, meta), meta,
                                                           ledger.same_stage1, self.users(path, seed), seed)

    def checked_rebuild(self, record: Path, current: Path, same, sections: list[NamedEmulatorConfig], seed: int) -> bool:
        """:func:`recipes.study.ledger.check_rebuild` of the build ``current`` that ``sections`` at
        ``seed`` are made from; a build that came out different is refused, or (``[study]
        rebuilt_differently = "accept"``) used from here on, its predecessor's record set aside with
        the rows made from it (False: the ledger records it no longer)."""
        try:
            return ledger.check_rebuild(record, current, same, self.made_from(sections, seed))
        except ledger.RebuildDiffers:
            if self.config.study.rebuilt_differently != "accept":
                raise
        rows = [p for e in sections for g in self.row_globs(e, seed) for p in sorted(self.records.parent.glob(g))]
        kept = ledger.set_aside(self.records, record, current, rows)
        self.log(f"study: {current.parent} came out different when rebuilt from its seed (another torch, CPU or "
                 f"code); [study] rebuilt_differently = \"accept\": the units still to run use the new build, the "
                 f"rows made from the old one keep it ({kept})")
        return False

    def users(self, path: Path, seed: int) -> list[NamedEmulatorConfig]:  # the emulators built from that stage 1
        return [e for e in self.config.emulators if e.needs_importance and self.stage1_dir(e, seed) == path]

    def row_globs(self, section: NamedEmulatorConfig, seed: int) -> list[str]:
        """The rows made from ``section``'s emulator at ``seed`` (:func:`recipes.study.ledger.row_globs`),
        the federations' trained on it (each federation's, its twin's) included."""
        sides = [n for f in self.federations if f.emulator == section.name for n in (f.name, f.spec.centralised) if n]
        return ledger.row_globs(section.name, seed if seeded(section) else None, sides)

    def made_from(self, sections: list[NamedEmulatorConfig], seed: int) -> str:
        """What the study made from these emulators at ``seed``: their folders, ledger records and rows."""
        records = self.records or Path("<results>/ledger")
        return "; ".join(f"{(d := self.emulator_dir(e, seed)).parent}, {ledger.emulator_record(records, d / 'manifest.json')}, "
                         + ", ".join(self.row_globs(e, seed)) for e in sections)

    def stage1_text(self, stage1_cfg: LayerReplaceConfig):
        return token_blocks(self.tokenizer, lambada_passages(), stage1_cfg.block_size, max_blocks=stage1_cfg.blocks_needed())

    def stage1_current(self, section: NamedEmulatorConfig, seed: int) -> bool:
        """Whether the seed's stage 1 is on disk, or recorded in the ledger (its weights rebuilt when
        an emulator needs them), with the config's ranking settings."""
        path = self.stage1_dir(section, seed)
        recorded = ledger.stage1_record(self.records, path / "layer_replace.json") if self.records else None
        meta = next((p for p in (path / "layer_replace.json", recorded) if p and p.exists()), None)
        return meta is not None and rerank_changes(json.loads(meta.read_text()), self.stage1_config(section, seed)) == []

    def emulator_dir(self, section: NamedEmulatorConfig, seed: int) -> Path:
        return self.out / "emulators" / (f"seed{seed}" if seeded(section) else "shared") / section.name / "emulator"

    def emulator(self, section: NamedEmulatorConfig, seed: int):
        """A fresh copy of the emulator (built on first use; the last two read kept in memory: training
        wraps the model in place); a rebuild must have the weights the ledger records."""
        edir = self.emulator_dir(section, seed)
        if edir not in self._pristine:
            built = not (edir / "manifest.json").exists()
            if built:
                importance = str(self.stage1(section, seed)) if section.needs_importance else None
                prepare_emulator(dataclasses.replace(section, importance=importance), self.full, self.tokenizer,
                                 self.config.layer_replace, self.config.study.model, edir.parent.parent, self.log,
                                 dataclasses.replace(self.config.distill, seed=seed))
            manifest = edir / "manifest.json"
            if self.records and self.checked_rebuild(ledger.emulator_record(self.records, manifest), manifest,
                                                     ledger.same_weights, [section], seed) and built:
                self.log(f"study: {edir.parent.name} ({edir.parent.parent.name}) rebuilt: the same weights as the "
                         "build the study's rows were made with")
            self._pristine = dict(list(self._pristine.items())[-1:]) | {edir: load_emulator(edir)}
        pristine = self._pristine[edir]
        return dataclasses.replace(pristine, model=copy.deepcopy(pristine.model))

    def sweep_units(self) -> list[Unit]:
        """The mode sweeps (``[study] mode_sweeps``): first of all, since the cells of a swept mode
        wait for the rate the config declares after them."""
        study, config = self.config.study, self.config
        if not study.mode_sweeps:
            return []
        task, seed = study.sweep_task or study.tasks[0], study.seeds[0]
        section = next(e for e in config.emulators if e.name == (study.sweep_emulator or config.emulators[0].name))
        rows, blocks = RowCache(self.out / task_folder(task)), emulator_blocks(self.layers, section)
        # (the dev loss runs on the gold answers; the dev items' scoring tokens, every choice, bound it)
        tokens = task_tokens(self.tokenizer, self.items(task)[0], self.items(task)[1], config.finetune)
        train, dev = tokens.training, tokens.scoring

        def run(mode: str, lr: float) -> dict:
            owner = self.owner(task, rows)
            ft = dataclasses.replace(config.finetune, mode=mode, lr=lr, seed=seed, eval_items=len(owner.dev))
            folder = self.out / task_folder(task) / "sweep" / mode / f"lr{lr:g}"
            return owner.emulator_sweep(sweep_key(mode, lr, seed), self.emulator(section, seed), ft, trained_path(folder, mode))

        cost = 2 * train * blocks + dev * blocks * (config.finetune.steps // max(1, config.finetune.eval_every) + 1)
        return [Unit(f"{task}: sweep {mode} lr {lr:g} seed {seed} on {section.name} (dev loss only)", cost,
                     lambda m=mode, r=lr: rows.get(sweep_key(m, r, seed)) is not None, lambda m=mode, r=lr: run(m, r),
                     (section, seed), seed=seed)
                for mode, lrs in study.mode_sweeps.items() for lr in lrs]

    def mode_rate(self, mode: str) -> float:
        """The learning rate of ``mode``'s cells: ``[study] mode_lrs``, else ``[finetune] lr``."""
        return self.config.study.mode_lrs.get(mode, self.config.finetune.lr)

    def mode_waits(self, mode: str) -> str | None:
        """Why ``mode``'s cells cannot run yet: its sweep is not finished, or the config has not
        declared its rate; refused when the declared rate is not the sweep's choice."""
        study = self.config.study
        if mode not in study.mode_sweeps:
            return None
        task = study.sweep_task or study.tasks[0]
        rows, lrs, seed = RowCache(self.out / task_folder(task)), study.mode_sweeps[mode], study.seeds[0]
        found = mode_sweep_rows(rows, mode, lrs, seed)
        if (chosen := lowest_dev_loss(found)) is None:
            return f"the {mode} sweep on {task} is not finished"
        losses = ", ".join(f"{lr:g}: {found[lr]['best_dev_loss']:.4f}" for lr in lrs)
        if mode not in study.mode_lrs:
            return (f"the {mode} sweep chose lr {chosen:g} by dev loss ({losses}); declare it in the config as "
                    f"[study] mode_lrs.{mode} = {chosen:g}, with a comment saying so, and resume")
        if study.mode_lrs[mode] != chosen:
            raise ConfigError(f"[study] mode_lrs.{mode} = {study.mode_lrs[mode]:g}, but the {mode} sweep chose {chosen:g} "
                              f"by dev loss ({losses}); declare {chosen:g}, or change the sweep before its cells run")
        return None

    def stage1_units(self) -> list[Unit]:
        """Stage 1 per seed (and per emulator shape), shared by the tasks (a seed the ledger records
        is rebuilt when an emulator needs it)."""
        return list(self._stage1_units().values())

    def _stage1_units(self) -> dict[Path, Unit]:
        units: dict[Path, Unit] = {}
        for section in self.config.emulators:
            for seed in self.config.study.seeds:
                path = self.stage1_dir(section, seed)
                if section.needs_importance and path not in units:
                    units[path] = Unit(f"stage 1 {path.parent.name} seed {seed}", self.stage1_cost(),
                                       lambda s=section, k=seed: self.stage1_current(s, k),
                                       lambda s=section, k=seed: self.stage1(s, k), seed=seed, makes=path)
        return units

    # -- the units of the tasks ---------------------------------------------------------------
    def all_units(self) -> list[Unit]:
        """Every unit, in run order: the mode sweeps, then every task's units (:meth:`ordered`), each
        stage 1 just before the first of them built from it. (Not all seeds' stage 1 first: a run
        folder lost between sessions would take the later seeds' with it, an hour each on a larger
        model, before any unit had used them.)"""
        tasks = self.ordered([u for task in self.config.study.tasks for u in self.task_units(task)])
        pending, units = self._stage1_units(), []
        for u in self.sweep_units() + tasks:
            if u.needs is not None and u.needs[0].needs_importance:
                if (stage1 := pending.pop(self.stage1_dir(*u.needs), None)) is not None:
                    units.append(stage1)
            units.append(u)
        return units + list(pending.values())  # (a stage 1 no unit is built from: last)

    def units(self, task: str) -> list[Unit]:
        """``task``'s units alone, in run order (:meth:`ordered`)."""
        return self.ordered(self.task_units(task))

    def ordered(self, units: list[Unit]) -> list[Unit]:
        """``units`` in run order, seed by seed (the unseeded first), in a seed each emulator's together
        (:meth:`by_emulator`); the first pending unit to need an emulator that is not on disk pays
        its build."""
        rank = {seed: i for i, seed in enumerate(self.config.study.seeds)}
        units = self.by_emulator(sorted(units, key=lambda u: -1 if u.seed is None else rank[u.seed]))
        for u in units:
            if u.needs is not None:
                section, seed = u.needs
                u.build = lambda s=section, k=seed: self.missing_build(s, k)
                u.uses = self.stage1_dir(section, seed) if section.needs_importance else None
                if not u.done():
                    u.charged = self.build_cost(section, seed)
                    u.cost += u.charged
        return units

    def task_units(self, task: str) -> list[Unit]:
        """``task``'s units as they are laid out: seed by seed, emulator by emulator (each cell of a
        mode that runs on the task: ``[study] mode_tasks``), the sweeps, the federations last."""
        study, ctx = self.config.study, TaskUnits(self, task)
        ctx.add("full zero-shot", "full_zero_shot", ctx.evaluation * self.layers, lambda: ctx.owner().full_zero_shot())
        for mode in {m for _, m in self.config.cells()}:
            self.mode_waits(mode)  # a declared rate that is not its sweep's choice: refused before anything runs
        for seed in study.seeds:
            for emulator, mode in self.config.cells():
                if task in study.tasks_of(mode):
                    self.cell_units(ctx, emulator, mode, seed)
            self.swept_units(ctx, seed)
        for federation in self.federations:
            for held, scored in federation.runs():
                if held == task:
                    ctx.units += self.federated_units(ctx, federation, scored)
        for u in ctx.units:  # (units run one at a time) the rows' resumed seconds and the unit's own
            u.resumed = lambda own=u.resumed: ctx.rows.take_resumed_seconds() + own()
        return ctx.units

    def swept_units(self, ctx: TaskUnits, seed: int) -> None:
        """Full fine-tuning and the attack: every rate of the sweep at the first seed, the chosen
        rate at the others."""
        study, first = self.config.study, seed == self.config.study.seeds[0]
        if study.full_finetune_lrs:
            for lr in study.full_finetune_lrs if first else [None]:
                ctx.units.append(self.swept(ctx, "full_finetune", lr, seed, (ctx.evaluation + 3 * ctx.train) * self.layers,
                                            study.full_finetune_lrs))
        if study.attack_emulator:
            section = next(e for e in self.config.emulators if e.name == study.attack_emulator)
            cost = (ctx.evaluation + 3 * ctx.train) * emulator_blocks(self.layers, section)
            for lr in study.attack_lrs if first else [None]:
                ctx.units.append(self.swept(ctx, f"{section.name}/attack", lr, seed, cost, study.attack_lrs, section))

    def by_emulator(self, units: list[Unit]) -> list[Unit]:
        """``units`` with those of one emulator at one seed next to each other, where the first was (its
        attack and federation after its cells, its other tasks' units after the first task's): kept
        in memory, it is read once (and built once, by a session without the run folder)."""
        groups: dict[object, list[Unit]] = {}
        for i, u in enumerate(units):  # (a unit that uses no emulator is a group of its own)
            key = (self.emulator_dir(*u.needs), u.needs[1]) if u.needs is not None else i
            groups.setdefault(key, []).append(u)
        return [u for group in groups.values() for u in group]

    def federated_units(self, ctx: TaskUnits, federation, scored: list[str]) -> list[Unit]:
        """Per seed and mode (of the modes that run on its tasks), the federation's simulation of
        ``ctx.task`` (scored on ``scored``: the task, or a mixture's tasks) and its twin (the pooled
        data trained with the same steps in all); in a mode other than the first, at the mode's
        rate, waiting for it like its cells."""
        section = next(e for e in self.config.emulators if e.name == federation.emulator)
        study, blocks, task = self.config.study, emulator_blocks(self.layers, section), ctx.task
        modes = [m for m in study.modes if set(scored) <= set(study.tasks_of(m))]  # (the modes run on its tasks)
        rows_of = {t: RowCache(self.out / task_folder(t)) for t in federation.tasks}
        twin = 2 if federation.spec.centralised else 1
        # training (the federation's, the twin's: the same steps whatever the data, at the scored
        # tasks' mean tokens per step); the emulator and the plug-in scored on each scored task (twice
        # with a twin); the plug-in on every owner's held-out items (at the tasks' tokens per item)
        tokens = [ctx if t == task else TaskUnits(self, t) for t in scored]
        per_item = np.mean([t.evaluation / max(1, len(self.items(t.task)[2])) for t in tokens])
        run = federation.fed.run
        owners = run.num_clients * (run.per_owner_items or 50) * per_item * self.layers
        cost = twin * 2 * np.mean([t.train for t in tokens]) * blocks + owners + \
            sum(t.evaluation * (blocks + self.layers) * twin for t in tokens)

        def run(seed: int, mode: str) -> dict:
            self.emulator(section, seed)  # built if needed
            return federation.run(task, seed, self.emulator_dir(section, seed), self.out, rows_of.__getitem__,
                                  lambda t: self.owner(t, rows_of[t]), lambda: self.emulator(section, seed),
                                  mode, self.mode_rate(mode))

        def resumed() -> float:  # the simulation's checkpointed rounds, a mixture's other tasks' scorings
            return federation.take_resumed_seconds() + sum(r.take_resumed_seconds() for r in rows_of.values())

        suffix = {m: "" if m == study.modes[0] else f" {m}" for m in modes}
        return [Unit(f"{task}: federation {federation.name}{suffix[m]} seed {s}", cost,
                     lambda s=s, m=m: federation.done(task, s, m, rows_of.__getitem__),
                     lambda s=s, m=m: run(s, m), (section, s), resumed=resumed,
                     waits=lambda m=m: self.mode_waits(m), seed=s)
                for s in study.seeds for m in modes]

    def cell_units(self, ctx: TaskUnits, emulator: NamedEmulatorConfig, mode: str, seed: int) -> None:
        """An emulator's zero-shot (once where no seed changes it) and its fine-tune + plug-in in ``mode``."""
        cell = self.config.cell_name(emulator, mode)
        prefix = f"{emulator.name}/seed{seed}" if seeded(emulator) else emulator.name
        blocks = emulator_blocks(self.layers, emulator)
        ctx.add(f"{prefix} zero-shot", zero_shot_key(emulator, seed), ctx.evaluation * blocks,
                lambda: ctx.owner().emulator_zero_shot(prefix, self.emulator(emulator, seed)), needs=(emulator, seed),
                seed=seed)
        folder = self.out / task_folder(ctx.task) / "trained" / cell / f"seed{seed}"

        def train_and_plug() -> dict:
            owner = ctx.owner()
            owner.finetune = dataclasses.replace(self.config.finetune, mode=mode, seed=seed, lr=self.mode_rate(mode),
                                                 eval_items=len(owner.dev))
            return owner.emulator_finetune_and_plug_in(f"{cell}/seed{seed}", self.emulator(emulator, seed),
                                                       trained_path(folder, mode))

        ctx.add(f"{cell} seed {seed} fine-tune + plug-in", f"{cell}/seed{seed}/plug_in",
                2 * ctx.train * blocks + ctx.evaluation * (blocks + self.layers), train_and_plug, needs=(emulator, seed),
                waits=lambda: self.mode_waits(mode), seed=seed)

    def stage1_cost(self) -> float:
        """Stage 1's block-token passes: per token, a forward and backward through every block and
        the LM head, three times over (the candidates, the harmonizers' step, the ranking)."""
        stage1_cfg = self.config.layer_replace
        return stage1_cfg.steps * stage1_cfg.batch_size * stage1_cfg.block_size * 6 * (self.layers + self.head_blocks)

    def distill_cost(self, section: NamedEmulatorConfig) -> float:
        """A distillation's block-token passes: the teacher forward (no head), the student forward
        and backward with its LM head."""
        d = self.config.distill
        return d.steps * d.batch_size * d.block_size * (
            self.layers + 3 * (emulator_blocks(self.layers, section) + self.head_blocks))

    def missing_build(self, section: NamedEmulatorConfig, seed: int) -> float:
        """What building the emulator costs now: 0 when it is on disk, else its distillation and
        its stage 1 where that is not on disk either."""
        if (self.emulator_dir(section, seed) / "manifest.json").exists():
            return 0.0
        stage1 = self.stage1_dir(section, seed) / "layer_replace.json"
        return (self.distill_cost(section) if section.distill else 0.0) + (
            self.stage1_cost() if section.needs_importance and not stage1.exists() else 0.0)

    def build_cost(self, section: NamedEmulatorConfig, seed: int) -> float:
        """What building the emulator costs while it is not on disk, for the ETA: its distillation,
        and its stage 1 where only the ledger's record of it is left; charged once (then 0), to the
        first unit that asks, whichever task's unit that is."""
        edir, stage1 = self.emulator_dir(section, seed), self.stage1_dir(section, seed)
        if edir in self._costed or (edir / "manifest.json").exists():
            return 0.0
        self._costed.add(edir)
        cost = self.distill_cost(section) if section.distill else 0.0
        if section.needs_importance and stage1 not in self._costed and not (stage1 / "layer_replace.json").exists() \
                and self.stage1_current(section, seed):  # (else its own pending unit holds the cost)
            self._costed.add(stage1)
            cost += self.stage1_cost()
        return cost

    def swept(self, ctx: TaskUnits, name: str, lr: float | None, seed: int, cost: float, lrs: list[float],
              section: NamedEmulatorConfig | None = None) -> Unit:
        """A row trained at learning rate ``lr``, or (``None``) at the rate the first seed's sweep chose."""
        first, rows = self.config.study.seeds[0], ctx.rows

        def key() -> str | None:
            rate = lr if lr is not None else chosen_rate(rows, name, lrs, first, section is not None)
            return None if rate is None else f"{name}/lr{rate:g}/seed{seed}/" + (
                "emulator_attack" if section else "row")

        def run() -> dict:
            rate = lr if lr is not None else chosen_rate(rows, name, lrs, first, section is not None)
            owner = ctx.owner()
            ft = dataclasses.replace(self.config.attack if section else self.config.finetune, lr=rate, seed=seed)
            if section is not None:
                path = self.emulator_dir(section, seed)
                self.emulator(section, seed)  # built if needed
                return owner.attack(f"{name}/lr{rate:g}/seed{seed}", path, ft)
            return owner.full_finetune(f"{name}/lr{rate:g}/seed{seed}/row", dataclasses.replace(ft, mode="full"))

        label = f"{name} lr {lr:g} seed {seed}" if lr is not None else f"{name} seed {seed} (chosen rate)"
        return Unit(f"{ctx.task}: {label}", cost, lambda: (k := key()) is not None and rows.get(k) is not None, run,
                    (section, seed) if section is not None else None, seed=seed)

    # -- data -------------------------------------------------------------------------------
    def items(self, task: str) -> tuple:
        """``(train, dev, evaluation)`` of ``task`` (:func:`recipes.study.data.task_items`), read once."""
        if task not in self._items:
            self._items[task] = task_items(self.config.study, task)
        return self._items[task]

    def owner(self, task: str, rows: RowCache) -> SingleOwner:
        study = self.config.study
        train, dev, evaluation = self.items(task)
        self.log(f"study: {task}: {len(train)} train, {len(dev)} dev, {len(evaluation)} eval items"
                 + (" (a fixed random subset)" if task in study.random_subsets else ""))
        return SingleOwner(self.full, self.tokenizer, train, dev, evaluation, self.config.finetune,
                           study.eval_batch_size, cache=cached_rows(rows, self.log), checkpoint=rows.checkpoint)


class TaskUnits:
    """One task's part of the grid as it is laid out: its row cache, what a scoring and a training
    push through the model (the costs' weights), its data owner (read when a unit first needs
    it), and the units so far (a row's unit once, however many cells meet it)."""

    def __init__(self, grid: Grid, task: str) -> None:
        self.grid, self.task = grid, task
        self.rows = RowCache(grid.out / task_folder(task))
        train_items, _, eval_items = grid.items(task)
        tokens = task_tokens(grid.tokenizer, train_items, eval_items, grid.config.finetune)
        self.evaluation, self.train = tokens.scoring, tokens.training
        self.units: list[Unit] = []
        self._keys: set[str] = set()
        self._owner: SingleOwner | None = None

    def owner(self) -> SingleOwner:
        if self._owner is None:
            self._owner = self.grid.owner(self.task, self.rows)
        return self._owner

    def add(self, label: str, key: str, cost: float, compute: Callable[[], object],
            needs: tuple[NamedEmulatorConfig, int] | None = None, waits: Callable[[], str | None] = lambda: None,
            seed: int | None = None) -> None:
        """A unit that makes row ``key`` (once: an unseeded emulator's zero-shot meets it at every seed)."""
        if key not in self._keys:
            self._keys.add(key)
            self.units.append(Unit(f"{self.task}: {label}", cost, lambda: self.rows.get(key) is not None, compute,
                                   needs, waits=waits, seed=seed))


def open_grid(config: StudyConfig, out: Path, results: Path, log, federations=()) -> tuple[list[Unit], list[bool], dict]:
    """The grid over the loaded model, in run order: its units, whether each is done (logged with
    the ETA) and the model's facts (for the budgets). What a run and a plan start from."""
    loaded = load_model(config.study.model)
    grid = Grid(config, out, loaded.model, loaded.tokenizer, log, federations, ledger.ledger_dir(results))
    units = grid.all_units()
    done = [u.done() for u in units]
    log(f"study: {len(units)} units, {sum(done)} done")
    if eta := eta_line(ledger.compute_log(results), sum(u.cost for u, d in zip(units, done) if d),
                       [(u.label, u.cost) for u, d in zip(units, done) if not d]):
        log(eta)
    return units, done, model_facts(loaded.model)
