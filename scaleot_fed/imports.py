"""Code a user names by ``"package.module:name"`` or ``"path/to/file.py:name"`` (a strategy class,
a client mod): imported once, each failure one line naming what to fix."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from .errors import ConfigError


def is_file_spec(where: str) -> bool:
    """Whether ``where`` (the part before ``:``) names a file rather than a module."""
    return where.endswith(".py") or "/" in where


def load_module(where: str, what: str) -> ModuleType:
    """The module ``where`` names: imported (``package.module``), or loaded from its file (one
    module per file, however often it is named; a relative path from the current folder).
    ``what`` starts each error, e.g. ``"strategy 'x.py:Mine'"``."""
    if not is_file_spec(where):
        try:
            return importlib.import_module(where)
        except ImportError as exc:
            raise ConfigError(f"{what}: cannot import {where} ({exc}); is it on PYTHONPATH?") from exc
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{what}: no file {path}")
    key = f"scaleot_fed_user_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - whatever the user's file raises, said in one line
        del sys.modules[key]
        raise ConfigError(f"{what}: {path} failed to import: {type(exc).__name__}: {exc}") from exc
    return module


def load_object(spec: str, what: str, how: str = "") -> object:
    """The object ``spec`` (``"where:name"``) names; ``how`` ends the error when it is missing."""
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise ConfigError(f"{what} is not \"module:name\" or \"file.py:name\"" + (f"; {how}" if how else ""))
    found = getattr(load_module(where, what), name, None)
    if found is None:
        raise ConfigError(f"{what}: {where} has no {name!r}" + (f"; {how}" if how else ""))
    return found
