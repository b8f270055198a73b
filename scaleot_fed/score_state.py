"""A scoring's progress on disk, so that a stopped scoring (a crash, Ctrl-C, a session cut)
resumes with the batches it had not scored yet instead of from the first one.

Scoring a full-depth model on HellaSwag's 10,042 items takes longer than its fine-tuning did
(hours on a CPU, a long job on a GPU for a large model); :class:`ScoreLog` keeps every finished
batch's scores in a :class:`~scaleot_fed.train_state.Checkpoint`. Batches are made the same way
on every run (longest first, from the same requests), so a resumed scoring computes exactly the
batches an unstopped one would have, and its scores are bitwise the same.

What the saved scores depend on (the model's weights, the token ids, the batch size, the packing
plan, the device type, the attention implementation, torch's version) is fingerprinted. A saved
state of another scoring is ignored and overwritten: unlike a training state it holds nothing that
cannot be recomputed, so it is never worth an error.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .train_state import Checkpoint

SAMPLE = 4096
"""Entries per tensor that :func:`weights_digest` reads besides its checksum."""
SAVE_EVERY_S = 60.0
"""Seconds between saves of a scoring's state (it is small: ~100 kB for the 8,000 scores of
2,000 HellaSwag items)."""
_AS_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_digest(model: nn.Module) -> str:
    """A cheap digest of ``model``'s weights: per parameter its name, shape, dtype, the integer sum
    of its bits (exact: the same on any device and thread count, unlike a float sum) and an evenly
    strided sample of its entries. It tells apart models that were trained or built differently
    (not an adversary's), without copying a large model off its device. Raises ConfigError where
    a device map offloaded weights (they are not on hand to read)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if tensor.device.type == "meta":
                raise ConfigError(f"{name} is offloaded (a device map put it on no device); a saved scoring "
                                  "cannot tell such a model's weights apart: score it without saving")
            flat = tensor.detach().reshape(-1)
            bits = flat.view(_AS_INT[flat.element_size()]).sum(dtype=torch.int64)  # (wraps alike everywhere)
            sample = flat[:: max(1, flat.numel() // SAMPLE)].float().cpu()
            digest.update(json.dumps([name, list(tensor.shape), str(tensor.dtype), int(bits)]).encode())
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
    def open(cls, checkpoint: Checkpoint | None, model: nn.Module, what: Callable[[], list]) -> ScoreLog:
        """The log of scoring ``model`` on ``what()`` (JSON-able: the requests' token ids and every
        setting that shapes the batches; called only with a checkpoint), resumed from
        ``checkpoint`` where it holds this very scoring."""
        if checkpoint is None:
            return cls()
        # the scores' last bits also depend on the kernels: the device type, the attention, torch
        runtime = [next(model.parameters()).device.type, getattr(model.config, "_attn_implementation", None),
                   torch.__version__]
        digest = hashlib.sha256(json.dumps([weights_digest(model), runtime, what()]).encode())
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

    @staticmethod
    def check_file(path: str | Path) -> int:
        """How many batches the scoring state at ``path`` holds (0: none there yet). Raises
        ConfigError where ``path`` is a folder or a file that is not a scoring state, so that a
        mistyped path never has a user's file overwritten (and later deleted)."""
        path = Path(path)
        if not path.exists():
            return 0
        state = Checkpoint(path).peek()
        if not (state is not None and {"fingerprint", "batches"} <= set(state)):
            raise ConfigError(f"{path} exists and is not a saved scoring; give --save-to a new file (or one a "
                              "stopped scoring saved)")
        return len(state["batches"])

    def save(self) -> None:
        """Write the finished batches (and their time) to the checkpoint, if any."""
        if self.checkpoint is not None and self.done:
            self.checkpoint.save({"fingerprint": self.fingerprint, "seconds": self.seconds, "batches": self.done})
            self.saved_at = time.perf_counter()
