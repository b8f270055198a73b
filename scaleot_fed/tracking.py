"""Experiment tracking: a run's parameters, metrics and artifacts, also sent where researchers
watch runs (TensorBoard, MLflow, Weights & Biases).

The run folder stays the record: every tracker is a view of what the run writes anyway. A
tracker that fails (not installed on a worker, a full disk, a locked database) costs a warning,
never the run, and the run's own files are complete either way. A resumed run continues the
same tracked run: ``tracking.json`` in the run folder keeps the tracked run's id and the last
step sent, and a resume sends the steps the tracker missed (a stop between a checkpoint and its
tracking) before going on.

Each backend is one class behind :class:`Tracker`, found by name in :data:`BACKENDS`:

* ``tensorboard``: event files under ``<run folder>/tensorboard`` (or ``uri``); the config as
  text, the metrics as scalars, Markdown/JSON artifacts as text and PNGs as images.
* ``mlflow``: a local store, ``sqlite:///<run folder>/mlflow.db`` unless ``uri`` names another
  (a server's address works too); config keys as params, metrics by step, files as artifacts.
* ``wandb``: offline under the run folder unless ``uri = "online"``; ``wandb sync`` uploads it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger("scaleot_fed.tracking")

STATE = "tracking.json"
"""In the run folder: the tracked run's backend, id and last step sent (what a resume continues)."""


