"""What a strategy asks of the data owners, declared on its class and checked before a run starts.

A strategy may need the owners to train a certain way (FFA-LoRA: LoRA, with every A frozen at its
initial value) or may not work with something the run asks of them (local DP noise on every array
would move FFA-LoRA's frozen A). It says so in ``client_requirements``; the run checks the
declaration against its config before anything starts, and the owners read what they must do from
the train message's config (:data:`CONFIG_KEYS`), never from the strategy's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaleot_fed.errors import ConfigError

FREEZE_LORA_A = "freeze-lora-a"
"""Train-message config key: the owner keeps every LoRA A matrix at the value it was sent."""


@dataclass(frozen=True)
class ClientRequirements:
    """What a strategy requires of the owners' training (the default: nothing)."""

    mode: str | None = None
    """The ``[finetune] mode`` the owners must train in (None: any)."""
    freeze_lora_a: bool = False
    """Owners keep LoRA's A matrices frozen (the strategy sends :data:`FREEZE_LORA_A`)."""
    local_dp: bool = True
    """Whether local DP (noise on every array an owner sends) is compatible."""
    sum_based: bool = False
    """The aggregate is a weighted sum of the replies (a mean), so secure aggregation, which
    reveals only the sum, can compute it."""


def requirements_of(strategy) -> ClientRequirements:
    """The strategy's (class or instance) declared requirements; for Flower's built-ins, whether
    they are sum-based (:data:`strategies.registry.SUM_BASED`); else none."""
    from .registry import SUM_BASED

    found = getattr(strategy, "client_requirements", None)
    if isinstance(found, ClientRequirements):
        return found
    cls = strategy if isinstance(strategy, type) else type(strategy)
    return ClientRequirements(sum_based=cls in SUM_BASED)


def check_requirements(name: str, strategy, mode: str, privacy_mode: str) -> None:
    """Refuse a run whose owners cannot do what strategy ``name`` needs (one line)."""
    needs = requirements_of(strategy)
    if needs.mode is not None and mode != needs.mode:
        raise ConfigError(f"strategy {name} needs [finetune] mode = \"{needs.mode}\"")
    if privacy_mode == "local" and not needs.local_dp:
        raise ConfigError(f"strategy {name} cannot run with [privacy] mode = \"local\" (its noise would change what "
                          "the strategy requires the owners to keep); for DP use central mode, or fedavg / fedprox")
