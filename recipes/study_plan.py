"""``scaleot-fed study --plan``: what a resume would run next, each unit's cost and time, and the
ETA, without running anything.

A plan takes no lock and writes nothing, so it may read a run folder a study is working in (a
unit it is in the middle of shows as pending). Where the run folder holds no run yet (a fresh
checkout), the plan restores the committed ledger into a scratch folder, as a resume would into
the run folder, so its units and costs (an emulator's rebuild included) are the ones the study
would start with.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from scaleot_fed.config import as_dict

from . import study_ledger as ledger
from .rundir import check_run_config
from .study import GRID_EXTENT, StudyConfig, open_grid
from .study_data import TASK_DATA, unit_rate


def plan_study(config: StudyConfig, log=print, federation=None) -> list[tuple[str, float]]:
    """Log the pending units of the study ``config`` in run order, with their estimated cost
    (million block-token passes) and time at the measured rate, then the ETA per task.

    Raises :class:`scaleot_fed.errors.ConfigError` where the study itself would refuse to resume
    (a changed config, changed task items). Returns the pending ``(label, cost)`` pairs.
    """
    study = config.study
    out, results, may_change = Path(study.out), Path(study.results or study.out), GRID_EXTENT + TASK_DATA
    ledger.check_resume(out, results, config)
    with tempfile.TemporaryDirectory(prefix="scaleot-study-plan-") as scratch:
        if (out / "config.json").is_file():
            check_run_config(out, as_dict(config), may_change)
            where = out
        else:
            where = Path(scratch)
            ledger.restore(where, results, as_dict(config), study.tasks, may_change, lambda *_: None)
        units, done, _ = open_grid(config, where, results, log, federation)
    finished = sum(u.cost for u, d in zip(units, done) if d)
    rate, _ = unit_rate(ledger.compute_log(results), finished)
    pending = [(u.label, u.cost) for u, d in zip(units, done) if not d]
    for label, cost in pending:
        log(f"  {label}: {cost / 1e6:.1f} M block-tokens" + (f", ~{cost * rate / 60:.1f} min" if rate > 0 else ""))
    if not pending:
        log("study: nothing left to run; `scaleot-fed study --report-only` rewrites the report")
    return pending
