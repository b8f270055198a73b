"""The model owner's checkpoint after every round, so ``--resume`` continues a killed run to the
same result as an uninterrupted one.

``checkpoint/`` holds the aggregate (safetensors), the strategy's state (pickle: our own file,
written and read by the server only, never from the network), the round, the RNG states, the
byte counters, the metrics so far and the resolved config it was made with. It is written into a
temporary folder of its own and swapped in; the one before stays as ``checkpoint.prev/``, so a
kill at any moment leaves a whole checkpoint, and a corrupt latest one falls back to the previous.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from safetensors.torch import load_file

from scaleot_fed.errors import ConfigError
from scaleot_fed.files import save_tensors, unique_tmp

log = logging.getLogger("scaleot_fed.federation")
LATEST, PREVIOUS = "checkpoint", "checkpoint.prev"
REALIGNED = "realigned.safetensors"
CHECKPOINT_LOCK = threading.Lock()
"""Held while a checkpoint is written; a stop signal waits for it (simulations.guard)."""


def to_torch(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord as a state dict of (contiguous, owned) torch tensors."""
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in arrays.items()}


def save_aggregate(arrays: ArrayRecord, path: Path) -> None:
    save_tensors({k: v.contiguous() for k, v in to_torch(arrays).items()}, str(path))


@dataclass
class RoundState:
    """What a resumed server needs (besides the config and the emulator)."""

    round: int
    arrays: ArrayRecord
    strategy_state: dict
    metrics: list[dict]
    bytes_down_total: int
    bytes_up_total: int
    config: dict | None = None
    """The resolved config the run had when this checkpoint was written (None: an old checkpoint)."""
    realigned: dict[str, torch.Tensor] = field(default_factory=dict)
    """The emulator tensors ``[realign]`` changed, as the owners now hold them (empty: none)."""


def save_checkpoint(out: Path, ckpt: RoundState, sha: str) -> None:
    """Write ``out/checkpoint`` for the emulator ``sha``, with the global RNG states of now."""
    with CHECKPOINT_LOCK:
        _write_checkpoint(out, ckpt, sha)


def _write_checkpoint(out: Path, ckpt: RoundState, sha: str) -> None:
    final, tmp = out / LATEST, unique_tmp(out / LATEST)
    tmp.mkdir(parents=True)
    save_aggregate(ckpt.arrays, tmp / "aggregate.safetensors")
    if ckpt.realigned:
        save_tensors({k: v.detach().contiguous() for k, v in ckpt.realigned.items()}, str(tmp / REALIGNED))
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
        "config": ckpt.config,
    }
    (tmp / "state.json").write_text(json.dumps(state))
    (tmp / "metrics.json").write_text(json.dumps(ckpt.metrics))
    if final.exists():
        previous = out / PREVIOUS
        if previous.exists():
            shutil.rmtree(previous)
        final.replace(previous)
    tmp.replace(final)


def has_checkpoint(out: Path) -> bool:
    return any((out / name / "state.json").is_file() for name in (LATEST, PREVIOUS))


def read_state(out: Path) -> tuple[Path, dict]:
    """The newest readable checkpoint folder and its ``state.json`` (a corrupt latest one falls
    back to the previous with a warning)."""
    problems = []
    for name in (LATEST, PREVIOUS):
        folder = out / name
        try:
            state = json.loads((folder / "state.json").read_text())
            load_file(str(folder / "aggregate.safetensors"))  # whole and readable
            pickle.loads((folder / "strategy.pkl").read_bytes())
            json.loads((folder / "metrics.json").read_text())
        except FileNotFoundError:
            problems.append(f"{folder} is missing")
            continue
        except Exception as exc:  # noqa: BLE001 -- any unreadable piece makes the checkpoint unusable
            problems.append(f"{folder} is unreadable ({type(exc).__name__}: {str(exc)[:80]})")
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", folder, type(exc).__name__)
            continue
        if problems:
            log.warning("resuming from the previous checkpoint %s (%s)", folder, "; ".join(problems))
        return folder, state
    raise ConfigError(f"{out} has no usable checkpoint to resume from ({'; '.join(problems)})")


def checkpointed_seconds(out: Path) -> float:
    """The training seconds of the rounds ``out``'s newest usable checkpoint holds (what a resumed
    run's earlier processes spent on them)."""
    ckpt, _ = read_state(out)
    return float(sum(row.get("seconds") or 0.0 for row in json.loads((ckpt / "metrics.json").read_text())))


def load_checkpoint(out: Path, sha: str) -> RoundState:
    """Read the newest usable checkpoint of ``out`` and restore the global RNG states it saved.

    Raises
    ------
    ConfigError
        No usable checkpoint, or one made with another emulator.
    """
    ckpt, state = read_state(out)
    if state["sha256"] != sha:
        raise ConfigError(f"the checkpoint in {ckpt} belongs to another emulator")
    torch.set_rng_state(torch.tensor(state["torch_random"], dtype=torch.uint8))
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return RoundState(
        round=state["round"],
        arrays=ArrayRecord(torch_state_dict=load_file(str(ckpt / "aggregate.safetensors"))),
        strategy_state=pickle.loads((ckpt / "strategy.pkl").read_bytes()),
        metrics=json.loads((ckpt / "metrics.json").read_text()),
        bytes_down_total=state["bytes_down_total"],
        bytes_up_total=state["bytes_up_total"],
        config=state.get("config"),
        realigned=load_file(str(ckpt / REALIGNED)) if (ckpt / REALIGNED).is_file() else {},
    )
