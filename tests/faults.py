"""Failures injected into federated runs, for the tests only (never part of a run's config).

* Data owners: :func:`client_fault` is a Flower mod, named in ``$SCALEOT_FED_CLIENT_MODS``
  (:data:`simulations.client_app.CLIENT_MODS`), that makes the owners :data:`FAULTS_ENV` lists
  raise, sleep, or reply with NaN or the wrong tensors. Ray's workers inherit both variables.
* The model owner (it runs in the test's process): :func:`stop_after_round` stops the server as
  if killed right after a round's checkpoint; :func:`tamper_first_delivery` flips one byte of
  the first emulator sent.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

FAULTS_ENV = "SCALEOT_FED_TEST_FAULTS"
"""JSON: ``{"fail": {"<partition id>": "raise" | "nan" | "wrong-keys" | "slow"}, "slow_seconds": 30}``."""
KINDS = ("raise", "nan", "wrong-keys", "slow")
ROOT = Path(__file__).resolve().parents[1]


class Killed(RuntimeError):
    """Raised by :func:`stop_after_round` where a killed server would have died."""


def client_fault(msg: Message, context: Context, call_next) -> Message:
    """Before training, an owner that raises or is too slow for ``round_timeout``; after it, one
    that sends NaN or tensors under the wrong names."""
    plan = json.loads(os.environ.get(FAULTS_ENV, "{}"))
    pid = str(context.node_config.get("partition-id", -1))
    kind = plan.get("fail", {}).get(pid)
    if kind == "raise":
        raise RuntimeError(f"injected failure in client {pid}")
    if kind == "slow":
        time.sleep(float(plan.get("slow_seconds", 30.0)))
    reply = call_next(msg, context)
    if kind in ("nan", "wrong-keys") and not reply.has_error():
        arrays = reply.content["arrays"]
        state = {name: arrays[name].numpy() for name in arrays}
        if kind == "nan":
            first = next(iter(state))
            state[first] = np.full_like(state[first], np.nan)
        else:
            state = {f"{name}.bogus": value for name, value in state.items()}
        reply.content["arrays"] = ArrayRecord({name: Array(value) for name, value in state.items()})
    return reply


def inject(monkeypatch, fail: dict[int, str], slow_seconds: float = 30.0) -> None:
    """Make the owners ``fail`` names misbehave in the runs this test starts (here or in a child)."""
    from simulations.client_app import CLIENT_MODS

    assert set(fail.values()) <= set(KINDS), fail
    monkeypatch.setenv(CLIENT_MODS, f"{__name__}:client_fault")
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"fail": {str(k): v for k, v in fail.items()},
                                               "slow_seconds": slow_seconds}))
    # the owners import this module by name: the repository root on their path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def stop_after_round(monkeypatch, round_: int) -> None:
    """The server stops (:class:`Killed`) right after round ``round_``'s checkpoint, as if killed."""
    from simulations.federation import FederatedRun

    save = FederatedRun.save_checkpoint

    def save_then_stop(self, done: int) -> None:
        save(self, done)
        if done == round_:
            raise Killed(f"stopped after round {done}, as if killed")

    monkeypatch.setattr(FederatedRun, "save_checkpoint", save_then_stop)


def tamper_first_delivery(monkeypatch) -> None:
    """The first emulator the server sends has one byte flipped (its receiver must refuse it)."""
    import simulations.delivery as delivery

    real, sent = delivery.delivery_content, []

    def content(emulator_path, sha):
        record = real(emulator_path, sha)
        if not sent:
            sent.append(True)
            weights = record["emulator"]["weights"].numpy().copy()
            weights[len(weights) // 2] ^= 0xFF
            record["emulator"] = ArrayRecord(array_dict={"weights": Array(weights)})
        return record

    monkeypatch.setattr(delivery, "delivery_content", content)
