"""Stopping a simulation cleanly: Ctrl-C / SIGTERM, and kill -9 of the driver.

Flower runs the ServerApp in a non-daemon thread that waits in ``grid.send_and_receive``; a
KeyboardInterrupt in the main thread therefore never ends the process. On SIGINT or SIGTERM the
handler waits for a checkpoint being written (at most a few seconds), terminates every process
this one started (Ray included) and exits at once with 128 + the signal's number (130, 143). The
last completed round's checkpoint is on disk: ``--resume`` continues from it. For kill -9, which
no handler sees, a watchdog process (:mod:`simulations.watchdog`) ends the orphans.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from scaleot_fed.procs import descendants, terminate
from scaleot_fed.tracking import close_open

from .checkpoint import CHECKPOINT_LOCK

log = logging.getLogger("scaleot_fed.federation")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _start_watchdog() -> subprocess.Popen:
    root = str(Path(__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, "-m", "simulations.watchdog", str(os.getpid())], env=env,
                            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def _stop_now(signum: int, out: Path) -> None:
    """The signal handler's work: let a checkpoint finish, end the process tree, exit."""
    name = signal.Signals(signum).name
    print(f"scaleot-fed simulate: {name}: stopping; the last completed round's checkpoint is in {out} "
          f"(continue with: scaleot-fed simulate --resume {out})", file=sys.stderr, flush=True)
    if CHECKPOINT_LOCK.acquire(timeout=10):  # a checkpoint being written is finished first
        pass
    close_open("killed")  # (os._exit below unwinds nothing: no tracked run is left shown as running)
    terminate(descendants(os.getpid()))
    sys.stdout.flush()
    os._exit(128 + signum)


@contextlib.contextmanager
def stop_cleanly(out: Path) -> Iterator[None]:
    """Within this block SIGINT/SIGTERM end the run (and everything it started) within seconds,
    and a watchdog ends the driver's orphans if it is killed with -9."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    import ray._private.utils as ray_utils

    watchdog = _start_watchdog()
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, frame: _stop_now(signum, out))
    # ray.init replaces the SIGTERM handler with one that calls sys.exit, which then waits for
    # Flower's server thread forever (and aborts): ours already ends Ray's processes.
    ray_set_sigterm = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = ray_set_sigterm
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        watchdog.terminate()
        watchdog.wait(timeout=10)