@dataclass
class TrackingConfig:
    """``[tracking]``: where the run is also tracked (``none``: only the run folder)."""

    backend: str = "none"
    """``none``, ``tensorboard``, ``mlflow`` or ``wandb``."""
    uri: str | None = None
    """TensorBoard: the log folder (default ``<run folder>/tensorboard``); MLflow: the tracking URI
    (default ``sqlite:///<run folder>/mlflow.db``); W&B: ``online`` to upload as it runs (default:
    offline, under the run folder)."""
    experiment: str = "scaleot-fed"
    """MLflow's experiment, W&B's project."""
    run_name: str | None = None
    """The tracked run's name (default: the run folder's name)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"tracking.backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if not self.experiment:
            raise ConfigError("tracking.experiment must be a non-empty name")

    def check_installed(self) -> None:
        """Refuse a backend whose package is missing (one line naming the install), before a run
        starts; a tracker that breaks later only warns."""
        package, extra = BACKENDS[self.backend].requires
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"tracking.backend = {self.backend!r} needs the {package} package: "
                              f"pip install 'scaleot-fed[{extra}]', or set tracking.backend = \"none\"")


class Tracker:
    """A tracked run. This base class tracks nothing (``none``); each backend overrides the four
    calls. Metric names use ``/`` to group (``owner/3/val_loss``)."""

    requires: tuple[str | None, str | None] = (None, None)
    """The package a backend imports and the extra that installs it."""

    def __init__(self, config: TrackingConfig, out: Path, run_id: str | None) -> None:
        self.config, self.out, self.run_id = config, out, run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """The run's configuration, flattened to ``section.key`` (:func:`flatten`)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at ``step`` (a round, a training step, a study's unit)."""

    def log_artifact(self, path: Path) -> None:
        """A file the run wrote (a table, a plot)."""

    def close(self, status: str = "finished") -> None:
        """Flush and end the tracked run as ``status`` (:data:`END_STATUSES`; a resume opens it again)."""


class TensorBoardTracker(Tracker):
    requires = ("tensorboard", "tracking")

    def __init__(self, config: TrackingConfig, out: Path, run_id: str | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(config.uri) if config.uri else out / "tensorboard"
        super().__init__(config, out, run_id or str(folder))
        self.writer = SummaryWriter(log_dir=str(folder))

    def log_params(self, params: dict[str, Any]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in flatten(params).items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + table)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_artifact(self, path: Path) -> None:
        if path.suffix == ".png":
            import numpy as np
            from PIL import Image

            self.writer.add_image(path.stem, np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")
        else:  # Markdown and JSON as text (TensorBoard renders Markdown)
            text = path.read_text()
            self.writer.add_text(path.name, text if path.suffix == ".md" else f"```\n{text}\n```")
        self.writer.flush()

    def close(self, status: str = "finished") -> None:  # (event files have no run status)
        self.writer.close()


class MLflowTracker(Tracker):
    requires = ("mlflow", "tracking")

    def __init__(self, config: TrackingConfig, out: Path, run_id: str | None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=config.uri or f"sqlite:///{(out / 'mlflow.db').resolve()}")
        if run_id is None:
            experiment = self.client.get_experiment_by_name(config.experiment)
            eid = experiment.experiment_id if experiment else self.client.create_experiment(config.experiment)
            run_id = self.client.create_run(eid, run_name=config.run_name or out.name).info.run_id
        else:  # a resume: the same run, running again
            self.client.update_run(run_id, status="RUNNING")
        super().__init__(config, out, run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        values = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]  # (MLflow's value limit)
        if self.client.get_run(self.run_id).data.params:  # a resume: params are write-once in MLflow
            return
        for start in range(0, len(values), 100):  # (MLflow's batch limit)
            self.client.log_batch(self.run_id, params=values[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, v, now, step) for k, v in metrics.items()]
        for start in range(0, len(values), 1000):
            self.client.log_batch(self.run_id, metrics=values[start:start + 1000])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str = "finished") -> None:
        self.client.set_terminated(self.run_id, status=status.upper())


class WandbTracker(Tracker):
    requires = ("wandb", "wandb")

    def __init__(self, config: TrackingConfig, out: Path, run_id: str | None) -> None:
        import wandb

        self.run = wandb.init(project=config.experiment, name=config.run_name or out.name, dir=str(out), id=run_id,
                              resume="allow", mode="online" if config.uri == "online" else "offline")
        super().__init__(config, out, self.run.id)

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(flatten(params), allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self, status: str = "finished") -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)  # (non-zero: W&B shows it failed)


END_STATUSES = ("finished", "failed", "killed")
"""How a tracked run ended: completed, stopped by an error, stopped by the user (Ctrl-C)."""

BACKENDS: dict[str, type[Tracker]] = {
    "none": Tracker,
    "tensorboard": TensorBoardTracker,
    "mlflow": MLflowTracker,
    "wandb": WandbTracker,
}


class Tracking:
    """The tracker a run talks to: every call guarded (a failure is one warning per kind of call,
    then that call is skipped for the rest of the run), and the tracked run's state kept in
    ``<out>/tracking.json`` for a resume.

    Parameters
    ----------
    config:
        ``[tracking]``.
    out:
        The run folder.
    resume:
        Continue the tracked run this folder's ``tracking.json`` names (a new one when it names
        none, or another backend, store or experiment: then every step is sent again).

    Used as a context manager, the tracked run ends when the block does: ``finished`` (a clean
    ``sys.exit`` too), ``killed`` on Ctrl-C, ``failed`` on any other error, so a store never shows
    a crashed run as complete. A process about to end at once (a simulation's signal handler)
    ends every run still open as ``killed`` first (:func:`close_open`).
    """

    def __init__(self, config: TrackingConfig, out: Path, resume: bool = False) -> None:
        self.config, self.out = config, Path(out)
        self.broken: set[str] = set()
        state = self._state() if resume else {}
        same = all(state.get(k) == v for k, v in self._where().items())
        self.last_step: int | None = state.get("last_step") if same else None
        self.tracker: Tracker = Tracker(config, self.out, None)
        if config.backend != "none":
            self._guard("open", lambda: self._open(state.get("run_id") if same else None))

    def _open(self, run_id: str | None) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.tracker = BACKENDS[self.config.backend](self.config, self.out, run_id)
        self._save()
        OPEN.append(self)

    @property
    def active(self) -> bool:
        return type(self.tracker) is not Tracker

    def params(self, params: dict[str, Any]) -> None:
        if self.active:
            self._guard("params", lambda: self.tracker.log_params(params))

    def metrics(self, metrics: dict[str, Any], step: int) -> None:
        """``metrics`` at ``step`` (nested tables flattened to ``a/b``; what is not a finite number
        is left out); remembered as the last step sent."""
        values = scalars(metrics)
        if self.active and values:
            self._guard("metrics", lambda: self.tracker.log_metrics(values, step))
            if "metrics" not in self.broken:
                self.last_step = max(step, self.last_step if self.last_step is not None else step)
                self._save()

    def missed(self, steps: list[int]) -> list[int]:
        """Which of ``steps`` the tracked run has not received (a resume sends those first)."""
        return [s for s in steps if self.last_step is None or s > self.last_step] if self.active else []

    def artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            if self.active and Path(path).is_file():
                self._guard("artifacts", lambda p=Path(path): self.tracker.log_artifact(p))

    def close(self, status: str = "finished") -> None:
        if status not in END_STATUSES:
            raise ValueError(f"a tracked run ends as one of {END_STATUSES}, got {status!r}")
        if self in OPEN:  # (ended once: a run closed by close_open is not closed again by its block)
            OPEN.remove(self)
            self._guard("close", lambda: self.tracker.close(status))

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, kind, error, trace) -> None:
        clean = kind is None or (issubclass(kind, SystemExit) and error.code in (0, None))
        self.close("finished" if clean else "killed" if issubclass(kind, KeyboardInterrupt) else "failed")

    def _guard(self, what: str, call) -> None:
        if what in self.broken:
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - a tracker never fails the run
            self.broken.add(what)
            log.warning("tracking (%s): %s failed, the run goes on and its own files are complete: %s: %s",
                        self.config.backend, what, type(exc).__name__, exc)

    def _state(self) -> dict:
        try:
            return json.loads((self.out / STATE).read_text())
        except (OSError, ValueError):
            return {}

    def _where(self) -> dict:
        """What a tracked run is found by: its backend, store and experiment."""
        return {"backend": self.config.backend, "uri": self.config.uri, "experiment": self.config.experiment}

    def _save(self) -> None:
        from .files import write_atomic

        state = self._where() | {"run_id": self.tracker.run_id, "last_step": self.last_step}
        self._guard("state", lambda: write_atomic(self.out / STATE, json.dumps(state, indent=1) + "\n"))


OPEN: list[Tracking] = []
"""The tracked runs open in this process (:func:`close_open` ends them)."""


def close_open(status: str = "killed") -> None:
    """End every tracked run still open as ``status``: for a process that is about to exit without
    unwinding (``os._exit`` in a signal handler), so none is left shown as running."""
    for tracking in list(OPEN):
        tracking.close(status)


def track_once(config: TrackingConfig, out: Path, params: dict[str, Any], results: dict[str, Any],
               history: list[dict] | None = None, artifacts: list[Path] = ()) -> None:
    """A finished run's record sent in one go (``offsite``, ``finetune``): its config, each
    ``history`` record at its ``step``, the numbers of ``results`` (at the last step), the files."""
    if config.backend == "none":
        return
    with Tracking(config, out) as tracking:
        tracking.params(params)
        for record in history or []:
            tracking.metrics({k: v for k, v in record.items() if k != "step"}, int(record["step"]))
        tracking.metrics(results, int(history[-1]["step"]) if history else 0)
        tracking.artifacts(list(artifacts))


def flatten(values: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested tables as one level: ``{"run": {"seed": 0}}`` -> ``{"run.seed": 0}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat |= flatten(value, name, sep)
        else:
            flat[name] = value
    return flat


def scalars(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` (nested tables as ``a/b``; booleans, lists, text left out),
    named in the characters every backend takes (others become ``_``)."""
    return {re.sub(r"[^A-Za-z0-9_\-. :/]", "_", k): float(v) for k, v in flatten(values, sep="/").items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
