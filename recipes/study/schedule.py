"""Which of a study's pending units run, and in which order, when its run folder may not outlive
the run: a machine lent for a session, a preemptible instance, a batch job with a time limit.

Such a run loses its builds (each seed's stage 1, a distilled emulator) with its folder; the next
run rebuilds them before any unit can use them (on Gemma-3-270M, about 100 minutes each on two
CPU cores). Two choices limit what that wastes, neither changes a row (every unit is seeded by its
own seed and checked against the ledger's builds, whatever ran before it):

* ``builds_last``: the units that need nothing built first (the full model's rows, the emulators
  built in seconds, those whose build is on disk), in the grid's order; then the others, still in
  the grid's order, so that one build's units stay together after it.
* ``until``: a deadline; a unit starts only if it fits before it at the study's measured rate,
  with the builds it still needs (a stage 1 together with the cheapest unit built from it: a build
  no unit uses before the deadline is lost with the folder). Units that do not fit are left for
  the next run, and the run ends with its report written.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass

from scaleot_fed.errors import ConfigError

from .grid import Unit


@dataclass(frozen=True)
class Schedule:
    """How a run orders its pending units and which it starts (module docstring)."""

    builds_last: bool = False
    until: float | None = None
    """The deadline, in seconds since the epoch (:func:`parse_until`), or None: no deadline."""

    def order(self, units: Sequence[Unit]) -> list[Unit]:
        """``units`` in run order: as given, or with ``builds_last`` the ones that build nothing first."""
        if not self.builds_last:
            return list(units)
        free = [not builds(u) for u in units]
        return [u for u, f in zip(units, free) if f] + [u for u, f in zip(units, free) if not f]

    def left(self, now: float | None = None) -> float:
        """Seconds left before the deadline (infinite without one)."""
        return float("inf") if self.until is None else self.until - (time.time() if now is None else now)

    def needs(self, unit: Unit, later: Sequence[Unit], rate: float) -> float:
        """Seconds ``unit`` takes at ``rate`` (seconds per block-token pass) with the builds it still
        needs; a stage 1 with the cheapest unit in ``later`` built from it."""
        if unit.makes is not None:
            return (unit.cost + min((u.cost - u.charged for u in later if u.uses == unit.makes), default=0.0)) * rate
        return (unit.cost - unit.charged + unit.build()) * rate  # (not the ETA's share of a build: what is missing now)

    def fits(self, unit: Unit, later: Sequence[Unit], rate: float, now: float | None = None) -> bool:
        """Whether ``unit`` can start and finish before the deadline (always without one; before
        any unit is timed, ``rate`` is 0 and only a deadline already past stops it)."""
        return self.needs(unit, later, rate) <= self.left(now)

    def forecast(self, units: Sequence[Unit], rate: float, now: float | None = None) -> list[bool]:
        """For a plan: whether each of ``units`` (in run order, none done) would start before the
        deadline, on a clock that each started unit moves by its ETA cost; a build whose unit is
        left (a stage 1, the share of a distillation charged to it) moves to the next unit needing it."""
        clock, starts = time.time() if now is None else now, []
        owed: dict[object, float] = {}  # an emulator's (name, seed) or a stage-1 folder: a build left so far
        for i, u in enumerate(units):
            keys = [k for k in ((u.needs[0].name, u.needs[1]) if u.needs else None, u.uses) if k is not None]
            own = (u.cost + sum(owed.get(k, 0.0) for k in keys)) * rate
            # a stage 1 with the cheapest unit built from it (alone it would be lost with the folder)
            cheapest = min((v.cost * rate for v in units[i + 1:] if v.uses == u.makes), default=0.0) if u.makes else 0.0
            starts.append(self.left(clock) >= own + cheapest)
            if starts[-1]:
                clock += own
                for k in keys:
                    owed.pop(k, None)
            elif u.makes is not None or u.charged:
                key = u.makes if u.makes is not None else keys[0]
                owed[key] = owed.get(key, 0.0) + (u.cost if u.makes is not None else u.charged)
        return starts


def builds(unit: Unit) -> bool:
    """Whether ``unit`` is a build (a stage 1) or must build one first."""
    return unit.makes is not None or unit.build() > 0


def parse_until(text: str, now: dt.datetime | None = None) -> float:
    """``--until``: ``HH:MM`` (local time; the next such moment) or an ISO date and time. Returns
    seconds since the epoch."""
    now = now or dt.datetime.now().astimezone()
    try:
        clock = dt.datetime.strptime(text, "%H:%M")
    except ValueError:
        clock = None
    if clock is not None:
        at = now.replace(hour=clock.hour, minute=clock.minute, second=0, microsecond=0)
        return (at if at > now else at + dt.timedelta(days=1)).timestamp()
    try:
        at = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--until {text!r}: give a local time HH:MM (e.g. 23:30) or an ISO date and time "
                          "(e.g. 2026-12-07T23:30)") from None
    at = at if at.tzinfo else at.astimezone()  # (naive: local time)
    if at.timestamp() <= now.timestamp():
        raise ConfigError(f"--until {text}: that moment has passed; give a later one")
    return at.timestamp()
