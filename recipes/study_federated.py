"""The study's federated rows: one emulator of the grid fine-tuned by a Flower + Ray federation
(``[study] federated``, a simulation config), once per seed, against the same owners' pooled data
trained centrally for as many steps. Both are scored on the study's evaluation items, so the
federated-vs-centralised claim is paired item by item like every other claim.

Rows (in the task's row cache): ``federated/seed{s}/{emulator_finetune,plug_in}`` and
``centralised/seed{s}/{emulator_finetune,plug_in}``; the simulation's own run folder is
``<out>/<task>/federated/seed{s}`` (resumed after a stop, like the study).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from scaleot_fed.errors import ConfigError

from .rundir import RowCache
from .study_config import FEDERATED_SIDES, StudyConfig

ROWS = ("emulator_finetune", "plug_in")


def check_federated(config: StudyConfig, where: str) -> None:
    """Refuse a ``[study] federated`` simulation config that does not fit the grid (at load time)."""
    from simulations.config import load_fed_config

    path = config.study.federated
    fed = load_fed_config(path)
    names, problems = [e.name for e in config.emulators], []
    if fed.emulator.name not in names:
        problems.append(f"its [emulator] name {fed.emulator.name!r} is not one of the [[emulator]] names {names}")
    if fed.run.task not in config.study.tasks:
        problems.append(f"its task {fed.run.task!r} is not one of study.tasks {config.study.tasks}")
    if fed.run.model != config.study.model:
        problems.append(f"its model {fed.run.model!r} is not study.model {config.study.model!r}")
    if problems:
        raise ConfigError(f"{where}: study.federated = {path!r}: {'; '.join(problems)}")


def federated_setup(config: StudyConfig) -> tuple[str | None, str | None]:
    """The task the federation runs on and the emulator it trains (None, None: no federated rows)."""
    if not config.study.federated:
        return None, None
    from simulations.config import load_fed_config

    fed = load_fed_config(config.study.federated)
    return fed.run.task, fed.emulator.name


def run_federated(config: StudyConfig, task: str, seed: int, emulator_dir: Path, folder: Path, rows: RowCache,
                  full_zero_shot: dict | None) -> dict:
    """Run (or resume) the seed's federation with its centralised twin, and copy their rows into
    ``rows``. Returns the federated plug-in row."""
    from simulations.checkpoint import has_checkpoint
    from simulations.config import load_fed_config
    from simulations.runner import simulate

    study = config.study
    fed = load_fed_config(study.federated, {
        "run.out": str(folder), "run.seed": seed, "finetune.seed": seed, "run.eval_limit": study.eval_limit_of(task),
        "run.final_table": True, "run.centralised_offsite": True})
    section = next(e for e in config.emulators if e.name == fed.emulator.name)
    fed = dataclasses.replace(fed, emulator=dataclasses.replace(section, path=str(emulator_dir)))
    if not (folder / "DONE").exists():
        started = has_checkpoint(folder)  # a stopped run resumes; one stopped before round 1 starts again
        simulate(fed, resume=started, overwrite=not started)
    done = RowCache(folder)
    for side, prefix in zip(FEDERATED_SIDES, (f"{section.name}/federated", section.name)):
        for row in ROWS:
            found = done.get(f"{prefix}/{row}")
            if found is None:
                raise ConfigError(f"{folder} finished without its {prefix}/{row} row; delete the folder and rerun")
            if full_zero_shot is not None and found["items"]["gold"] != full_zero_shot["items"]["gold"]:
                raise ConfigError(f"{folder} scored other items than the study's {task} rows; delete the folder "
                                  "and rerun (the study sets the simulation's evaluation items)")
            rows.put(f"{side}/seed{seed}/{row}", found)
    return rows.get(f"federated/seed{seed}/plug_in")
