"""Differential privacy as a wrapper around the run's strategy (central DP), and the strategy a
run aggregates with.

With ``mode = "central"`` every owner clips its update (``fixedclipping_mod``, on the clients)
and Flower's ``DifferentialPrivacyClientSideFixedClipping`` wraps the strategy to add Gaussian
noise to the average; with ``mode = "local"`` every owner clips and noises its own update before
it leaves (``LocalDpMod``), and the strategy is not wrapped. Either way owners are averaged with
equal weights (:data:`UNIT_WEIGHT`). The privacy spent is counted by Flower's ``RdpAccountant``
(Google's ``dp-accounting``, Renyi DP), client-level, without credit for sampling (the server's
client choice is deterministic, not a secret random draw).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, Strategy
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod
from flwr.supercore.privacy_accounting import PrivacyConfig as _AccountingConfig
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from scaleot_fed.errors import ConfigError

from .registry import build_strategy, resolve_strategy

MODES = ("none", "central", "local")

# Every owner reports this metric as 1: DP averaging must not weight owners by their (private)
# data size, or the sensitivity of the average is no longer clipping_norm / clients.
UNIT_WEIGHT = "unit-weight"


@dataclass
class PrivacyConfig:
    """``[privacy]``: differential privacy of the data owners' updates (client level).

    The noise's standard deviation is ``noise_multiplier * clipping_norm`` on each sum of clipped
    updates (central) or on each owner's update (local).
    """

    mode: str = "none"
    noise_multiplier: float = 0.0
    clipping_norm: float = 1.0
    """L2 bound on one owner's update (the change of its trainable state in one round)."""
    delta: float = 1e-5
    """The delta at which epsilon is reported (keep it below 1 / number of owners)."""
    max_epsilon: float | None = None
    """Central mode: stop (with an error) before a round that would spend more than this."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"privacy.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"privacy.noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}")
        if not self.clipping_norm > 0:
            raise ConfigError(f"privacy.clipping_norm must be > 0, got {self.clipping_norm}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta}")
        if self.max_epsilon is not None and self.max_epsilon <= 0:
            raise ConfigError(f"privacy.max_epsilon must be > 0, got {self.max_epsilon}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def accountant(config: PrivacyConfig, population: int) -> RdpAccountant:
    """Flower's RDP accountant for ``population`` owners at the config's delta (and epsilon cap)."""
    return RdpAccountant(_AccountingConfig(
        target_delta=config.delta, population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=config.max_epsilon))


def wrap_strategy(strategy: Strategy, config: PrivacyConfig, num_clients: int, clients_per_round: int) -> Strategy:
    """Central DP: Flower's client-side fixed-clipping wrapper around ``strategy`` (with its own
    accountant when there is noise to account for); other modes return ``strategy`` unchanged."""
    if config.mode != "central":
        return strategy
    if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train is not FedAvg.aggregate_train:
        raise ConfigError("[privacy] mode = \"central\" needs a plain averaging strategy (fedavg, fedprox); "
                         f"got {type(strategy).__name__}")
    found = accountant(config, num_clients) if config.noise_multiplier > 0 else None
    return DifferentialPrivacyClientSideFixedClipping(strategy, config.noise_multiplier, config.clipping_norm,
                                                      clients_per_round, accountant=found)


def make_strategy(name: str, params: dict[str, Any], privacy: PrivacyConfig, num_clients: int,
                  clients_per_round: int) -> tuple[Strategy, Strategy]:
    """The run's strategy and what aggregates (the same, or Flower's DP wrapper around it).

    Under differential privacy owners are averaged with equal weights (a weight from the data
    size would change the average's sensitivity), so the strategy weighs by :data:`UNIT_WEIGHT`.
    """
    params = dict(params)
    if privacy.enabled:
        if params.get("weighted_by_key", UNIT_WEIGHT) != UNIT_WEIGHT:
            raise ConfigError("[privacy] averages owners with equal weights; remove strategy.params.weighted_by_key")
        if "weighted_by_key" in inspect.signature(resolve_strategy(name)).parameters:
            params["weighted_by_key"] = UNIT_WEIGHT
    base = build_strategy(name, params)
    return base, wrap_strategy(base, privacy, num_clients, clients_per_round)
