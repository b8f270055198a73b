"""The model owner's side of ``[realign]`` (:mod:`scaleot_fed.realign`): when it runs, what it
changed, and what every message to an owner carries so that the owner trains on the same emulator.

Every train and evaluate message after a re-alignment carries the changed tensors (an
``ArrayRecord`` named ``realign``) and their version; the owner copies them into its emulator
before it loads the exchanged state. They are counted in the round's ``bytes_down`` (and
``realign_bytes_down``). Sending them with every message is what a stateless owner needs (a
simulation's actors serve any owner); an owner that keeps its emulator could be sent each change
once, which makes this count an upper bound.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from torch import nn

from scaleot_fed.errors import RunError
from scaleot_fed.realign import RealignConfig, realign, realign_parameters
from scaleot_fed.text import load_text_corpus, token_blocks

if TYPE_CHECKING:
    from .federation import FederatedRun

log = logging.getLogger("scaleot_fed.federation")
RECORD, VERSION_KEY = "realign", "realign-version"


class Realigner:
    """Re-alignment state of one federated run: the changed tensors, by name in the owners'
    trainable emulator, and how many re-alignments made them."""

    def __init__(self, config: RealignConfig) -> None:
        self.config = config
        self.state: dict[str, torch.Tensor] = {}
        self.version = 0
        self._tokens: torch.Tensor | None = None

    def due(self, round_: int, num_rounds: int) -> bool:
        """After this round's aggregation? Never after the last round: only owners' training
        gains from it, and the final emulator row must stay what the owners trained on."""
        return self.config.enabled and round_ % self.config.every == 0 and round_ < num_rounds

    def prepare(self, fed: FederatedRun) -> None:
        """Fail at start, not after a round of training: the emulator must have parts to re-align
        within ``max_bytes``, and the text must read (the owner's own, never a data owner's item)."""
        if not self.config.enabled:
            return
        realign_parameters(fed.trainable, fed.emulator.manifest, self.config.max_bytes)
        self._tokens = token_blocks(fed.tokenizer, load_text_corpus(self.config.text), self.config.block_size,
                                    max_blocks=max(64, 2 * self.config.steps * self.config.batch_size))

    def run(self, fed: FederatedRun) -> dict:
        """Re-align ``fed.trainable`` (the emulator with the aggregate) on the model owner's text."""
        if self._tokens is None:
            self.prepare(fed)
        teacher = fed.plugged_model()  # (also loads the aggregate into fed.trainable)
        params = realign_parameters(fed.trainable, fed.emulator.manifest, self.config.max_bytes)
        config = dataclasses.replace(self.config, seed=self.config.seed + self.version)  # fresh batches each time
        stats = realign(teacher, fed.trainable, params, self._tokens, config)
        del teacher
        # float32 whatever the emulator's precision (numpy has no bfloat16); owners cast on copy
        self.state = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in params.items()}
        self.version += 1
        log.info("re-aligned the emulator (version %d): KL %.4f -> %.4f, %d tensors, %.1f MB", self.version,
                 stats["kl_before"], stats["kl_after"], len(params), stats["bytes"] / 1e6)
        return {"version": self.version, "kl_before": stats["kl_before"], "kl_after": stats["kl_after"],
                "tensors": len(params), "bytes": stats["bytes"], "seconds": stats["seconds"]}

    def attach(self, messages: list[Message]) -> int:
        """Put the current re-aligned tensors into every message; returns the bytes added."""
        if not self.state:
            return 0
        record = ArrayRecord({n: Array(v.numpy()) for n, v in self.state.items()})
        for msg in messages:
            msg.content[RECORD] = record
            msg.content["config"][VERSION_KEY] = self.version
        return record.count_bytes() * len(messages)

    def restore(self, state: dict[str, torch.Tensor], model: nn.Module, version: int) -> None:
        """Back to a checkpoint's re-aligned tensors (``model``: the server's emulator)."""
        self.state, self.version = dict(state), version
        apply_realigned(model, {n: v.numpy() for n, v in state.items()})


def apply_realigned(model: nn.Module, tensors: dict[str, np.ndarray]) -> None:
    """Copy re-aligned tensors into ``model`` (an owner's or the server's trainable emulator)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise RunError(f"re-aligned tensors {unknown[:3]} do not exist in this emulator")
    with torch.no_grad():
        for name, value in tensors.items():
            target = params[name]
            if tuple(value.shape) != tuple(target.shape):
                raise RunError(f"re-aligned {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.array(value)))


def received_realigned(msg: Message) -> dict[str, np.ndarray] | None:
    """The re-aligned tensors a message carries, or None."""
    record = msg.content.array_records.get(RECORD)
    return None if record is None else {n: a.numpy() for n, a in record.items()}
