"""Run folders: one place that creates them, snapshots the config and writes files atomically.

Every program (the offsite pipeline, the study, a federated run) keeps what it produced in one
folder: ``config.json`` (the resolved config, written when the run starts), results written as
they become known, and a cache of finished pieces so that a stopped run continues where it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, value: Any, indent: int | None = 1) -> Path:
    """Write ``value`` as JSON through a temporary file and a rename, so a reader (or a resumed
    run) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=indent))
    tmp.replace(path)
    return path


def open_run_dir(out: str | Path, config: dict[str, Any]) -> Path:
    """Create the run folder ``out`` (parents included) and snapshot ``config`` in ``config.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    return out


class RowCache:
    """Finished results of a run, one JSON file each under ``rows/``: written once, reused on
    resume. Keys may contain ``/`` (``emulator/row``)."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "rows"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.dir / f"{key.replace('/', '__')}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: str, value: dict) -> dict:
        write_json(self._path(key), value)
        return value
