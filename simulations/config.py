"""Federated run configuration: one dataclass per TOML table, unknown keys rejected.

A run file has ``[run]``, ``[partition]``, ``[strategy]``, ``[finetune]``, ``[emulator]``,
``[layer_replace]``, ``[owners]``, ``[realign]``, ``[privacy]``, ``[secure_aggregation]``, ``[attack]`` and
``[tracking]``.
The resolved configuration is written into every run folder and sent to clients with each
message, so the two ways to run (``scaleot-fed simulate`` and ``flwr run .``) behave the same.
Failures for drills are not configured here: a client mod injects them (``tests/faults.py``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaleot_fed.attack import AttackConfig
from scaleot_fed.config import as_dict, from_dict, load_toml
from scaleot_fed.errors import ConfigError
from scaleot_fed.finetune import FinetuneConfig
from scaleot_fed.layer_replace import LayerReplaceConfig
from scaleot_fed.realign import RealignConfig
from scaleot_fed.single_owner import NamedEmulatorConfig, TaskRunConfig
from scaleot_fed.tracking import TrackingConfig

from .owners import OwnersConfig
from .privacy import PrivacyConfig
from .secure import SecureAggregationConfig

PARTITIONERS = ("iid", "label-skew", "task", "topic", "natural")
RENAMED_PARTITIONERS = {
    "dirichlet": "kind = \"label-skew\" (the same Dirichlet over `by`)",
    "pathological": "kind = \"label-skew\" with classes_per_client = N",
}


@dataclass
class RunConfig(TaskRunConfig):
    """``[run]``: the federation and its budget (model, task and item counts: :class:`TaskRunConfig`)."""

    out: str = "runs/federated"
    eval_batch_size: int = 16
    seed: int = 0
    num_rounds: int = 3
    num_clients: int = 8
    """Data owners (Flower SuperNodes); each gets one partition of the task's train split."""
    clients_per_round: int = 4
    fraction_per_round: float | None = None
    """When set, overrides ``clients_per_round`` with ``max(1, round(fraction * num_clients))``."""
    min_successful_clients: int = 1
    """A round with fewer successful clients stops the run with an error (weights are never
    silently kept)."""
    client_val_fraction: float = 0.1
    """Share of each client's partition held out as its local validation split."""
    eval_every: int = 1
    client_eval: bool = True
    """Send the new aggregate to the round's clients for an emulator-side validation loss (doubles
    the bytes sent down); off: report the clients' own post-training validation loss instead."""
    final_table: bool = True
    """At the end: the five-row table (full / emulator zero-shot, emulator FT, plug-in)."""
    save_plugged: bool = True
    """With the final table, write the plugged-in model to ``plugged/`` (a full copy of the model:
    0.5 GB for SmolLM2-135M). A study's federations turn it off: they keep rows and the aggregate,
    and a sweep of dozens of runs would otherwise fill the disk with models no one loads."""
    centralised_full_finetune: bool = False
    """Also fine-tune the full model centrally on the pooled client data (the Full FT row)."""
    attack: bool = False
    """Add the model-privacy row to the final table: the owners' pooled data trains every
    emulator weight (``[attack]``), compared with the plug-in model."""
    centralised_offsite: bool = False
    """Also fine-tune the emulator centrally on the pooled client data and plug that in: the same
    data without federation, a second entry (``centralised``) in the final table."""
    client_num_cpus: float = 1.0
    client_num_gpus: float = 0.0
    ray_address: str | None = None
    """Attach to an existing Ray cluster instead of starting one on this machine."""
    round_timeout: float = 3600.0
    """Seconds the server waits for a round's replies (train, then evaluate); owners that have not
    answered by then are dropped from that round (logged, listed in the round's ``timed_out``)."""
    per_owner_eval: bool = False
    """Every evaluation round, also score the plug-in on each owner's held-out split (a simulation
    knows the partitions; a deployment's model owner does not): ``per_owner`` tables in
    ``metrics.json`` and ``results.json``, with the mean, worst owner and spread per round."""
    per_owner_items: int | None = 50
    """Items of each owner's held-out split scored by ``per_owner_eval`` (None: all)."""
    emulator_eval: bool = False
    """Every evaluation round, also score the emulator with the aggregate (``emulator_acc``): the
    emulator-vs-plug-in gap per round (what ``[realign]`` changes)."""
    per_owner_local: bool = False
    """Owners also score their own local adapters on the emulator (after local training, on their
    held-out split): the personalised baseline, in the ``per_owner`` table as ``local_acc``."""
    private_blocks: list[int] = field(default_factory=list)
    """Blocks of the full model that must never leave the model owner, in any form (exact or
    compressed): a run whose emulator would carry one is refused before anything is sent."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_rounds()
        self._check_resources()

    def _check_rounds(self) -> None:
        """The federation's shape: rounds, owners, how many train each round."""
        if self.num_rounds < 1:
            raise ConfigError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if self.num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {self.num_clients}")
        if self.fraction_per_round is not None:
            if not 0.0 < self.fraction_per_round <= 1.0:
                raise ConfigError(f"fraction_per_round must be in (0, 1], got {self.fraction_per_round}")
            self.clients_per_round = max(1, round(self.fraction_per_round * self.num_clients))
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise ConfigError(
                f"clients_per_round must be between 1 and num_clients={self.num_clients}, got {self.clients_per_round}"
            )
        if not 1 <= self.min_successful_clients <= self.clients_per_round:
            raise ConfigError(
                f"min_successful_clients must be between 1 and clients_per_round={self.clients_per_round}, "
                f"got {self.min_successful_clients}"
            )
        if not 0.0 < self.client_val_fraction < 1.0:
            raise ConfigError(f"client_val_fraction must be in (0, 1), got {self.client_val_fraction}")
        if self.eval_every < 1:
            raise ConfigError(f"eval_every must be >= 1, got {self.eval_every}")

    def _check_resources(self) -> None:
        """What each owner's process may use, how long a round may take, what stays private."""
        if self.client_num_cpus <= 0:
            raise ConfigError(f"client_num_cpus must be > 0, got {self.client_num_cpus}")
        if self.client_num_gpus < 0:
            raise ConfigError(f"client_num_gpus must be >= 0, got {self.client_num_gpus}")
        if self.round_timeout <= 0:
            raise ConfigError(f"round_timeout must be > 0 seconds, got {self.round_timeout}")
        if self.per_owner_items is not None and self.per_owner_items < 1:
            raise ConfigError(f"per_owner_items must be >= 1 (or absent: all), got {self.per_owner_items}")
        if any(not isinstance(b, int) or b < 0 for b in self.private_blocks):
            raise ConfigError(f"private_blocks must be block indices (integers >= 0), got {self.private_blocks}")


