"""Emulator strategies by name: the built-in ones, and any a user registers from their own code."""

from __future__ import annotations

from ..errors import ConfigError
from .crash import CRaSh
from .importance_drop import ImportanceDrop
from .scaleot import ScaleOT
from .strategy import EmulatorStrategy
from .uniform_drop import UniformDrop

REGISTRY: dict[str, EmulatorStrategy] = {
    "scaleot": ScaleOT(),
    "importance-drop": ImportanceDrop(),
    "uniform-drop": UniformDrop(),
    "crash": CRaSh(),
}


def register_strategy(strategy: EmulatorStrategy) -> EmulatorStrategy:
    """Make ``strategy`` available by its ``name`` (an ``[[emulator]] strategy`` value, the CLI's
    ``--strategy``). Refused when the name is taken by another strategy."""
    if not isinstance(strategy, EmulatorStrategy) or not strategy.name:
        raise ConfigError(f"an emulator strategy is an EmulatorStrategy with a name; got {strategy!r}")
    if strategy.name in REGISTRY and type(REGISTRY[strategy.name]) is not type(strategy):
        raise ConfigError(f"emulator strategy {strategy.name!r} is already registered "
                          f"({type(REGISTRY[strategy.name]).__name__}); choose another name")
    REGISTRY[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> EmulatorStrategy:
    if name not in REGISTRY:
        raise ConfigError(f"unknown emulator strategy {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def strategy_names() -> list[str]:
    return list(REGISTRY)
