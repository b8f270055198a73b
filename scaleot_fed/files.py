"""Writing files: weight files with the permissions users expect, and files a reader must never
see half-written.

safetensors (and so ``save_pretrained``) creates its files with mode 600 whatever the umask; a
model folder meant to be shared (an emulator sent to data owners, a plugged-in model) then is
unreadable to the group. Every weight file we write gets the usual ``0o666 & ~umask``.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file


def file_name(text: str, fallback: str = "file") -> str:
    """``text`` (a task, a strategy named by path, ...) made one safe file name: every run of
    characters other than letters, digits and ``_.+-`` becomes ``_`` (``data/mine.jsonl`` ->
    ``data_mine.jsonl``, ``configs/x.py:Mine`` -> ``configs_x.py_Mine``), so it stays one name inside
    its folder; a long one keeps its end and a hash of the whole (a file name has at most 255
    bytes); ``fallback`` where nothing is left."""
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_.") or fallback
    return name if len(name) <= 96 else f"{name[-80:].lstrip('_.')}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for every thread)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def usual_mode(path: str | Path) -> None:
    """Give ``path`` (a file, or every file below a folder) mode ``0o666 & ~umask``."""
    path = Path(path)
    mode = 0o666 & ~_umask()
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        os.chmod(file, mode)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the usual permissions."""
    save_file(tensors, str(path), metadata=metadata)
    usual_mode(path)


def unique_tmp(path: Path) -> Path:
    """A temporary name beside ``path`` that no other process or thread uses."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename, so a reader (or a resumed
    run, for which this file marks the work done) never sees half a file."""
    path = Path(path)
    tmp = unique_tmp(path)
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        tmp.replace(path)
    except BaseException:  # (a full disk, a signal): no hidden half-file left beside the real one
        tmp.unlink(missing_ok=True)
        raise
    return path
