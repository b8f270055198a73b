"""Typed configuration: one dataclass per concern, built from dicts or TOML, unknown keys rejected."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from .errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error naming the valid ones.

    Every value is checked against its field's annotation first (``[run] num_rounds must be an
    integer, got 2.5``), so the dataclass's own ``__post_init__`` only ever sees the right types;
    its range checks (``ValueError``) become a :class:`ConfigError` that says where the value
    came from.
    """
    label = f"[{where}] " if where else ""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label or cls.__name__ + ' '}must be a table of key = value pairs, got {_show(data)}")
    data = _renamed(cls, data, label)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise ConfigError(
            f"{label}unknown key(s) {', '.join(map(str, unknown))} for {cls.__name__}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    hints = _type_hints(cls)
    for name, value in data.items():
        hint = hints.get(name, Any)
        if not _fits(hint, value):
            raise ConfigError(f"{label}{name} must be {_describe(hint)}, got {_show(value)}")
    try:
        return cls(**data)
    except ConfigError as exc:
        if not label or str(exc).startswith((label, f"{where}.", f"{where} ")):
            raise  # already says where (``privacy.mode must be ...``)
        raise type(exc)(f"{label}{exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label}{exc}") from exc


def _renamed(cls: type, data: Mapping[str, Any], label: str) -> Mapping[str, Any]:
    """``data`` with the keys ``cls.RENAMED`` lists (old -> new) under their new names, each
    with a one-line warning; both spelled at once is an error."""
    renamed = getattr(cls, "RENAMED", {})
    found = [old for old in renamed if old in data]
    if not found:
        return data
    data = dict(data)
    for old in found:
        new = renamed[old]
        if new in data:
            raise ConfigError(f"{label}{old} and {new} are one key ({old} is its old name); keep {new}")
        warnings.warn(f"{label}{old} is now called {new}; write {new} = {_show(data[old])}", FutureWarning,
                      stacklevel=3)
        data[new] = data.pop(old)
    return data


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """Field annotations resolved (they are strings under ``from __future__ import annotations``);
    a field whose annotation cannot be resolved is left unchecked."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


def _fits(hint: Any, value: Any) -> bool:
    """Whether ``value`` (from TOML, JSON or the command line) is of type ``hint``."""
    if hint is Any or isinstance(hint, TypeVar):
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an int is a fine float; true is not a number; nan compares with nothing
        return isinstance(value, int | float) and not isinstance(value, bool) and not (
            isinstance(value, float) and math.isnan(value))
    base = origin or hint
    if base is list:
        return isinstance(value, list | tuple) and all(_fits(args[0] if args else Any, v) for v in value)
    if base is dict:
        key, item = args if len(args) == 2 else (Any, Any)
        return isinstance(value, dict) and all(_fits(key, k) and _fits(item, v) for k, v in value.items())
    if isinstance(base, type):
        return isinstance(value, base)
    return True  # an annotation this checker does not know is left to the dataclass


_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans (true or false)"}


def _describe(hint: Any) -> str:
    """``hint`` in words, for the error message: ``an integer``, ``a list of strings``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        text = " or ".join(_describe(a) for a in args if a is not type(None))
        return f"{text} (or unset)" if type(None) in args else text
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "unset"}
    if hint in simple:
        return simple[hint]
    base = origin or hint
    if base is list:
        item = args[0] if args else Any
        return "a list" if item is Any else f"a list of {_PLURAL.get(item) or 'items that are ' + _describe(item)}"
    if base is dict:
        key, item = args if len(args) == 2 else (Any, Any)
        keys = "" if key is Any else f" with {_PLURAL.get(key, _describe(key))} as keys"
        values = "" if item is Any else f" of {_PLURAL.get(item) or 'values that are ' + _describe(item)}"
        return f"a table{values}{keys}"
    if isinstance(base, type):
        return f"a {base.__name__}"
    return str(hint)


def _show(value: Any) -> str:
    """A value as the user wrote it (``true``, ``'three'``, ``2.5``), cut to one short line."""
    text = str(value).lower() if isinstance(value, bool) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def as_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain JSON-able dict."""
    return dataclasses.asdict(obj)
