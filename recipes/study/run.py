"""``scaleot-fed study``: run (or resume) a study's grid unit by unit, rewriting its report as
units finish (:mod:`recipes.study` is the grid, :mod:`recipes.study.report` the report)."""

from __future__ import annotations

import time
from pathlib import Path

from scaleot_fed.config import as_dict
from scaleot_fed.errors import ConfigError
from scaleot_fed.rundir import mark_running, open_run_dir
from scaleot_fed.tracking import Tracking

from . import ledger
from .config import GRID_EXTENT, StudyConfig
from .costs import unit_rate
from .data import TASK_DATA
from .grid import open_grid
from .schedule import Schedule

REPORT_EVERY = 120.0
"""Seconds between rewrites of the report while the grid runs (and once at the end)."""


def run_study(config: StudyConfig, progress: bool = False, log=print, overwrite: bool = False,
              federations=(), schedule: Schedule | None = None) -> dict:
    """Run (or resume) the grid; after every unit, rewrite the summary and the report
    (:mod:`recipes.study.report`). ``federations`` run the federated rows (each a
    :class:`recipes.study.federated.StudyFederation`, which the ``study`` command passes);
    ``schedule`` orders the pending units and holds back those that would not finish before its
    deadline (:mod:`recipes.study.schedule`). Returns the summary."""
    from .report import write_report

    study, schedule = config.study, schedule or Schedule()
    if config.federations and len(federations) != len(config.federations):
        raise ConfigError("the study's federations run Flower simulations: start the study with `scaleot-fed study`")
    results = Path(study.results or study.out)
    if not overwrite:
        ledger.check_resume(Path(study.out), results, config)
    out = open_run_dir(study.out, as_dict(config), overwrite, may_change=GRID_EXTENT + TASK_DATA)
    if overwrite and results.resolve() != out.resolve():
        ledger.clear(results)
    ledger.restore(out, results, as_dict(config), study.tasks, GRID_EXTENT + TASK_DATA, log)
    ledger.record_federations(results, {f.name: f.resolved() for f in federations})  # (checked when loaded)
    units, done, facts = open_grid(config, out, results, log, federations)
    pending = schedule.order([u for u, d in zip(units, done) if not d])
    summary = write_report(config, out, results, facts, merge_ledger=False)  # (restored above)
    with Tracking(config.tracking, out, resume=True) as tracking:  # one tracked run per run folder, step = units done
        tracking.params(as_dict(config))
        finished, last = _run_units(config, out, results, facts, pending, sum(done), tracking, progress, log, schedule)
        summary = last or summary
        tracking.metrics({"claims": claim_metrics(summary)}, finished)
        tracking.artifacts(sorted(p for p in results.iterdir() if p.suffix in (".md", ".json", ".png")))
    return summary


def _run_units(config: StudyConfig, out: Path, results: Path, facts: dict, pending: list, finished: int,
               tracking: Tracking, progress: bool, log, schedule: Schedule) -> tuple[int, dict | None]:
    """The pending units, one by one (a unit whose decision is not declared yet waits, one that
    would not finish before the ``schedule``'s deadline is left for the next run); the report
    rewritten every :data:`REPORT_EVERY` seconds and at the end. Returns the units done (the
    tracker's step) and the last summary."""
    from tqdm.auto import tqdm

    from .report import write_report

    summary = None
    # the bar counts estimated work (million block-token passes), so its ETA weighs each unit's cost
    bar = tqdm(total=sum(u.cost for u in pending) / 1e6, desc="study", disable=not progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} M block-tokens [{elapsed}<{remaining}] {postfix}")
    reported, waited, held = time.monotonic(), {}, []

    def too_long(u, later: list) -> float | None:  # its seconds with its builds, when past the deadline
        rate, _ = unit_rate(ledger.compute_log(results), 0.0)  # (as measured so far: this run's units too)
        return None if schedule.fits(u, later, rate) else schedule.needs(u, later, rate)

    for index, u in enumerate(pending):
        bar.set_postfix_str(f"{index + 1}/{len(pending)} {u.label}")
        if (why := u.waits()) is not None:
            waited[why] = waited.get(why, 0) + 1
        elif schedule.until is not None and not u.done() and (seconds := too_long(u, pending[index + 1:])) is not None:
            held.append((u.label, seconds))
        elif not u.done():  # (a swept row's key is only known once its sweep is done)
            start, cost = time.perf_counter(), u.cost - u.charged + u.build()  # (the builds it pays, now)
            mark_running(out, u.label)  # for `--plan` beside this run
            u.resumed()  # (anything a skipped unit's check left behind is not this unit's)
            row = u.run()
            # compute used, the ETA's rate: with what earlier processes did of it before a stop
            ledger.log_unit(results, u.label, time.perf_counter() - start, cost, u.resumed())
            finished += 1
            tracking.metrics({u.label: row if isinstance(row, dict) else {}}, finished)
        bar.update(u.cost / 1e6)
        if time.monotonic() - reported > REPORT_EVERY or index == len(pending) - 1:
            summary, reported = write_report(config, out, results, facts, merge_ledger=False), time.monotonic()
    bar.close()
    mark_running(out, None)
    for why, count in waited.items():
        log(f"study: {count} units wait: {why}")
    if held:
        deadline = time.strftime("%Y-%m-%d %H:%M", time.localtime(schedule.until))
        log(f"study: {len(held)} units left for the next run: they would not finish before {deadline} "
            f"(the first: {held[0][0]}, ~{held[0][1] / 60:.0f} min with the builds it needs)")
    return finished, summary


def claim_metrics(summary: dict) -> dict:
    """Each decided claim's difference and 95 % interval, under ``<claim> [<mode>]/<task>``."""
    return {f"{c['claim']}{' [' + c['mode'] + ']' if c.get('mode') else ''}/{c['task']}":
            {"difference": c["difference"], "ci95_low": c["ci95"][0], "ci95_high": c["ci95"][1]}
            for c in summary.get("claims", [])}
