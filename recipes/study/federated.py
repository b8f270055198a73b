"""The study's federated rows: one emulator of the grid fine-tuned by a Flower + Ray federation
(``[study] federated``, a simulation config), once per seed, against the same owners' pooled data
trained centrally for as many steps. Both are scored on the study's evaluation items, so the
federated-vs-centralised claim is paired item by item like every other claim.

Rows (in the task's row cache): ``federated/seed{s}/{emulator_finetune,plug_in}`` and
``centralised/seed{s}/{emulator_finetune,plug_in}`` in the study's first mode, and
``federated:<mode>/...``, ``centralised:<mode>/...`` in each other mode of ``[study] modes``
(the simulation's ``[finetune]`` mode and rate replaced by the study's); the simulation's own
run folder is ``<out>/<task>/federated/seed{s}`` (``federated/<mode>/seed{s}`` in other modes),
resumed after a stop, like the study. The study
(:mod:`recipes.study`) does not import this program: the ``study`` command hands it over.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from scaleot_fed.errors import ConfigError
from scaleot_fed.rundir import RowCache
from simulations.checkpoint import has_checkpoint
from simulations.config import FedConfig, load_fed_config

from .config import FEDERATED_SIDES, StudyConfig

ROWS = ("emulator_finetune", "plug_in")


@dataclass
class StudyFederation:
    """The simulation config a study's federated rows come from, checked against the grid."""

    config: StudyConfig
    fed: FedConfig

    @property
    def task(self) -> str:
        return self.fed.run.task

    @property
    def emulator(self) -> str:
        return self.fed.emulator.name

    @classmethod
    def load(cls, config: StudyConfig, where: str) -> StudyFederation:
        """Read ``[study] federated`` and refuse one that does not fit the grid (before any work)."""
        path = config.study.federated
        fed = load_fed_config(path)
        names, problems = [e.name for e in config.emulators], []
        if fed.emulator.name not in names:
            problems.append(f"its [emulator] name {fed.emulator.name!r} is not one of the [[emulator]] names {names}")
        if fed.run.task not in config.study.tasks:
            problems.append(f"its task {fed.run.task!r} is not one of study.tasks {config.study.tasks}")
        if fed.run.task in config.study.random_subsets and config.study.eval_limit_of(fed.run.task) is not None:
            problems.append(f"its task {fed.run.task!r} is in study.random_subsets with an eval limit, but a "
                            "simulation scores the task's first items: take it out of random_subsets, or score it whole")
        if fed.run.model != config.study.model:
            problems.append(f"its model {fed.run.model!r} is not study.model {config.study.model!r}")
        if problems:
            raise ConfigError(f"{where}: study.federated = {path!r}: {'; '.join(problems)}")
        return cls(config, fed)

    def run(self, task: str, seed: int, emulator_dir: Path, folder: Path, rows: RowCache,
            full_zero_shot: dict | None, mode: str | None = None, lr: float | None = None) -> dict:
        """Run (or resume) the seed's federation with its centralised twin in ``folder`` and copy
        their rows into ``rows``; ``mode`` and ``lr``: the data owners' fine-tuning, the study's
        (its rows in the first mode are named as before modes were federated). Returns the
        federated plug-in row."""
        from simulations.runner import simulate

        study = self.config.study
        first = mode is None or mode == study.modes[0]
        overrides = {k: v for k, v in (("finetune.mode", mode), ("finetune.lr", lr)) if v is not None}
        fed = load_fed_config(study.federated, {
            "run.out": str(folder), "run.seed": seed, "finetune.seed": seed, "run.eval_limit": study.eval_limit_of(task),
            "run.eval_split": study.eval_split_of(task),
            "run.final_table": True, "run.centralised_offsite": True} | overrides)
        section = next(e for e in self.config.emulators if e.name == fed.emulator.name)
        fed = dataclasses.replace(fed, emulator=dataclasses.replace(section, path=str(emulator_dir)))
        if not (folder / "DONE").exists():
            started = has_checkpoint(folder)  # a stopped run resumes; one stopped before round 1 starts again
            simulate(fed, resume=started, overwrite=not started)
        done = RowCache(folder)
        suffix = "" if first else f":{mode}"
        for side, prefix in zip(FEDERATED_SIDES, (f"{section.name}/federated", section.name)):
            for row in ROWS:
                found = done.get(f"{prefix}/{row}")
                if found is None:
                    raise ConfigError(f"{folder} finished without its {prefix}/{row} row; delete the folder and rerun")
                if full_zero_shot is not None and found["items"]["gold"] != full_zero_shot["items"]["gold"]:
                    raise ConfigError(f"{folder} scored other items than the study's {task} rows; delete the folder "
                                      "and rerun (the study sets the simulation's evaluation items)")
                rows.put(f"{side}{suffix}/seed{seed}/{row}", found)
        return rows.get(f"federated{suffix}/seed{seed}/plug_in")
