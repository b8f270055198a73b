"""LoRA-aware aggregation.

Averaging LoRA factors separately is not averaging the updates: mean(B_i) @ mean(A_i) differs
from mean(B_i @ A_i) as soon as clients' A differ. FFA-LoRA (Sun et al., ICLR 2024) freezes every
A at its shared initial value, so only B trains and mean(B_i) @ A == mean(B_i @ A) exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .requirements import FREEZE_LORA_A, ClientRequirements


class FFALoRA(FedAvg):
    """FedAvg with LoRA's A matrices frozen on the clients (exact aggregation of B @ A).

    Clients read ``config["freeze-lora-a"]`` and train only the B matrices (and any non-LoRA
    trainable tensors, which FedAvg averages as usual). The server checks that every reply
    carries the A it was sent: a client that moved A would make the average inexact.
    """

    # a mean, but not sum-based for SecAgg+: its check that every owner kept A exactly cannot pass
    # through SecAgg+'s quantisation (and local DP's noise would move A too)
    client_requirements = ClientRequirements(mode="lora", freeze_lora_a=True, local_dp=False, sum_based=False)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent_a = {k: v.numpy() for k, v in arrays.items() if "lora_A" in k}
        config[FREEZE_LORA_A] = True
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = getattr(self, "_sent_a", {})
        for msg in replies:
            if msg.has_error():
                continue
            record = msg.content.array_records[self.arrayrecord_key]
            for key, expected in sent.items():
                if not np.array_equal(record[key].numpy(), expected):
                    raise ValueError(
                        f"FFA-LoRA: a data owner changed the frozen {key}; its client must honour '{FREEZE_LORA_A}'"
                    )
        return super().aggregate_train(server_round, replies)


# ----------------------------------------------------------------------------- mixed ranks (HetLoRA)


def rank_axis(name: str) -> int | None:
    """The rank axis of a LoRA factor: rows of A ``(r, in)``, columns of B ``(out, r)``; None for
    any other tensor."""
    if "lora_A" in name:
        return 0
    if "lora_B" in name:
        return 1
    return None


def slice_rank(arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The first ``rank`` components of every LoRA factor (HetLoRA's truncation): the state an
    owner of that rank trains. Other tensors are passed through."""
    out = {}
    for name, value in arrays.items():
        axis = rank_axis(name)
        out[name] = value if axis is None else np.ascontiguousarray(value[:rank] if axis == 0 else value[:, :rank])
    return out


def pad_rank(reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An owner's lower-rank factors brought back to the server's rank.

    B's missing columns are zeros (the owner's own product ``B_i @ A_i`` has none) and A's
    missing rows keep the values the server sent (the owner never saw them), so
    ``pad(B_i) @ pad(A_i) == B_i @ A_i``: averaging padded B under a shared frozen A (FFA-LoRA)
    is exactly the weighted mean of the owners' weight updates, whatever their ranks.
    """
    out = {}
    for name, value in reply.items():
        full, axis = sent[name], rank_axis(name)
        if value.shape == full.shape or axis is None:
            out[name] = value
            continue
        rank = value.shape[axis]
        if value.ndim != 2 or rank > full.shape[axis] or value.shape[1 - axis] != full.shape[1 - axis]:
            raise ValueError(f"{name}: shape {value.shape} is not a rank slice of {full.shape}")
        padded = np.zeros_like(full) if axis == 1 else full.copy()
        if axis == 0:
            padded[:rank] = value
        else:
            padded[:, :rank] = value
        out[name] = padded
    return out
