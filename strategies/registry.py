"""Aggregation strategies by name: Flower's built-ins, this package's own, and a user's own class
from their own code (``"module:Class"`` or ``"path/to/file.py:Class"``), resolved before anything
starts so that a typo is one line at the start, not a failure inside Ray.

The server loop picks the clients of each round (deterministically, by partition); the strategy
aggregates whatever it is handed, so every strategy is built to take all the nodes it is given.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

from scaleot_fed.errors import ConfigError
from scaleot_fed.imports import load_object

from .lora import FFALoRA

BUILTIN: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedavgm": FedAvgM,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "ffa-lora": FFALoRA,
}

SUM_BASED = (FedAvg, FedProx, FedAdam, FedYogi, FedAvgM)
"""Built-ins whose aggregate needs only the (weighted) mean of the replies (the adaptive ones
apply their server optimiser to it): what secure aggregation, which reveals only the sum, allows."""

TAKE_ALL = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                min_available_nodes=1)
"""Sampling arguments every strategy is built with: the server loop has already chosen the nodes."""

HOW = ('name a built-in ({builtin}), or your own Flower Strategy subclass as "package.module:Class" or '
       '"path/to/file.py:Class"')


def check_strategy_name(name: str) -> None:
    """Refuse a name that is neither a built-in nor ``"module:Class"`` / ``"file.py:Class"``,
    importing nothing: what every process that reads a run's config (the data owners' too, which
    never have the model owner's strategy code) can check."""
    if name in BUILTIN:
        return
    how = HOW.format(builtin=", ".join(BUILTIN))
    if ":" not in name:
        raise ConfigError(f"unknown strategy {name!r}; {how}")
    where, _, attr = name.rpartition(":")
    if not where or not attr.isidentifier():
        raise ConfigError(f"strategy {name!r} is not \"module:Class\" or \"file.py:Class\"; {how}")


def resolve_strategy(name: str) -> type[Strategy]:
    """The strategy class ``name`` stands for (importing a user's module or file once).

    Raises
    ------
    ConfigError
        Unknown built-in, a module or file that cannot be imported, no such class, or a class
        that is not a Flower ``Strategy``: one line naming what to fix.
    """
    check_strategy_name(name)
    if name in BUILTIN:
        return BUILTIN[name]
    cls = load_object(name, f"strategy {name!r}", HOW.format(builtin=", ".join(BUILTIN)))
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"strategy {name!r}: {name.rpartition(':')[2]} is not a subclass of "
                          "flwr.serverapp.strategy.Strategy (subclass FedAvg, or another Flower strategy, "
                          "and override what you change)")
    return cls


def build_strategy(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """Instantiate strategy ``name`` with its keyword ``params``; clear error on unknown ones."""
    cls = resolve_strategy(name)
    params = dict(params or {})
    clash = sorted(set(params) & set(TAKE_ALL))
    if clash:
        raise ConfigError(f"strategy params {clash} are set by the run ([run] clients_per_round), not the strategy")
    try:
        return cls(**TAKE_ALL, **params)
    except TypeError as exc:
        raise ConfigError(f"strategy {name}: {exc}") from exc
