"""A scoring's progress on disk, so that a stopped scoring (a crash, Ctrl-C, a session cut)
resumes with the batches it had not scored yet instead of from the first one.

Scoring a full-depth model on HellaSwag's 10,042 items takes longer than its fine-tuning did
(hours on a CPU, a long job on a GPU for a large model); :class:`ScoreLog` keeps every finished
batch's scores in a :class:`~scaleot_fed.train_state.Checkpoint`. Batches are made in the same
order on every run (longest first, fixed sizes), so a resumed scoring computes exactly the
batches an unstopped one would have, and its scores are bitwise the same.

What the saved scores depend on (the model's weights, the requests, the batch size, the packing
plan) is fingerprinted. A saved state of another scoring is ignored and overwritten: unlike a
training state it holds nothing that cannot be recomputed, so it is never worth an error.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .errors import ConfigError
from .train_state import Checkpoint

SAMPLE = 4096
"""Entries per tensor that :func:`weights_digest` reads besides its sum."""


def weights_digest(model: nn.Module) -> str:
    """A cheap digest of ``model``'s weights: per parameter its name, shape, dtype, sum and an
    evenly strided sample of its entries. It tells apart models that were trained or built
    differently (not an adversary's), without copying a large model off its device."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if tensor.device.type == "meta":  # offloaded by a device map: its name and shape only
                digest.update(json.dumps([name, list(tensor.shape)]).encode())
                continue
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // SAMPLE)].float().cpu()
            digest.update(json.dumps([name, list(tensor.shape), str(tensor.dtype),
                                      float(flat.sum(dtype=torch.float32))]).encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


class ScoreLog:
    """The scores of the batches a scoring has finished, saved every ``checkpoint.every_s``
    seconds and when the scoring is interrupted by an exception (Ctrl-C included).

    Without a checkpoint it only computes (:meth:`batch` calls through).
    """

    def __init__(self, checkpoint: Checkpoint | None = None, fingerprint: str = "") -> None:
        self.checkpoint, self.fingerprint = checkpoint, fingerprint
        state = None
        if checkpoint is not None:
            try:
                state = checkpoint.load(fingerprint, torch.device("cpu"))
            except ConfigError:  # another scoring's (or a damaged) state: recompute, overwrite it
                state = None
        self.done: dict[str, list[float]] = dict(state["batches"]) if state else {}
        self.seconds = float(state.get("seconds", 0.0)) if state else 0.0
        """Seconds spent scoring the batches in :attr:`done` (saved with them)."""
        self.saved_at = time.perf_counter()

    @classmethod
    def open(cls, checkpoint: Checkpoint | None, model: nn.Module, what: Iterable) -> ScoreLog:
        """The log of scoring ``model`` on ``what`` (JSON-able: the requests and every setting
        that shapes the batches), resumed from ``checkpoint`` where it holds this scoring."""
        if checkpoint is None:
            return cls()
        digest = hashlib.sha256(json.dumps([weights_digest(model), list(what)]).encode())
        return cls(checkpoint, digest.hexdigest())

    def batch(self, key: str, compute: Callable[[], list[float]]) -> list[float]:
        """Batch ``key``'s scores: the saved ones, or ``compute()``'s (then saved when due)."""
        if key in self.done:
            return self.done[key]
        start = time.perf_counter()
        try:
            scores = compute()
        except BaseException:
            self.save()  # an interrupted scoring keeps every batch it finished
            raise
        if self.checkpoint is not None:
            self.done[key] = scores
            self.seconds += time.perf_counter() - start
            if time.perf_counter() - self.saved_at >= self.checkpoint.every_s:
                self.save()
        return scores

    def save(self) -> None:
        if self.checkpoint is not None and self.done:
            self.checkpoint.save({"fingerprint": self.fingerprint, "seconds": self.seconds, "batches": self.done})
            self.saved_at = time.perf_counter()
