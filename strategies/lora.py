"""LoRA-aware aggregation.

Averaging LoRA factors separately is not averaging the updates: mean(B_i) @ mean(A_i) differs
from mean(B_i @ A_i) as soon as clients' A differ. FFA-LoRA (Sun et al., ICLR 2024) freezes every
A at its shared initial value, so only B trains and mean(B_i) @ A == mean(B_i @ A) exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

FREEZE_A_KEY = "freeze-lora-a"


class FFALoRA(FedAvg):
    """FedAvg with LoRA's A matrices frozen on the clients (exact aggregation of B @ A).

    Clients read ``config["freeze-lora-a"]`` and train only the B matrices (and any non-LoRA
    trainable tensors, which FedAvg averages as usual). The server checks that every reply
    carries the A it was sent: a client that moved A would make the average inexact.
    """

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent_a = {k: v.numpy() for k, v in arrays.items() if "lora_A" in k}
        config[FREEZE_A_KEY] = True
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
                        f"FFA-LoRA: a client changed the frozen {key}; clients must honour '{FREEZE_A_KEY}'"
                    )
        return super().aggregate_train(server_round, replies)
