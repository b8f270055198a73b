"""A fine-tuning run's state on disk, so that a stopped run (a crash, Ctrl-C, a machine taken
back) resumes after its last saved step instead of from the start.

:func:`scaleot_fed.finetune.finetune` saves a :class:`Checkpoint` every ``every_s`` seconds and
once at the end. A later call with the same checkpoint restores the trained tensors, the
optimizer and schedule, every random generator the loop draws from and the batch stream, then
runs the steps that are left: it ends bitwise where an uninterrupted run would have
(:func:`snapshot`, :func:`resume`). What must
match for that (the config, the training examples, the trained tensors' names and shapes) is
fingerprinted, and a checkpoint of another run is an error, never silently mixed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .batching import LengthBatches
from .errors import ConfigError


@dataclass
class Checkpoint:
    """Where a run's state goes and how often. ``every_s`` bounds the training time a stop loses;
    each save writes the trained tensors, their best copy and the optimizer's moments (for a
    full-parameter fp32 SmolLM2-135M run 1.7 GB), so a large run wants it larger."""

    path: Path
    every_s: float = 300.0
    resumed_seconds: float = dataclasses.field(default=0.0, init=False)
    """The work time (``seconds`` of the state :meth:`load` found) of the runs before this one:
    what a resumed run's own clock misses (a study's compute log adds it)."""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.every_s >= 0:
            raise ConfigError(f"the save interval (every_s, --save-every) must be >= 0 seconds, got {self.every_s}")

    @property
    def _partial(self) -> Path:
        return self.path.with_name(self.path.name + ".partial")

    def load(self, fingerprint: str, device: torch.device) -> dict | None:
        """The saved state, or ``None`` when there is none; another run's state is an error."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location=device, weights_only=True)
        except Exception as error:  # a truncated or foreign file: say which, and what to do
            raise ConfigError(f"{self.path} is not a readable training checkpoint ({error}); "
                              "delete it to train from the start") from error
        if state.get("fingerprint") != fingerprint:
            raise ConfigError(f"{self.path} holds another training run (its config, data or trained "
                              "tensors differ): delete it to train from the start")
        self.resumed_seconds = float(state.get("seconds", 0.0))
        return state

    def save(self, state: dict) -> None:
        """Write ``state`` whole or not at all: a stop mid-write leaves the previous save."""
        # not files.write_atomic: that needs the bytes in memory first (twice a GB-sized state),
        # and its per-process temporary name would outlive a kill; this one is overwritten or removed
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, self._partial)
        os.replace(self._partial, self.path)

    def peek(self) -> dict | None:
        """The saved state as it is, unchecked and mapped rather than read (a full-parameter
        training state is GBs): ``None`` where there is none or it is not a readable state."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # (any unreadable or foreign file)
            return None
        return state if isinstance(state, dict) else None

    def remove(self) -> None:
        """Forget the run (its result is stored elsewhere now)."""
        self.path.unlink(missing_ok=True)
        self._partial.unlink(missing_ok=True)


@dataclass
class Progress:
    """What a training loop carries from step to step; a checkpoint saves it with the rest."""

    step: int
    initial: float
    best: float
    best_step: int
    best_state: dict[str, torch.Tensor]
    history: list[dict]
    tokens: int = 0
    seconds: float = 0.0


def _trained(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def fingerprint(config: object, examples: list[tuple[list[int], list[int]]], model: nn.Module,
                proximal_mu: float) -> str:
    """A digest of what a resumed run must share with the saved one: ``config`` (a dataclass),
    the encoded training ``examples`` and the names, shapes and dtypes of ``model``'s trained tensors."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    digest.update(json.dumps([proximal_mu, examples]).encode())
    digest.update(json.dumps([(n, list(t.shape), str(t.dtype)) for n, t in _trained(model).items()]).encode())
    return digest.hexdigest()


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (trained tensors by name) back into ``model``'s parameters."""
    with torch.no_grad():
        named = dict(model.named_parameters())
        for name, tensor in state.items():
            named[name].copy_(tensor)


def snapshot(progress: Progress, print_: str, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler, batches: LengthBatches) -> dict:
    """Everything :func:`resume` needs to continue a run draw for draw (``print_``: its fingerprint;
    ``seconds``: the training time so far, read by :meth:`Checkpoint.load`)."""
    device = next(iter(_trained(model).values())).device
    rng = {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})
    return {"fingerprint": print_, "seconds": progress.seconds, "progress": vars(progress), "trained": _trained(model),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
            "batches": batches.state()}


def resume(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
           batches: LengthBatches) -> Progress:
    """Put a :func:`snapshot` back into a run's fresh parts; returns where the run was."""
    load_trainable_state(model, state["trained"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"].cpu())  # (loaded onto the run's device with the rest)
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), next(iter(_trained(model).values())).device)
    batches.restore(state["batches"])
    return Progress(**state["progress"])