@dataclass
class PartitionConfig:
    """``[partition]``: how the task's train split is cut among the owners, named by what is
    skewed (Flower Datasets partitioners where they exist).

    * ``iid``: contiguous near-equal shards, nothing skewed;
    * ``label-skew``: a Dirichlet over ``by`` (default ``gold``, the answer index) per owner, or
      ``classes_per_client`` distinct values each (the pathological split);
    * ``task``: owners hold different tasks of a mixture (``[run] task = "piqa+arc_easy"``):
      ``tasks`` names each owner's tasks, or a Dirichlet with ``alpha`` draws the mixtures;
    * ``topic``: a Dirichlet with ``alpha`` over any content field ``by`` (HellaSwag's
      ``activity_label``, ARC's exam ``source``, a user file's column);
    * ``natural``: one owner per value of ``by`` (``num_clients`` = the number of values).
    """

    kind: str = "iid"
    by: str | None = None
    """The item field that is skewed: ``gold`` (label-skew's default), ``num_choices``, ``task``
    (``kind = "task"``) or a content field (``topic`` and ``natural`` need one)."""
    alpha: float = 0.5
    """Dirichlet concentration (smaller = more skewed)."""
    classes_per_client: int | None = None
    """label-skew only: each owner holds this many distinct values of ``by`` instead of a Dirichlet draw."""
    tasks: list[list[str]] = field(default_factory=list)
    """task only: each owner's tasks (one list per owner); a task's items are split evenly among the
    owners that hold it. Empty: a Dirichlet over tasks with ``alpha``."""
    min_partition_size: int = 2
    """Dirichlet kinds: draws are repeated (up to 110) until every owner holds this many items."""

    def __post_init__(self) -> None:
        if self.kind in RENAMED_PARTITIONERS:
            raise ConfigError(f"partition kind {self.kind!r} is now spelled {RENAMED_PARTITIONERS[self.kind]}")
        if self.kind not in PARTITIONERS:
            raise ConfigError(f"unknown partition kind {self.kind!r}; choose one of {', '.join(PARTITIONERS)}")
        if self.kind in ("topic", "natural") and not self.by:
            raise ConfigError(f"partition kind {self.kind!r} needs `by`, the content field to split on "
                              "(e.g. \"activity_label\" for HellaSwag, \"source\" for ARC)")
        if self.kind == "task" and self.by not in (None, "task"):
            raise ConfigError(f"partition kind \"task\" splits on the task field; remove by = {self.by!r} "
                              "(or use kind = \"topic\")")
        if self.tasks and self.kind != "task":
            raise ConfigError("partition.tasks assigns tasks to owners: it needs kind = \"task\"")
        if any(not isinstance(t, list) or not t or not all(isinstance(x, str) for x in t) for t in self.tasks):
            raise ConfigError(f"partition.tasks lists each owner's tasks, e.g. [[\"piqa\"], [\"arc_easy\"]]; "
                              f"got {self.tasks}")
        if self.classes_per_client is not None:
            if self.kind != "label-skew":
                raise ConfigError("classes_per_client is the pathological label skew: it needs kind = \"label-skew\"")
            if self.classes_per_client < 1:
                raise ConfigError(f"classes_per_client must be >= 1, got {self.classes_per_client}")
        if self.alpha <= 0:
            raise ConfigError(f"partition alpha must be > 0, got {self.alpha}")
        if self.min_partition_size < 1:
            raise ConfigError(f"min_partition_size must be >= 1, got {self.min_partition_size}")

    @property
    def split_field(self) -> str:
        """The item field this partition skews (``gold`` for iid: what its plot shows)."""
        return "task" if self.kind == "task" else (self.by or "gold")


