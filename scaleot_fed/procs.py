"""Process trees through psutil: who is alive, whose child, in which process group, how much
memory; and stopping a tree cleanly.

Used to stop a run's processes (the Ray processes a simulation starts, a deployment's SuperLink
and SuperNodes) and to measure a whole simulation's memory (benchmarks). A process is identified
by its pid *and* its start time: pids are reused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Proc:
    pid: int
    parent: int
    group: int
    state: str
    rss_bytes: int
    start: float
    """Start time (seconds since the epoch): with the pid, identifies a process (pids are reused)."""

    @property
    def alive(self) -> bool:
        return self.state not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)

    @property
    def cmdline(self) -> str:
        """The command line ("" once it is gone or unreadable)."""
        try:
            return " ".join(psutil.Process(self.pid).cmdline())
        except psutil.Error:
            return ""


def _proc(p: psutil.Process) -> Proc | None:
    try:
        with p.oneshot():
            try:
                group = os.getpgid(p.pid)
            except OSError:
                group = -1
            return Proc(p.pid, p.ppid(), group, p.status(), p.memory_info().rss, p.create_time())
    except psutil.Error:  # gone while being read, or not ours to read
        return None


def process_table() -> list[Proc]:
    """Every process readable now (ones that vanish while being read are skipped)."""
    return [proc for p in psutil.process_iter() if (proc := _proc(p)) is not None]


def descendants(pid: int, table: list[Proc] | None = None) -> list[Proc]:
    """``pid``'s children, their children, ... (not ``pid`` itself), from ``table`` when given
    (one consistent reading of the whole table), else read now."""
    if table is None:
        try:
            return [proc for p in psutil.Process(pid).children(recursive=True) if (proc := _proc(p)) is not None]
        except psutil.Error:
            return []
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
    try:
        own = psutil.Process(pid).memory_info().rss
    except psutil.Error:
        own = 0
    return own + sum(p.rss_bytes for p in descendants(pid))


def still_running(procs: list[Proc]) -> list[Proc]:
    """Those of ``procs`` that are still the same processes (same pid and start time) and alive."""
    left = []
    for proc in procs:
        try:
            p = psutil.Process(proc.pid)
            if p.create_time() == proc.start and p.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                left.append(proc)
        except psutil.Error:
            continue
    return left


def terminate(procs: list[Proc], grace: float = 3.0) -> list[Proc]:
    """SIGTERM ``procs`` (those still the same processes), SIGKILL what is left after ``grace``
    seconds; returns the ones that could not be killed."""
    for method, wait in (("terminate", grace), ("kill", 1.0)):
        handles = []
        for proc in still_running(procs):
            try:
                p = psutil.Process(proc.pid)
                getattr(p, method)()
                handles.append(p)
            except psutil.Error:
                continue
        psutil.wait_procs(handles, timeout=wait)
    return still_running(procs)


def status_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in bytes, from ``/proc/self/status``
    (Linux). Not ``ru_maxrss``: Linux carries that over from the parent across fork + exec, so a
    child would report its parent's; psutil has no peak on Linux."""
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")
