"""The study's schedule: builds last, a deadline (:mod:`recipes.study.schedule`)."""

import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from recipes.study import Unit
from recipes.study.schedule import Schedule, parse_until
from scaleot_fed.errors import ConfigError


def unit(label: str, cost: float, build=0.0, makes: str | None = None, uses: str | None = None,
         ran: list | None = None, charged: float = 0.0, emulator: str | None = None) -> Unit:
    """A unit that records its run in ``ran``; ``build``: what it must build first (a number, or a
    callable); ``charged``: the ETA's share of a build, added to ``cost`` as the grid does."""
    ran = [] if ran is None else ran
    return Unit(label, cost + charged, lambda: label in ran, lambda: ran.append(label) or {},
                charged=charged, needs=(SimpleNamespace(name=emulator), 0) if emulator else None,
                build=build if callable(build) else lambda: build, makes=Path(makes) if makes else None,
                uses=Path(uses) if uses else None)


def grid_units() -> list[Unit]:
    """A seed's units in grid order: the full model, OT (a distillation, charged to its first unit's
    ETA), ScaleOT (its stage 1 its own unit), uniform drop."""
    return [unit("full zero-shot", 10), unit("ot zero-shot", 5, build=100, charged=100, emulator="ot"),
            unit("ot plug-in", 20, build=100, emulator="ot"), unit("stage 1 seed 0", 90, makes="s0"),
            unit("scaleot zero-shot", 5, build=90, uses="s0", emulator="scaleot"),
            unit("scaleot plug-in", 20, build=90, uses="s0", emulator="scaleot"),
            unit("uniform zero-shot", 5, emulator="uniform"), unit("uniform plug-in", 20, emulator="uniform")]


def test_builds_last_runs_the_units_that_build_nothing_first_and_keeps_each_builds_units_together():
    units = grid_units()
    assert Schedule().order(units) == units
    assert [u.label for u in Schedule(builds_last=True).order(units)] == [
        "full zero-shot", "uniform zero-shot", "uniform plug-in",
        "ot zero-shot", "ot plug-in", "stage 1 seed 0", "scaleot zero-shot", "scaleot plug-in"]


def test_a_unit_starts_only_if_it_and_the_builds_it_still_needs_fit_before_the_deadline():
    units, now = grid_units(), 1000.0
    schedule = Schedule(until=now + 60)  # 60 s left at 1 s per block-token pass
    full, ot, stage1 = units[0], units[1], units[3]
    assert schedule.needs(full, units[1:], 1.0) == 10 and schedule.fits(full, units[1:], 1.0, now)
    assert schedule.needs(ot, units[2:], 1.0) == 105 and not schedule.fits(ot, units[2:], 1.0, now)
    # a stage 1 is weighed with the cheapest unit built from it: alone it would be lost with the folder
    assert schedule.needs(stage1, units[4:], 1.0) == 90 + 5
    assert schedule.needs(stage1, units[6:], 1.0) == 90  # (no unit left uses it)
    assert not schedule.fits(stage1, units[4:], 1.0, now) and Schedule(until=now + 95).fits(stage1, units[4:], 1.0, now)
    # the ETA's share of a build is not counted twice, and what counts is what is missing now
    assert schedule.needs(unit("ot zero-shot", 5, charged=100), [], 1.0) == 5
    # before any unit is timed (rate 0) everything fits until the deadline has passed
    assert schedule.fits(ot, [], 0.0, now) and not schedule.fits(ot, [], 0.0, now + 61)
    assert Schedule().fits(ot, [], 1e9, now)


def test_a_plans_forecast_moves_a_clock_by_each_started_unit_and_a_left_build_to_the_next_unit_needing_it():
    ordered, now = Schedule(builds_last=True).order(grid_units()), 0.0
    # full 10, uniform 5 + 20 (35 s used); in the 5 s left, the OT zero-shot would fit alone (5) but
    # not with its distillation (100), nor its plug-in (20) which would then pay it, nor ScaleOT's
    assert Schedule(until=now + 40).forecast(ordered, 1.0, now) == [True] * 3 + [False] * 5
    # with 180 s: the OT units (105 + 20: 160 s used), then the stage 1 and its first user do not
    # fit (95), and neither does either user alone with the stage 1 it would build
    assert Schedule(until=now + 180).forecast(ordered, 1.0, now) == [True] * 5 + [False] * 3
    assert Schedule(until=now + 280).forecast(ordered, 1.0, now) == [True] * 8  # 275 s in all
    assert all(Schedule().forecast(grid_units(), 1.0, now))


def test_until_takes_a_local_time_or_an_iso_moment_and_refuses_anything_else():
    now = dt.datetime(2026, 12, 7, 21, 0).astimezone()
    assert parse_until("23:30", now) == (now + dt.timedelta(hours=2, minutes=30)).timestamp()
    assert parse_until("20:30", now) == (now + dt.timedelta(hours=23, minutes=30)).timestamp()  # tomorrow's
    assert parse_until("2026-12-08T01:00", now) == (now + dt.timedelta(hours=4)).timestamp()
    with pytest.raises(ConfigError, match="HH:MM"):
        parse_until("half past", now)
    with pytest.raises(ConfigError, match="passed"):
        parse_until("2026-12-07T20:00", now)


def test_a_run_holds_back_the_units_that_would_not_finish_before_its_deadline(tmp_path, monkeypatch):
    """The loop itself: it runs what fits at the compute log's rate, leaves the rest, and says so."""
    import time

    import recipes.study.report
    from recipes.study import ledger
    from recipes.study.run import _run_units

    results, out, ran, said = tmp_path / "results", tmp_path / "run", [], []
    out.mkdir()
    for folder in (results, tmp_path / "later"):
        ledger.log_unit(folder, "an earlier unit", 100.0, 100.0, 0.0)  # 1 s per block-token pass
    monkeypatch.setattr(recipes.study.report, "write_report", lambda *a, **k: {"claims": []})

    class Tracking:
        def metrics(self, *_):
            pass

    units = [unit("a", 30, ran=ran), unit("too long", 500, ran=ran), unit("b", 20, ran=ran),
             unit("stage 1", 40, makes="s0", ran=ran),
             unit("built from it", 30, build=lambda: 0.0 if "stage 1" in ran else 40.0, uses="s0", ran=ran)]
    done, _ = _run_units(None, out, results, {}, units, 0, Tracking(), False, said.append,
                         Schedule(until=time.time() + 300))
    assert ran == ["a", "b", "stage 1", "built from it"] and done == 4
    assert said[-1].startswith("study: 1 units left for the next run") and "(the first: too long, ~8 min" in said[-1]
    # the compute log has what each ran unit paid now (the stage 1 was its own unit)
    assert [e["cost"] for e in ledger.compute_log(results)][1:] == [30, 20, 40, 30]
    assert json.loads((results / "ledger" / "units.jsonl").read_text().splitlines()[-1])["unit"] == "built from it"
    ran.clear()
    units = [unit("too long", 500, ran=ran), unit("c", 20, ran=ran), unit("built alone", 30, build=40, ran=ran)]
    done, _ = _run_units(None, out, tmp_path / "later", {}, units, 0, Tracking(), False, said.append,
                         Schedule(until=time.time() + 60))
    assert ran == ["c"] and said[-1].startswith("study: 2 units left for the next run")  # 30 s, but 70 with its build
