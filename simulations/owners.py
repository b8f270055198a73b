"""Owners that differ: their own fine-tuning settings (``[owners]``), the messages that carry
them, mixed-rank LoRA replies brought back to the server's rank, and scores per owner."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from torch import nn

from scaleot_fed.errors import ConfigError
from scaleot_fed.evaluate import accuracy_from_scores, item_record, score_items
from scaleot_fed.finetune import FinetuneConfig
from scaleot_fed.tasks import MCItem
from strategies import slice_rank

if TYPE_CHECKING:
    from .config import FedConfig

OWNER_ASSIGN = ("per-owner", "tiers")
OWNER_SETTINGS = ("lora_r", "steps", "batch_size")


@dataclass
class OwnersConfig:
    """``[owners]``: owners that differ in compute. Each non-empty list sets one fine-tuning knob per
    owner (``assign = "per-owner"``: one entry per owner) or per tier (``assign = "tiers"``: every
    owner draws a tier with the run's seed, weighted by ``tier_weights``; tier k takes entry k of
    every list). Empty lists leave ``[finetune]``'s value to every owner.

    ``lora_r`` is each owner's LoRA rank, at most ``[finetune] lora_r`` (the server's rank): owners
    train the first ranks of the shared factors (HetLoRA) at the server's scaling, and the server
    pads their factors back before aggregation (:func:`strategies.lora.pad_rank`).
    """

    assign: str = "per-owner"
    lora_r: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    tier_weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.assign not in OWNER_ASSIGN:
            raise ConfigError(f"owners.assign must be one of {', '.join(OWNER_ASSIGN)}, got {self.assign!r}")
        for name in OWNER_SETTINGS:
            values = getattr(self, name)
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
                raise ConfigError(f"owners.{name} must be a list of integers >= 1, got {values}")
        if self.tier_weights:
            if self.assign != "tiers":
                raise ConfigError("owners.tier_weights weighs tiers: it needs assign = \"tiers\"")
            if any(w < 0 for w in self.tier_weights) or sum(self.tier_weights) <= 0:
                raise ConfigError(f"owners.tier_weights must be >= 0 with a positive sum, got {self.tier_weights}")

    def lengths(self) -> set[int]:
        """The lengths of the non-empty lists (one, when they agree)."""
        return {len(getattr(self, n)) for n in OWNER_SETTINGS if getattr(self, n)}

    def check(self, num_clients: int, finetune: FinetuneConfig) -> None:
        """Errors that need the rest of the run: list lengths, ranks above the server's."""
        lengths = self.lengths()
        if self.assign == "per-owner" and lengths - {num_clients}:
            raise ConfigError(f"[owners] lists need one entry per owner (num_clients={num_clients}), got lengths "
                              f"{sorted(lengths)}; or set assign = \"tiers\"")
        if self.assign == "tiers":
            tiers = lengths | ({len(self.tier_weights)} if self.tier_weights else set())
            if len(tiers) > 1:
                raise ConfigError(f"[owners] tier lists (and tier_weights) must have one length, got {sorted(tiers)}")
        if self.lora_r:
            if finetune.mode != "lora":
                raise ConfigError(f"owners.lora_r sets LoRA ranks, but [finetune] mode = {finetune.mode!r}")
            if max(self.lora_r) > finetune.lora_r:
                raise ConfigError(f"owners.lora_r goes up to {max(self.lora_r)}, above the server's rank "
                                  f"[finetune] lora_r = {finetune.lora_r}; raise lora_r to the largest owner rank")

    def settings(self, owner: int, seed: int) -> dict[str, int]:
        """Owner ``owner``'s own values (``lora_r``, ``steps``, ``batch_size``; only those set)."""
        lengths = self.lengths()
        if not lengths:
            return {}
        if self.assign == "per-owner":
            k = owner
        else:
            n = lengths.pop()
            k = random.Random(f"{seed}-tier-{owner}").choices(range(n), weights=self.tier_weights or None)[0]
        return {name: getattr(self, name)[k] for name in OWNER_SETTINGS if getattr(self, name)}


