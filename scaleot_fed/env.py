"""Process environment for every entry point (CLI, tests, Flower apps).

Must run before torch, ray or flwr are imported: thread pools and telemetry read these once.
"""

import os

USER_SET_THREADS = "OMP_NUM_THREADS" in os.environ
"""Whether the user pinned the thread count (read before :func:`configure_environment` sets its
default): single-process commands then keep it instead of using every core."""

_DEFAULTS = {
    # With torch's default thread count on 2 cores, parallel clients oversubscribe the CPU (a
    # 3 s simulation took up to 87 s); one thread per process is the fast setting here.
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Flower and Ray call home by default.
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray's C++ failure-signal handler catches SIGTERM in the driver and aborts it (exit -6)
    # before our handler can stop the run cleanly (simulations/guard.py).
    "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
    # Otherwise `flwr run` makes its server `uv sync` the app into a fresh env (a CUDA torch).
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def configure_environment(offline: bool = False) -> None:
    """Set the process defaults above, never overriding what the user already set.

    Parameters
    ----------
    offline:
        Also forbid Hugging Face hub access (tests and CI).
    """
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
