"""Differential privacy for the data owners' updates.

The mechanisms are Flower's: with ``mode = "central"`` every owner clips its update
(``fixedclipping_mod``) and the server adds Gaussian noise to the average
(``DifferentialPrivacyClientSideFixedClipping``, which wraps the run's strategy); with
``mode = "local"`` every owner clips and noises its own update before it leaves
(``LocalDpMod``), so the server never sees an un-noised update. The privacy spent is counted by
Flower's ``RdpAccountant`` (Google's ``dp-accounting``, Renyi DP), client-level, without
credit for sampling (the server's client choice is deterministic, not a secret random draw).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, Strategy
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting import PrivacyConfig as _AccountingConfig
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from scaleot_fed.errors import ConfigError
from strategies import STRATEGIES, build_strategy

if TYPE_CHECKING:
    from .config import FedConfig

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


def _accountant(config: PrivacyConfig, population: int) -> RdpAccountant:
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
    accountant = _accountant(config, num_clients) if config.noise_multiplier > 0 else None
    return DifferentialPrivacyClientSideFixedClipping(strategy, config.noise_multiplier, config.clipping_norm,
                                                      clients_per_round, accountant=accountant)


class PrivacyLedger:
    """Epsilon after every round, from the accountant; rebuilt from the round history on resume
    (one release per round centrally, one per participation for each owner locally)."""

    def __init__(self, config: PrivacyConfig, num_clients: int) -> None:
        self.config = config
        self.num_clients = num_clients

    def _epsilon(self, releases: int, sample: int, population: int) -> float:
        if releases == 0:
            return 0.0
        if self.config.noise_multiplier == 0:
            return math.inf
        accountant = _accountant(self.config, population)
        accountant.compose(GaussianPrivacyEvent(self.config.noise_multiplier, sample, population), releases)
        return accountant.get_epsilon(self.config.delta)

    def after_round(self, history: list[dict], participants: list[int]) -> dict:
        """``epsilon`` (spent so far, by the worst-off owner) and ``epsilon_round`` (one round)."""
        if not self.config.enabled:
            return {}
        if self.config.mode == "central":
            releases = len(history) + 1
            sample, population = len(participants), self.num_clients
        else:
            counts = {p: 1 for p in participants}
            for row in history:
                for p in row["clients"]:
                    counts[p] = counts.get(p, 0) + 1
            releases, sample, population = max(counts.values()), 1, 1
        return {"epsilon": self._epsilon(releases, sample, population),
                "epsilon_round": self._epsilon(1, sample, population), "delta": self.config.delta}

    def report(self, history: list[dict]) -> dict:
        """The ``privacy`` block of ``metrics.json``."""
        spent = history[-1].get("epsilon", 0.0) if history else 0.0
        return {"mode": self.config.mode, "noise_multiplier": self.config.noise_multiplier,
                "clipping_norm": self.config.clipping_norm, "delta": self.config.delta, "epsilon": spent,
                "level": "client (one owner's whole data)", "accountant": "Renyi DP (Flower RdpAccountant / dp-accounting), "
                "no sampling amplification"}


def local_dp_mod(config: PrivacyConfig) -> LocalDpMod:
    """Flower's ``LocalDpMod`` with noise std ``noise_multiplier * clipping_norm`` (it takes an
    (epsilon, delta) and uses the classic Gaussian calibration, so we invert that calibration;
    the epsilon we report comes from the RDP accountant, not from this number)."""
    epsilon = math.sqrt(2 * math.log(1.25 / config.delta)) / config.noise_multiplier \
        if config.noise_multiplier > 0 else math.inf
    return LocalDpMod(config.clipping_norm, config.clipping_norm, epsilon, config.delta)


NODE_NOISE_KEY = "local-dp-noise-multiplier"
NODE_CLIP_KEY = "local-dp-clipping-norm"


def dp_mod(privacy_of):
    """A train-only client mod that applies the run's DP mechanism: ``privacy_of(msg)`` gives the
    :class:`PrivacyConfig` the message carries (the run config is in every train message).

    A data owner can also impose local DP itself, whatever the server asks, with the node-config
    keys ``local-dp-noise-multiplier`` and ``local-dp-clipping-norm``.
    """

    def mod(msg: Message, context: Context, call_next) -> Message:
        config = privacy_of(msg)
        if NODE_NOISE_KEY in context.node_config:
            config = PrivacyConfig("local", float(context.node_config[NODE_NOISE_KEY]),
                                   float(context.node_config.get(NODE_CLIP_KEY, config.clipping_norm)), config.delta)
        if config.mode == "central":
            return fixedclipping_mod(msg, context, call_next)
        if config.mode == "local":
            return local_dp_mod(config)(msg, context, call_next)
        return call_next(msg, context)

    return mod


def make_strategy(config: FedConfig) -> tuple[Strategy, Strategy]:
    """The run's strategy and what aggregates (the same, or Flower's DP wrapper around it).

    Under differential privacy owners are averaged with equal weights (a weight from the data
    size would change the average's sensitivity), so the strategy weighs by :data:`UNIT_WEIGHT`.
    """
    params = dict(config.strategy.params)
    if config.privacy.enabled:
        if params.get("weighted_by_key", UNIT_WEIGHT) != UNIT_WEIGHT:
            raise ConfigError("[privacy] averages owners with equal weights; remove strategy.params.weighted_by_key")
        if "weighted_by_key" in inspect.signature(STRATEGIES[config.strategy.name]).parameters:
            params["weighted_by_key"] = UNIT_WEIGHT
    base = build_strategy(config.strategy.name, params)
    return base, wrap_strategy(base, config.privacy, config.run.num_clients, config.run.clients_per_round)
