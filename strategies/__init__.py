"""Flower strategies for offsite-tuning, found by name.

Aggregation is Flower's own (``flwr.serverapp.strategy``); what this package adds is built by
subclassing or wrapping them (:class:`~strategies.lora.FFALoRA`). Node sampling is done by the
server loop (deterministic, by partition), so every strategy is built to take all nodes it is
handed.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

from scaleot_fed.errors import ConfigError

from .lora import FFALoRA, pad_rank, rank_axis, slice_rank

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedavgm": FedAvgM,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "ffa-lora": FFALoRA,
}

# The server loop picks the clients; the strategy aggregates whatever it is handed.
_TAKE_ALL = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                 min_available_nodes=1)


def build_strategy(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """Instantiate strategy ``name`` with its keyword ``params``; clear error on unknown ones."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}")
    params = dict(params or {})
    clash = sorted(set(params) & set(_TAKE_ALL))
    if clash:
        raise ConfigError(f"strategy params {clash} are set by the run ([run] clients_per_round), not the strategy")
    try:
        return STRATEGIES[name](**_TAKE_ALL, **params)
    except TypeError as exc:
        raise ConfigError(f"strategy {name}: {exc}") from exc


__all__ = ["STRATEGIES", "build_strategy", "FFALoRA", "pad_rank", "rank_axis", "slice_rank"]
