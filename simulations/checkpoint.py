"""The model owner's checkpoint after every round, so ``--resume`` continues a killed run to the
same result as an uninterrupted one.

``checkpoint/`` holds the aggregate (safetensors), the strategy's state (pickle: our own file,
written and read by the server only, never from the network), the round, the RNG states, the
byte counters and the metrics so far. It is written into a temporary folder and swapped in, so
a kill at any moment leaves either the old or the new checkpoint whole.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from safetensors.torch import load_file, save_file

from scaleot_fed.errors import ConfigError


def to_torch(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord as a state dict of (contiguous, owned) torch tensors."""
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in arrays.items()}


def save_aggregate(arrays: ArrayRecord, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in to_torch(arrays).items()}, str(path))


@dataclass
class Checkpoint:
    """What a resumed server needs (besides the config and the emulator)."""

    round: int
    arrays: ArrayRecord
    strategy_state: dict
    metrics: list[dict]
    bytes_down_total: int
    bytes_up_total: int


def save_checkpoint(out: Path, ckpt: Checkpoint, sha: str) -> None:
    """Write ``out/checkpoint`` for the emulator ``sha``, with the global RNG states of now."""
    final, tmp = out / "checkpoint", out / ".checkpoint.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_aggregate(ckpt.arrays, tmp / "aggregate.safetensors")
    # A DP wrapper's accountant is not kept: the server rebuilds it from the rounds done.
    (tmp / "strategy.pkl").write_bytes(pickle.dumps(ckpt.strategy_state))
    version, internal, gauss = random.getstate()
    state = {
        "round": ckpt.round,
        "sha256": sha,
        # Client sampling uses its own seeded Random per round; the global states are kept so a
        # resumed server continues exactly where it stopped (Flower's sampling orders nodes with them).
        "python_random": [version, list(internal), gauss],
        "torch_random": torch.get_rng_state().tolist(),
        "bytes_down_total": ckpt.bytes_down_total,
        "bytes_up_total": ckpt.bytes_up_total,
    }
    (tmp / "state.json").write_text(json.dumps(state))
    (tmp / "metrics.json").write_text(json.dumps(ckpt.metrics))
    if final.exists():
        old = out / ".checkpoint.old"
        final.replace(old)
        tmp.replace(final)
        shutil.rmtree(old)
    else:
        tmp.replace(final)


def load_checkpoint(out: Path, sha: str) -> Checkpoint:
    """Read ``out/checkpoint`` and restore the global RNG states it saved.

    Raises
    ------
    ConfigError
        No checkpoint, or one made with another emulator.
    """
    ckpt = out / "checkpoint"
    if not (ckpt / "state.json").is_file():
        raise ConfigError(f"{out} has no checkpoint to resume from")
    state = json.loads((ckpt / "state.json").read_text())
    if state["sha256"] != sha:
        raise ConfigError(f"the checkpoint in {ckpt} belongs to another emulator")
    torch.set_rng_state(torch.tensor(state["torch_random"], dtype=torch.uint8))
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return Checkpoint(
        round=state["round"],
        arrays=ArrayRecord(torch_state_dict=load_file(str(ckpt / "aggregate.safetensors"))),
        strategy_state=pickle.loads((ckpt / "strategy.pkl").read_bytes()),
        metrics=json.loads((ckpt / "metrics.json").read_text()),
        bytes_down_total=state["bytes_down_total"],
        bytes_up_total=state["bytes_up_total"],
    )
