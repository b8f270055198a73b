"""The study's federated rows: an emulator of the grid fine-tuned by a Flower + Ray federation
(``[[federation]]``, ``[federations]``, or ``[study] federated``: a simulation config), once per
seed and mode, with the study's emulator, seed and evaluation items.

Rows, in each of the federation's tasks' row caches (``<name>:<mode>`` in a mode after the first):

* ``<name>/seed{s}/{emulator_finetune,plug_in}``: the aggregate in the emulator and plugged into
  the full model, scored on the study's evaluation items (paired item by item with every other
  row). The plug-in row also keeps each data owner's held-out items scored (``owners``, the rows
  ``<name>/worst_owner`` and ``<name>/owner_mean``) and the run's rounds (``rounds``: losses,
  bytes, seconds) for the report's convergence curves.
* ``<centralised>/seed{s}/...`` with ``centralised``: the same owners' pooled data trained
  centrally for as many steps (``[study] federated``'s twin is ``centralised``).

A federation on one task runs once per task (its ``[run] task`` replaced); one on a mixture
(``"arc_easy+piqa"``, owners holding different tasks) runs once, is scored by the simulation on its
first task (with the per-owner items) and by the study on the others, from the saved aggregate.
The simulation's run folder is ``<out>/<task>/<folder>/[<mode>/]seed{s}``, resumed after a stop.
The study (:mod:`recipes.study`) does not import this program: the ``study`` command hands it over.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from scaleot_fed.config import as_dict
from scaleot_fed.devices import Placement
from scaleot_fed.errors import ConfigError
from scaleot_fed.finetune import make_trainable
from scaleot_fed.plugin import plugged_for_scoring
from scaleot_fed.rundir import RowCache, changed_keys
from scaleot_fed.tasks import MIXTURE_SEPARATOR
from simulations.checkpoint import checkpointed_seconds, has_checkpoint
from simulations.config import FedConfig, fed_config_from_dict
from simulations.resume import in_todays_keys, saved_in_todays_keys

from . import ledger
from .config import OWNER_ROWS, FederationConfig, StudyConfig, merge_tables, task_folder, zero_shot_key

ROWS = ("emulator_finetune", "plug_in")
STUDY_SCORING = {"final_table": True, "save_plugged": False, "per_owner_eval": True}
"""``[run]`` keys the study sets in every simulation, whatever its file says: the final table's
rows, per owner, without a model copy."""
STUDY_PLACEMENT = Placement()
"""Where and in which precision the study's data owner scores every row (SingleOwner's default): a
federation's rows pair item by item with them only if its file scores the same way."""
SET_BY_STUDY = ("run.out", "run.seed", "run.eval_limit", "run.eval_split", "run.centralised_offsite",
                *(f"run.{key}" for key in STUDY_SCORING), "finetune.mode", "finetune.lr", "finetune.seed")
"""Keys of a federation's file that no row depends on: the study replaces them in each simulation
(:meth:`StudyFederation.simulation`), so a change to them is not a change of the federation."""
ROUND_KEYS = ("round", "train_loss", "client_val_loss", "bytes_up", "bytes_down", "emulator_bytes_down", "seconds",
              "successful")
"""What the plug-in row keeps of each round (the report's convergence curves and costs)."""


