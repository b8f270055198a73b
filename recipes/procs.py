"""The process table from ``/proc`` (no ``ps`` needed): who is alive, whose child, how much memory.

Used to stop process trees cleanly (deployments) and to measure a whole simulation's memory
(benchmarks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    parent: int
    group: int
    state: str
    rss_bytes: int
    start: int
    """Start time in clock ticks since boot: with the pid, identifies a process (pids are reused)."""

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def process_table() -> list[Proc]:
    """Every process readable now (ones that vanish while being read are skipped)."""
    page = os.sysconf("SC_PAGE_SIZE")
    table = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                # the command name (field 2) may hold spaces and parentheses: split after it
                fields = handle.read().rsplit(")", 1)[1].split()
            table.append(Proc(int(entry), int(fields[1]), int(fields[2]), fields[0], int(fields[21]) * page,
                              int(fields[19])))
        except (OSError, IndexError, ValueError):
            continue
    return table


def descendants(pid: int, table: list[Proc] | None = None) -> list[Proc]:
    """``pid``'s children, their children, ... (not ``pid`` itself)."""
    table = process_table() if table is None else table
    children: dict[int, list[Proc]] = {}
    for proc in table:
        children.setdefault(proc.parent, []).append(proc)
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child.pid)
    return found


def tree_rss(pid: int) -> int:
    """Summed resident memory of ``pid`` and all its descendants, in bytes."""
    table = process_table()
    own = next((p.rss_bytes for p in table if p.pid == pid), 0)
    return own + sum(p.rss_bytes for p in descendants(pid, table))


def terminate(procs: list[Proc], grace: float = 3.0) -> list[Proc]:
    """SIGTERM ``procs`` (those still the same processes), SIGKILL what is left after ``grace``
    seconds; returns the ones that could not be killed."""
    import signal
    import time

    def still(targets: list[Proc]) -> list[Proc]:
        now = {(p.pid, p.start) for p in process_table() if p.alive}
        return [p for p in targets if (p.pid, p.start) in now]

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
        for proc in still(procs):
            try:
                os.kill(proc.pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while still(procs) and time.monotonic() < deadline:
            time.sleep(0.1)
    return still(procs)


def status_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in bytes. Not ``ru_maxrss``: Linux
    carries that over from the parent across fork + exec, so a child would report its parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")
