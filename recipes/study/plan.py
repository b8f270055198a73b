"""``scaleot-fed study --plan``: what a resume would run next, each unit's cost and time, and the
ETA, without running anything.

A plan takes no lock and writes nothing in the run or results folders, so it may look at a study
that is running (the unit it is working on shows as pending, marked with the minutes it has run
so far; the ETA counts it whole), and the trainings and scorings a resume continues
(:meth:`scaleot_fed.rundir.RowCache.saved`). It refuses what a resume would refuse, and counts as
done what a resume would: the run folder's rows and the committed ledger's, which a resume
restores into the run folder and the plan into a scratch view of it (links to the run folder's
files, in the temporary folder; its ``training/`` folders empty, so that a row restored there
cannot delete a real saved state).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from scaleot_fed.config import as_dict
from scaleot_fed.errors import ConfigError
from scaleot_fed.rundir import LOCK, RUNNING, RowCache, check_run_dir, running_unit
from scaleot_fed.train_state import Checkpoint

from . import ledger
from .config import GRID_EXTENT, StudyConfig, task_folder
from .costs import eta_line, unit_rate
from .data import TASK_DATA
from .grid import open_grid
from .schedule import Schedule


def plan_study(config: StudyConfig, log=print, federations=(), rate_from: str | Path | None = None,
               schedule: Schedule | None = None) -> list[tuple[str, float]]:
    """Log the ETA line of the study ``config``, then its pending units in the order a resume with
    ``schedule`` runs them, with their estimated cost (million block-token passes) and time at the
    measured rate (before the study has timed a unit, at the rate of the study whose results folder
    ``rate_from`` names); with a deadline, which of them would be left for a later run.

    Raises :class:`scaleot_fed.errors.ConfigError` where a resume would refuse (another config in
    the run folder or the ledger, changed task items). Returns the pending ``(label, cost)`` pairs.
    """
    study, schedule = config.study, schedule or Schedule()
    out, results, may_change = Path(study.out), Path(study.results or study.out), GRID_EXTENT + TASK_DATA
    ledger.check_resume(out, results, config)
    check_run_dir(out, as_dict(config), may_change)
    # read with what is done, so that both describe one moment (loading the model takes a while)
    now = (running_unit(out) or {}) | {"at": time.time()}
    with tempfile.TemporaryDirectory(prefix="scaleot-study-plan-") as scratch:
        view = mirror(out, Path(scratch))
        ledger.restore(view, results, as_dict(config), study.tasks, may_change, lambda *_: None)
        units, done, _ = open_grid(config, view, results, log, federations)
        finished = sum(u.cost for u, d in zip(units, done) if d)
        units = schedule.order([u for u, d in zip(units, done) if not d])  # (read while the view exists)
        why = [u.waits() for u in units]
    rate, _ = unit_rate(ledger.compute_log(results), finished)
    pending = [(u.label, u.cost) for u in units]
    if rate <= 0 and rate_from is not None and pending:
        borrowed = ledger.compute_log(Path(rate_from))
        if (line := eta_line(borrowed, 0.0, pending)) is None:
            raise ConfigError(f"--rate-from {rate_from}: no timed unit in a compute log there (ledger/units.jsonl); "
                              "name the results folder of a study that has run")
        rate, _ = unit_rate(borrowed, 0.0)
        log(f"study: no unit of this study is timed yet; priced at {rate_from}'s rate: {line.removeprefix('study: ')}")
    waits: dict[str, int] = {}
    starts = schedule.forecast([u for u, reason in zip(units, why) if not reason], rate, now["at"])
    runnable = iter(starts)
    for u, reason in zip(units, why):
        late = not reason and not next(runnable)
        log(plan_line(u.label, u.cost, rate, now) + ("; waits" if reason else "") + ("; after the deadline" if late else ""))
        if reason:
            waits[reason] = waits.get(reason, 0) + 1
    for why, count in waits.items():
        log(f"study: {count} units wait: {why}")
    if schedule.until is not None:
        log(f"study: {sum(starts)} of {len(starts)} runnable units would start before "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(schedule.until))} at this rate")
    for task in study.tasks:
        for key, kind, path in RowCache(out / task_folder(task)).saved():
            log(f"  saved: {task}: {key}: {saved_state(kind, path)}")
    if not pending:
        log("study: nothing left to run; `scaleot-fed study --report-only` rewrites the report")
    return pending


def plan_line(label: str, cost: float, rate: float, running: dict | None = None) -> str:
    """A pending unit: its cost (million block-token passes), its time at ``rate`` (seconds per
    block-token; none while 0) and, when it is the ``running`` one
    (:func:`scaleot_fed.rundir.running_unit`, with ``at``: when it was read), how long it had run then."""
    line = f"  {label}: {cost / 1e6:.1f} M block-tokens" + (f", ~{cost * rate / 60:.1f} min" if rate > 0 else "")
    if running is not None and running.get("unit") == label:
        elapsed = running.get("at", time.time()) - running["since"]
        line += f"; running for {elapsed / 60:.1f} min when this plan began (PID {running['pid']})"
    return line


def saved_state(kind: str, path: Path) -> str:
    """How far the training or scoring (``kind``) saved in ``path`` got."""
    state = Checkpoint(path).peek()
    try:
        if kind == "scoring":
            return f"scoring, {len(state['batches'])} batches saved"
        return f"training saved at step {state['progress']['step']} ({state['progress']['seconds'] / 60:.1f} min trained)"
    except (TypeError, KeyError):  # none, or not a state of this kind (a resume says what to do)
        return f"{kind} state unreadable"


def mirror(out: Path, view: Path) -> Path:
    """A view of the run folder ``out`` in the empty folder ``view``: a link to each of its
    entries, but every ``rows/`` folder rebuilt of links to its files, so that rows written into
    the view (a restore) land there, never in ``out``. Returns ``view``."""
    for entry in sorted(out.iterdir()) if out.is_dir() else ():
        if entry.name in (LOCK, RUNNING):
            continue
        if entry.name == "training" and entry.is_dir():  # saved states: never linked (see above)
            (view / "training").mkdir(parents=True)
            continue
        if entry.is_dir() and (entry / "rows").is_dir():  # a task's folder
            mirror(entry, view / entry.name)
        elif entry.name == "rows" and entry.is_dir():
            (view / "rows").mkdir(parents=True)
            for row in entry.iterdir():
                (view / "rows" / row.name).symlink_to(row.resolve())
        else:
            view.mkdir(parents=True, exist_ok=True)
            (view / entry.name).symlink_to(entry.resolve())
    return view