@dataclass
class StrategyConfig:
    """``[strategy]``: aggregation by name plus the Flower strategy's own keyword arguments."""

    name: str = "fedavg"
    """A built-in (``fedavg``, ``fedprox``, ``fedadam``, ``ffa-lora``, ...), or your own Flower
    Strategy subclass as ``"package.module:Class"`` or ``"path/to/file.py:Class"`` (a relative
    path from where the command runs; ``docs/strategies.md``)."""
    params: dict[str, Any] = field(default_factory=dict)
    """E.g. ``proximal_mu`` (fedprox), ``eta``/``beta_1``/``tau`` (fedadam, fedyogi),
    ``server_learning_rate``/``server_momentum`` (fedavgm), ``beta`` (fedtrimmedavg),
    ``num_malicious_nodes`` (krum)."""

    def __post_init__(self) -> None:
        from strategies import check_strategy_name

        # the name's form only: a user's class is imported by the model owner before anything
        # starts (runner.validate); data owners read this config too and never have that code
        check_strategy_name(self.name)


def check_secure_strategy(name: str, strategy) -> None:
    """SecAgg+ reveals only the sum: the strategy must aggregate from the mean alone."""
    from strategies import requirements_of

    if not requirements_of(strategy).sum_based:
        raise ConfigError(f"[secure_aggregation] reveals only the sum of the owners' updates, and strategy {name!r} "
                          "needs each one (it is not sum-based); use fedavg, fedprox, fedadam, fedyogi or fedavgm")