def personalise(config: FedConfig, node_to_partition: dict[int, int], messages: list[Message]) -> list[Message]:
    """Every owner's own ``[owners]`` settings into its message (``owner-<setting>`` config keys),
    with its rank slice of the LoRA factors: an owner of a lower rank receives, trains and returns
    only its ranks (HetLoRA)."""
    if not config.owners.lengths():
        return messages
    for msg in messages:
        settings = config.owners.settings(node_to_partition[msg.metadata.dst_node_id], config.run.seed)
        content = msg.content
        record = ConfigRecord(dict(content["config"]))  # the strategy shares one record among messages
        record.update({f"owner-{k.replace('_', '-')}": v for k, v in settings.items()})
        arrays = content["arrays"]
        if "lora_r" in settings:
            sliced = slice_rank({n: a.numpy() for n, a in arrays.items()}, settings["lora_r"])
            arrays = ArrayRecord({n: Array(v) for n, v in sliced.items()})
        msg.content = type(content)(dict(content.items()) | {"config": record, "arrays": arrays})
    return messages


def expected_state(arrays: ArrayRecord, config: FedConfig, owner: int | None) -> dict:
    """The tensors (their shapes) owner ``owner`` must send back: its rank slice of ``arrays``."""
    state = {n: v.numpy() for n, v in arrays.items()}
    rank = config.owners.settings(owner, config.run.seed).get("lora_r") if owner is not None and owner >= 0 else None
    return slice_rank(state, rank) if rank is not None else state


def owner_eval_items(config: FedConfig) -> dict[int, list[MCItem]]:
    """Each owner's held-out items that ``[run] per_owner_eval`` scores (first ``per_owner_items``)."""
    from .partition import client_data

    run = config.run
    if not run.per_owner_eval:
        return {}
    return {p: client_data(config, p, run.num_clients)[1][:run.per_owner_items] for p in range(run.num_clients)}


def score_with_owners(model: nn.Module, tokenizer, items: list[MCItem], owners: dict[int, list[MCItem]],
                      batch_size: int) -> tuple[dict, dict[int, dict]]:
    """Scores on ``items`` (with their per-item record under ``items``, and each owner's under
    ``owners``, for per-owner intervals), and per owner on its own items, from one pass over all."""
    everything = list(items) + [i for part in owners.values() for i in part]
    scores = score_items(model, tokenizer, everything, batch_size=batch_size)
    overall = accuracy_from_scores(items, scores[:len(items)]) | {"items": item_record(items, scores[:len(items)])}
    per_owner, start = {}, len(items)
    for owner, part in owners.items():
        metrics = accuracy_from_scores(part, scores[start:start + len(part)])
        per_owner[owner] = {"plug_in_acc": metrics["acc"], "plug_in_acc_norm": metrics["acc_norm"], "n": metrics["n"]}
        overall.setdefault("owners", {})[str(owner)] = item_record(part, scores[start:start + len(part)])
        start += len(part)
    return overall, per_owner


def owner_finetune(config: FedConfig, cfg: ConfigRecord) -> FinetuneConfig:
    """``[finetune]`` with this owner's own settings, as the server's message gives them
    (``[owners]``). A lower LoRA rank keeps the server's scaling ``lora_alpha / lora_r``, so the
    owner's factors are the first ranks of the server's (HetLoRA)."""
    ft, changes = config.finetune, {}
    if "owner-lora-r" in cfg:
        rank = int(cfg["owner-lora-r"])
        changes |= {"lora_r": rank, "lora_alpha": ft.lora_alpha * rank / ft.lora_r}
    if "owner-steps" in cfg:
        changes["steps"] = int(cfg["owner-steps"])
    if "owner-batch-size" in cfg:
        changes["batch_size"] = int(cfg["owner-batch-size"])
    return dataclasses.replace(ft, **changes) if changes else ft