@dataclass
class StudyFederation:
    """One federation of the study: its simulation config (with ``set`` applied), checked against
    the grid before any work."""

    config: StudyConfig
    spec: FederationConfig
    fed: FedConfig
    _resumed: float = field(default=0.0, init=False, repr=False)  # (see take_resumed_seconds)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def emulator(self) -> str:
        return self.fed.emulator.name

    @property
    def mixture(self) -> bool:
        return MIXTURE_SEPARATOR in self.fed.run.task

    @property
    def tasks(self) -> list[str]:
        """The tasks it is scored on (a mixture's: in its order; the simulation scores the first)."""
        return self.spec.tasks or self.fed.run.task.split(MIXTURE_SEPARATOR)

    def resolved(self) -> dict:
        """Its simulation config as the ledger records it (the file with ``set`` applied)."""
        return json.loads(json.dumps(as_dict(self.fed)))

    def runs(self) -> list[tuple[str, list[str]]]:
        """``(task, tasks scored)`` per simulation at a seed: one per task, or a mixture's one run
        (held by its first task's units) scored on each of its tasks."""
        return [(self.tasks[0], self.tasks)] if self.mixture else [(t, [t]) for t in self.tasks]

    def folder(self, out: Path, task: str, mode: str, seed: int) -> Path:
        """Where the simulation of ``task`` (a mixture: its first task) at ``seed`` in ``mode`` runs."""
        base = self.spec.folder or f"federations/{self.name}"
        return out / task_folder(task) / base / ("" if mode == self.config.study.modes[0] else mode) / f"seed{seed}"

    @classmethod
    def load(cls, config: StudyConfig, spec: FederationConfig, where: str) -> StudyFederation:
        """Read ``spec``'s simulation config, apply its ``set``, and refuse one that does not fit the
        grid (one line, before any work)."""
        from scaleot_fed.config import load_toml

        try:
            fed = fed_config_from_dict(merge_tables(in_todays_keys(load_toml(spec.config)), spec.set), spec.config)
        except ConfigError as exc:
            raise ConfigError(f"{where}: federation {spec.name!r}: {exc}") from exc
        self = cls(config, spec, fed)
        study, names, problems = config.study, [e.name for e in config.emulators], []
        if fed.emulator.name not in names:
            problems.append(f"its [emulator] name {fed.emulator.name!r} is not one of the [[emulator]] names {names}")
        if [t for t in self.tasks if t not in study.tasks]:
            problems.append(f"its tasks {self.tasks} are not all study.tasks {study.tasks}")
        if self.mixture and [t for t in self.tasks if t not in fed.run.task.split(MIXTURE_SEPARATOR)]:
            problems.append(f"its tasks {self.tasks} are not all in its mixture {fed.run.task!r}")
        if self.mixture and spec.centralised:
            problems.append("a mixture federation has no centralised twin yet (its twin would be scored on the first "
                            "task only); leave centralised unset")
        for task in self.tasks:
            if task in study.random_subsets and study.eval_limit_of(task) is not None:
                problems.append(f"its task {task!r} is in study.random_subsets with an eval limit, but a simulation "
                                "scores the task's first items: take it out of random_subsets, or score it whole")
        if fed.run.eval_placement() != STUDY_PLACEMENT:  # (checked, not set: rows made before would not say)
            problems.append(f"it scores on eval_device {fed.run.eval_device!r} in eval_dtype {fed.run.eval_dtype!r}, but "
                            f"the study scores every row on {STUDY_PLACEMENT.device!r} in {STUDY_PLACEMENT.dtype!r} "
                            "(its rows pair item by item): leave both out of its file")
        if fed.run.model != study.model:
            problems.append(f"its model {fed.run.model!r} is not study.model {study.model!r}")
        if problems:
            raise ConfigError(f"{where}: federation {spec.name!r} ({spec.config}): {'; '.join(problems)}")
        from strategies import resolve_strategy

        try:  # a user's strategy file: imported now, not hours into the study
            resolve_strategy(fed.strategy.name)
        except ConfigError as exc:
            raise ConfigError(f"{where}: federation {spec.name!r}: {exc}") from exc
        return self

    def check_owners(self, where: str) -> None:
        """Draw every seed's data owners now: a partition that cannot split a task at some seed
        (a Dirichlet no draw of which gives each owner its minimum) fails before any unit runs,
        not when the study reaches that seed hours later."""
        from simulations.partition import partition_indices, warn_if_position_skew

        run = self.fed.run
        for task, _ in self.runs():
            warn_if_position_skew(run.task if self.mixture else task, run.train_limit, self.fed.partition)
            for seed in self.config.study.seeds:
                try:
                    partition_indices(run.task if self.mixture else task, run.train_limit, self.fed.partition,
                                      run.num_clients, seed)
                except ConfigError as exc:
                    raise ConfigError(f"{where}: federation {self.name!r} on {task} at seed {seed}: {exc}") from exc

    def simulation(self, task: str, seed: int, emulator_dir: Path, folder: Path, mode: str, lr: float) -> FedConfig:
        """The simulation config of one run: the study's seed, items, emulator, mode and rate, scored
        with the final table the study reads (:data:`STUDY_SCORING`): every owner's held-out items
        scored (the per-owner rows) and, with a twin, the pooled data."""
        study, run = self.config.study, self.fed.run
        section = next(e for e in self.config.emulators if e.name == self.emulator)
        first = self.tasks[0] if self.mixture else task
        runs = {"out": str(folder), "seed": seed, "eval_limit": study.eval_limit_of(first),
                "eval_split": study.eval_split_of(first), "centralised_offsite": bool(self.spec.centralised)}
        runs |= STUDY_SCORING
        runs |= {"eval_task": first} if self.mixture else {"task": task}
        return dataclasses.replace(
            self.fed, run=dataclasses.replace(run, **runs),
            finetune=dataclasses.replace(self.fed.finetune, mode=mode, lr=lr, seed=seed),
            emulator=dataclasses.replace(section, path=str(emulator_dir)))

    def run(self, task: str, seed: int, emulator_dir: Path, out: Path, rows_of, owner_of, emulator, mode: str,
            lr: float) -> dict:
        """Run (or resume) the simulation of ``task`` (one of :meth:`runs`) at ``seed`` in ``mode`` at
        ``lr`` and put its rows into the tasks' row caches (``rows_of(task)``); a mixture's other
        tasks are scored from the saved aggregate (:func:`aggregate_rows`) by their data owner
        ``owner_of(task)`` (the grid's, with the study's items) in ``emulator()`` (a fresh copy).
        Returns ``task``'s plug-in row."""
        from simulations.runner import simulate

        suffix = "" if mode == self.config.study.modes[0] else f":{mode}"
        folder = self.folder(out, task, mode, seed)
        fed = self.simulation(task, seed, emulator_dir, folder, mode, lr)
        if not (folder / "DONE").exists():
            started = has_checkpoint(folder)  # a stopped run resumes; one stopped before round 1 starts again
            if started:  # the rounds an earlier process trained count in the study's compute
                self._resumed += checkpointed_seconds(folder)
            simulate(fed, resume=started, overwrite=not started, rows=self._zero_shot_rows(task, seed, rows_of))
        self._copy_rows(folder, task, seed, suffix, rows_of(task))
        for other in dict(self.runs())[task][1:]:  # a mixture's other tasks (cached in their rows as they finish)
            aggregate_rows(owner_of(other), emulator(), folder, fed, f"{self.name}{suffix}/seed{seed}")
        return rows_of(task).get(f"{self.name}{suffix}/seed{seed}/plug_in")

    def _zero_shot_rows(self, task: str, seed: int, rows_of) -> dict[str, dict]:
        """The study's zero-shot rows of the task the simulation scores (the full model's, the
        emulator's at ``seed``), under the simulation's keys: they are the same for every federation
        of a seed, on the same items (the study sets them), so its final table does not score them
        again (on PIQA that was about a third of a federation's time)."""
        section = next(e for e in self.config.emulators if e.name == self.emulator)
        rows = rows_of(self.tasks[0] if self.mixture else task)
        found = {"full_zero_shot": rows.get("full_zero_shot"),
                 f"{self.emulator}/emulator_zero_shot": rows.get(zero_shot_key(section, seed))}
        return {key: row for key, row in found.items() if row is not None}

    def take_resumed_seconds(self) -> float:
        """The training seconds that earlier processes spent on the simulations resumed since the
        last call (their checkpointed rounds), for the study's compute log."""
        seconds, self._resumed = self._resumed, 0.0
        return seconds

    def done(self, task: str, seed: int, mode: str, rows_of) -> bool:
        """Whether the simulation of ``task`` at ``seed`` in ``mode`` has its rows in every task it scores."""
        suffix = "" if mode == self.config.study.modes[0] else f":{mode}"
        sides = [self.name] + ([self.spec.centralised] if self.spec.centralised else [])
        return all(rows_of(t).get(f"{side}{suffix}/seed{seed}/plug_in") is not None
                   for t in dict(self.runs())[task] for side in sides)

    def _copy_rows(self, folder: Path, task: str, seed: int, suffix: str, rows: RowCache) -> None:
        """The finished simulation's rows into the study's (checked to be on the study's items)."""
        done, section = RowCache(folder), self.emulator
        full = rows.get("full_zero_shot")
        sides = [(self.name, f"{section}/federated")] + ([(self.spec.centralised, section)] if self.spec.centralised else [])
        rounds = json.loads((folder / "metrics.json").read_text())
        for side, prefix in sides:
            for row in ROWS:
                found = done.get(f"{prefix}/{row}")
                if found is None:
                    raise ConfigError(f"{folder} finished without its {prefix}/{row} row; delete the folder and rerun")
                if full is not None and found["items"]["gold"] != full["items"]["gold"]:
                    raise ConfigError(f"{folder} scored other items than the study's {task} rows; delete the folder "
                                      "and rerun (the study sets the simulation's evaluation items)")
                if side == self.name and row == "plug_in":
                    found = found | {"rounds": [{k: r.get(k) for k in ROUND_KEYS} for r in rounds["rounds"]],
                                     "bytes_up_total": rounds.get("bytes_up_total"),
                                     "bytes_down_total": rounds.get("bytes_down_total"),
                                     "emulator_bytes": rounds.get("emulator_bytes")}
                rows.put(f"{side}{suffix}/seed{seed}/{row}", found)