@dataclass
class FedConfig:
    """A simulation's whole config, one section per concern.

    A key added to a section gets the default that keeps what runs did before it existed: saved
    configs (checkpoints, a study's federation records) are compared with today's after filling
    the keys they lack with these defaults (:func:`simulations.resume.saved_in_todays_keys`).
    """

    run: RunConfig = field(default_factory=RunConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(steps=20, select_best=False))
    emulator: NamedEmulatorConfig = field(default_factory=lambda: NamedEmulatorConfig(name="emulator"))
    layer_replace: LayerReplaceConfig = field(default_factory=LayerReplaceConfig)
    owners: OwnersConfig = field(default_factory=OwnersConfig)
    realign: RealignConfig = field(default_factory=RealignConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.secure_aggregation.enabled:
            from strategies import BUILTIN

            if self.strategy.name in BUILTIN:  # (a user's class: checked where it is imported, runner.validate)
                check_secure_strategy(self.strategy.name, BUILTIN[self.strategy.name])
            if self.privacy.enabled:
                raise ConfigError("[secure_aggregation] and [privacy] cannot be combined yet; choose one")
            if self.run.clients_per_round < 2:
                raise ConfigError("[secure_aggregation] needs clients_per_round >= 2 (a sum of one is that update)")
        self.owners.check(self.run.num_clients, self.finetune)
        if (self.owners.lengths() or self.realign.enabled) and self.secure_aggregation.enabled:
            raise ConfigError("[owners] settings and [realign] updates are not carried by SecAgg+ rounds yet; "
                              "remove them or [secure_aggregation]")
        if self.partition.tasks and len(self.partition.tasks) != self.run.num_clients:
            raise ConfigError(f"partition.tasks has {len(self.partition.tasks)} owners' task lists for "
                              f"num_clients={self.run.num_clients}; give one list per owner")

    def to_json(self) -> str:
        return json.dumps(as_dict(self), sort_keys=True)


_SECTIONS = {
    "run": RunConfig,
    "partition": PartitionConfig,
    "strategy": StrategyConfig,
    "finetune": FinetuneConfig,
    "emulator": NamedEmulatorConfig,
    "layer_replace": LayerReplaceConfig,
    "owners": OwnersConfig,
    "realign": RealignConfig,
    "privacy": PrivacyConfig,
    "secure_aggregation": SecureAggregationConfig,
    "attack": AttackConfig,
    "tracking": TrackingConfig,
}


def fed_config_from_dict(data: dict, where: str = "config") -> FedConfig:
    """Build a :class:`FedConfig` from nested tables (TOML or JSON)."""
    if "debug" in data:
        raise ConfigError(f"{where}: [debug] was removed: failures are injected by the tests' client mod "
                          "(tests/faults.py, named in $SCALEOT_FED_CLIENT_MODS); remove the table")
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}; valid: {', '.join(_SECTIONS)}")
    kwargs = {}
    for name, cls in _SECTIONS.items():
        values = data.get(name, {})
        values = dict(values) if isinstance(values, dict) else values  # not a table: from_dict says so
        if name == "finetune" and isinstance(values, dict):
            values.setdefault("select_best", False)  # clients send their last state, not a past one
            values.setdefault("steps", 20)
        if name == "emulator" and isinstance(values, dict):
            values.setdefault("name", "emulator")
        kwargs[name] = from_dict(cls, values, name)
    return FedConfig(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` (nested tables) with ``section.key`` -> value overrides applied (in place)."""
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted!r} must look like section.key=value")
        data.setdefault(section, {})[key] = value
    return data


def load_fed_config(path: str | Path, overrides: dict[str, Any] | None = None) -> FedConfig:
    """Read a run file; ``overrides`` maps ``section.key`` to a value (command-line overrides)."""
    return fed_config_from_dict(apply_overrides(load_toml(path), overrides or {}), str(path))


def fed_config_from_json(text: str) -> FedConfig:
    return fed_config_from_dict(json.loads(text), "resolved config")


def with_run(config: FedConfig, **changes) -> FedConfig:
    """A copy with ``[run]`` fields changed (validated again)."""
    return dataclasses.replace(config, run=dataclasses.replace(config.run, **changes))
