"""``python -m simulations.watchdog PID``: when PID dies without cleaning up (kill -9), end what
it started.

A simulation's Ray processes (GCS, raylet, agents, actors) are the driver's descendants while it
lives; killed with -9, the driver cannot stop them and they are re-parented away. The watchdog
runs in a session of its own (a Ctrl-C to the terminal does not reach it), remembers the
driver's descendants every half second and, once the driver is gone, terminates the ones it
remembers (same pid and start time, so a reused pid is never hit). It exits when the driver ends.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from scaleot_fed.procs import Proc, descendants, process_table, terminate

POLL = 0.5


def watch(pid: int) -> list[Proc]:
    """Block until ``pid`` has died; returns the descendants it last had (and earlier ones still alive)."""
    known: dict[tuple[int, int], Proc] = {}
    while True:
        table = process_table()
        driver = next((p for p in table if p.pid == pid), None)
        if driver is None or not driver.alive:
            return list(known.values())
        alive = {(p.pid, p.start) for p in table if p.alive}
        known = {k: p for k, p in known.items() if k in alive}
        known |= {(p.pid, p.start): p for p in descendants(pid, table) if p.alive}
        time.sleep(POLL)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the driver's death ends the watch
    left = watch(int(argv[0]))
    left = [p for p in left if p.pid != os.getpid()]  # the watchdog is one of the driver's children
    return 1 if terminate(left) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
