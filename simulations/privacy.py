"""Differential privacy on the data owners' side and the privacy spent.

The mechanisms' parameters and the strategy wrapper (central DP) are in :mod:`strategies.privacy`;
here are the client mods that clip (central) or clip and noise (local) each owner's update, and
the ledger of epsilon spent round by round.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.serverapp.strategy import Strategy
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

import strategies.privacy
from strategies.privacy import UNIT_WEIGHT, PrivacyConfig, accountant  # noqa: F401  (UNIT_WEIGHT: for the clients)

if TYPE_CHECKING:
    from .config import FedConfig

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
        found = accountant(self.config, population)
        found.compose(GaussianPrivacyEvent(self.config.noise_multiplier, sample, population), releases)
        return found.get_epsilon(self.config.delta)

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
    """The run's strategy and what aggregates (:func:`strategies.privacy.make_strategy` with the run's config)."""
    return strategies.privacy.make_strategy(config.strategy.name, config.strategy.params, config.privacy,
                                            config.run.num_clients, config.run.clients_per_round)