def load_federations(config: StudyConfig, where: str, check: bool = True, owners: bool = True) -> list[StudyFederation]:
    """Every federation of the study, each checked (:meth:`StudyFederation.load`), with ``owners``
    (for a run or a plan; a report needs no train data) its owners drawn at every seed
    (:meth:`StudyFederation.check_owners`), and (with ``check``: not for a study started over)
    against the simulation config each one's rows were made with (:func:`check_recorded`)."""
    federations = [StudyFederation.load(config, spec, where) for spec in config.federations]
    for federation in federations if owners else ():
        federation.check_owners(where)
    by_name = {f.name: f for f in federations}
    for claim in config.claims:  # an owner row is compared with the same owners only
        sides = [by_name.get(side.rsplit("/", 1)[0].split(":")[0]) for side in (claim.a, claim.b)]
        if None not in sides and claim.a.rsplit("/", 1)[-1] in OWNER_ROWS and not same_owners(*sides):
            raise ConfigError(f"{where}: [[claim]] {claim.claim!r}: {sides[0].name} and {sides[1].name} do not have the "
                              "same owners (partition, number, task, items per owner), so their owners cannot be paired")
    if check:
        check_recorded(federations, Path(config.study.results or config.study.out))
    return federations


def same_owners(a: StudyFederation, b: StudyFederation) -> bool:
    """Whether two federations' data owners hold the same items (their per-owner rows pair up)."""
    keys = ("task", "train_limit", "num_clients", "client_val_fraction", "per_owner_items", "seed")
    return a.fed.partition == b.fed.partition and all(getattr(a.fed.run, k) == getattr(b.fed.run, k) for k in keys)


