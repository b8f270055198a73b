"""Typed configuration: one dataclass per concern, built from dicts or TOML, unknown keys rejected."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from .errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error naming the valid ones.

    Validation of values is the dataclass's own ``__post_init__``; its ``ValueError`` becomes a
    :class:`ConfigError` that says where the value came from.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    label = f"[{where}] " if where else ""
    if unknown:
        raise ConfigError(
            f"{label}unknown key(s) {', '.join(unknown)} for {cls.__name__}; valid keys: {', '.join(sorted(names))}"
        )
    try:
        return cls(**data)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label}{exc}") from exc


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
