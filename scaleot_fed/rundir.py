"""Run folders: one place that creates them, snapshots the config and writes files atomically.

Every program (the offsite pipeline, the study, a federated run) keeps what it produced in one
folder: ``config.json`` (the resolved config, written when the run starts), results written as
they become known, and a cache of finished pieces so that a stopped run continues where it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import write_atomic
from .score_state import SAVE_EVERY_S
from .train_state import Checkpoint

LOCK = ".lock"
_HELD: dict[Path, int] = {}  # run folders this process has locked -> the lock file's descriptor
OWN_LOCK_WAIT = 30.0
"""Seconds :func:`lock_run_dir` waits for a lock this process released but a forked child still holds."""


def write_json(path: Path, value: Any, indent: int | None = 1) -> Path:
    """Write ``value`` as JSON through a temporary file and a rename, so a reader (or a resumed
    run) never sees half a file."""
    return write_atomic(path, json.dumps(value, indent=indent))


def check_writable(out: str | Path, flag: str = "--out") -> None:
    """Fail early when ``out`` (given as ``flag``) cannot be written: tried for real (a folder
    made, a file written), then everything the check made is removed again, so a failing command
    leaves nothing."""
    out = Path(out).expanduser().absolute()
    existing = next(p for p in (out, *out.parents) if p.exists())
    folder = out if out.is_dir() or not out.exists() else out.parent
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    probe = folder / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    except OSError as exc:
        raise ConfigError(f"cannot write to {out} ({exc.strerror or exc}; {existing} is the nearest existing "
                          f"folder); choose another {flag}") from None
    finally:
        probe.unlink(missing_ok=True)
        for path in created:  # innermost first
            with contextlib.suppress(OSError):
                path.rmdir()


def check_output(out: str | Path, overwrite: bool) -> None:
    """A command's ``--out`` (a file or a folder), checked before any work is done: refused if it
    exists (a non-empty folder) unless ``overwrite``. Nothing is removed here (see
    :func:`clear_output`), so a command that fails later loses nothing."""
    out = Path(out)
    check_writable(out)
    if (out.is_file() or out.is_symlink() or _has_content(out)) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; use --overwrite to replace it, or choose another --out")


def clear_output(out: str | Path) -> None:
    """Remove what ``--out`` held (a file or a folder's content), right before writing the new one."""
    out = Path(out)
    if out.is_file() or out.is_symlink():
        out.unlink()
    elif out.is_dir():
        _clear(out)
        # _clear locked the folder; an output such as an emulator folder must not keep our lock
        # file (it would be shipped with the emulator)
        unlock_run_dir(out)
        (out / LOCK).unlink(missing_ok=True)


def _has_content(out: Path) -> bool:
    return out.is_dir() and any(child.name != LOCK for child in out.iterdir())


def _clear(out: Path) -> None:
    lock_run_dir(out)  # never delete a folder another run is using
    for child in out.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def lock_run_dir(out: str | Path) -> Path:
    """Hold an exclusive lock on the run folder ``out`` (created if needed) until this process ends.

    Another process locking it fails at once with one line naming the holder's PID; the kernel
    drops the lock when the holder exits, however it exits (kill -9 included). Re-entrant within a
    process.
    """
    out = Path(out).resolve()
    if out in _HELD:
        if (out / LOCK).exists():
            return out
        os.close(_HELD.pop(out))  # the folder was deleted while we held it: lock the new one
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + OWN_LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            # our own PID: a lock this process released, still held by a child forked while it was
            # held (the lock belongs to the open file, which fork shares until the child execs or exits)
            if holder == str(os.getpid()) and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            os.close(fd)
            raise ConfigError(f"run folder {out} is in use by another run (PID {holder}); wait for it to end "
                              "or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[out] = fd
    return out


RUNNING = "running.json"
"""What a run folder's holder is working on: ``{"unit", "since" (epoch seconds), "pid"}``."""


def mark_running(out: Path, unit: str | None) -> None:
    """Say in ``out`` that this process is now working on ``unit`` (``None``: on nothing)."""
    if unit is None:
        (out / RUNNING).unlink(missing_ok=True)
    else:
        write_json(out / RUNNING, {"unit": unit, "since": time.time(), "pid": os.getpid()})


def running_unit(out: Path) -> dict | None:
    """What :func:`mark_running` last said in ``out``, while its process lives and holds the
    folder's lock; ``None`` otherwise (a run killed mid-unit leaves its marker behind)."""
    try:
        mark = json.loads((out / RUNNING).read_text())
        holder = (out / LOCK).read_text().strip()
        os.kill(mark["pid"], 0)  # raises when no such process
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return mark if holder == str(mark["pid"]) else None


def unlock_run_dir(out: str | Path) -> None:
    """Release a lock taken by :func:`lock_run_dir` in this process (no-op when not held)."""
    fd = _HELD.pop(Path(out).resolve(), None)
    if fd is not None:
        os.close(fd)


def open_run_dir(out: str | Path, config: dict[str, Any], overwrite: bool = False,
                 may_change: tuple[str, ...] = ()) -> Path:
    """Create (and lock) the run folder ``out`` and snapshot ``config`` in ``config.json``.

    A folder made with the same config (up to the keys in ``may_change``, which only add results)
    is continued and its cached results reused; one made with another config is refused, naming
    the changed keys, unless ``overwrite`` (which starts over in an emptied folder).
    """
    out = Path(out)
    check_writable(out)
    lock_run_dir(out)
    if check_run_dir(out, config, may_change, overwrite):
        _clear(out)
    write_json(out / "config.json", config)
    return out


def check_run_dir(out: Path, config: dict[str, Any], may_change: tuple[str, ...] = (), overwrite: bool = False) -> bool:
    """Whether ``out`` must be emptied before a run with ``config``: it holds a run made with another
    config (:func:`config_changes`), or content that is not a run of ours. Either is an error unless
    ``overwrite``. Reads only."""
    out = Path(out)
    if (out / "config.json").is_file():
        changed = config_changes(json.loads((out / "config.json").read_text()), config, may_change)
        if changed and not overwrite:
            raise ConfigError(f"{out} holds a run made with another config (changed: {', '.join(changed[:8])}); "
                              "use --overwrite to start over, or choose another --out")
        return bool(changed)
    if _has_content(out) and not overwrite:
        raise ConfigError(f"{out} is not empty and holds no run of ours; use --overwrite to replace its "
                          "content, or choose another --out")
    return _has_content(out)


def config_changes(saved: dict[str, Any], config: dict[str, Any], may_change: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys of ``config`` that differ from the ``saved`` snapshot, but those in
    ``may_change`` (a section name or a dotted key)."""
    from .emulator.config import upgrade_saved

    saved = upgrade_saved(saved)  # a snapshot written before a key was renamed compares in today's keys

    def allowed(key: str) -> bool:  # the key or a section above it (study.mode_lrs covers study.mode_lrs.full)
        parts = key.split(".")
        return any(".".join(parts[:i]) in may_change for i in range(1, len(parts) + 1))

    return [k for k in changed_keys(saved, json.loads(json.dumps(config))) if not allowed(k)]


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


class RowCache:
    """Finished results of a run, one JSON file each under ``rows/``: written once, reused on
    resume. Keys may contain ``/`` (``emulator/row``). A row's training and scoring in progress
    keep their :class:`~scaleot_fed.train_state.Checkpoint` under ``training/`` until the row is
    stored."""

    KINDS = {"training": ".pt", "scoring": ".scoring.pt"}
    EVERY_S = {"training": 300.0, "scoring": SAVE_EVERY_S}
    """Seconds between saves: a training state is large (1.7 GB for a full-parameter SmolLM2-135M
    run), a scoring's small (:data:`~scaleot_fed.score_state.SAVE_EVERY_S`)."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "rows"  # made by the first put: reading a run (a plan) writes nothing
        self.training = out / "training"
        self._handed: list[Checkpoint] = []

    @staticmethod
    def _name(key: str) -> str:
        return key.replace("/", "__")

    def _path(self, key: str) -> Path:
        return self.dir / f"{self._name(key)}.json"

    def _state(self, key: str, kind: str) -> Path:
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {sorted(self.KINDS)}, got {kind!r}")
        return self.training / f"{self._name(key)}{self.KINDS[kind]}"

    def checkpoint(self, key: str, kind: str = "training") -> Checkpoint:
        """Where the training or the scoring (``kind``) behind row ``key`` saves itself, so that a
        stop loses little of it."""
        checkpoint = Checkpoint(self._state(key, kind), self.EVERY_S[kind])
        self._handed.append(checkpoint)
        return checkpoint

    def take_resumed_seconds(self) -> float:
        """The work time that the trainings and scorings resumed since the last call had done in
        earlier processes (:attr:`~scaleot_fed.train_state.Checkpoint.resumed_seconds`)."""
        handed, self._handed = self._handed, []
        return sum(c.resumed_seconds for c in handed)

    def saved(self) -> list[tuple[str, str, Path]]:
        """The training and scoring states kept under ``training/``: ``(row key, kind, path)``."""
        found = []
        for path in sorted(self.training.glob("*.pt")) if self.training.is_dir() else ():
            kind = "scoring" if path.name.endswith(self.KINDS["scoring"]) else "training"
            found.append((path.name[: -len(self.KINDS[kind])].replace("__", "/"), kind, path))
        return found

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: str, value: dict) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self._path(key), value)
        for kind in self.KINDS:  # the row holds what they were for
            Checkpoint(self._state(key, kind)).remove()  # (not handed out: no resumed time to count)
        return value


def cached_rows(rows: RowCache, log):
    """A :class:`scaleot_fed.single_owner.SingleOwner` ``cache`` over ``rows``: a row is computed once,
    logged with its scores, and read back on every later call (and on resume)."""
    def cache(key: str, compute) -> dict:
        found = rows.get(key)
        if found is None:
            log(f"  computing {key} ...")
            found = rows.put(key, compute())
        if "acc" in found:
            log(f"  {key}: acc {found['acc']:.4f} acc_norm {found['acc_norm']:.4f}")
        else:  # a row judged by dev loss alone (a mode sweep's)
            log(f"  {key}: best dev loss {found['best_dev_loss']:.4f}")
        return found

    return cache