def check_recorded(federations: list[StudyFederation], results: Path) -> None:
    """Refuse a federation whose simulation config (its file with ``set`` applied) differs from the
    one its rows were made with (the ledger's ``federations.json``, which the study writes when it
    runs): its seeds would mix two federations under one name."""
    recorded = ledger.federations_record(results)
    for f in federations:
        if f.name not in recorded:
            continue
        changed = [k for k in changed_keys(saved_in_todays_keys(recorded[f.name]), f.resolved())
                   if k not in SET_BY_STUDY]
        if changed:
            raise ConfigError(f"federation {f.name!r} changed since its rows were made ({', '.join(changed)}); restore "
                              f"its config, or give it another name (its rows are {f.name}/... in {results})")


def aggregate_rows(owner, emulator, folder: Path, fed: FedConfig, key: str) -> dict:
    """A finished federation's aggregate (``folder/aggregate.safetensors``) in ``emulator`` and
    plugged into ``owner``'s full model, scored on ``owner``'s evaluation items: the rows
    ``emulator_finetune`` and ``plug_in`` (cached by ``owner`` under ``key/...``)."""
    path = folder / "aggregate.safetensors"
    if not path.is_file():
        raise ConfigError(f"{folder} has no aggregate.safetensors; delete the folder and rerun")
    torch.manual_seed(fed.run.seed)
    trainable = make_trainable(emulator.model, list(emulator.adapter_positions()), fed.finetune)
    params, state = dict(trainable.named_parameters()), load_file(str(path))
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)

    def plugged() -> dict:
        with plugged_for_scoring(owner.full, trainable, emulator, owner.eval_placement) as model:
            return owner.evaluate(model, f"{key}/plug_in")

    return {"emulator_finetune": owner.cache(f"{key}/emulator_finetune",
                                             lambda: owner.evaluate(trainable, f"{key}/emulator_finetune")),
            "plug_in": owner.cache(f"{key}/plug_in", plugged)}


