"""Which owners' replies may be averaged in, and in what shape.

A reply is refused (its owner counted as failed for the round) when it cannot be part of an
average: an error, missing or extra tensors, a shape other than the one sent, NaN/Inf, or training
on another version of a re-aligned emulator. Owners that train a lower LoRA rank (HetLoRA) send
their factors at that rank; :func:`pad_replies` zero-pads them to the server's, so that every
strategy averages tensors of one shape. An aggregate keeps the dtypes the arrays were sent in
(:func:`in_sent_dtypes`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from .lora import pad_rank


def reply_problem(msg: Message, names: tuple[str, ...], expected: dict, realign_version: int = 0) -> str | None:
    """Why a train reply cannot be averaged in, or None when it can. ``expected``: name -> an
    array of the shape the owner must send back."""
    if msg.has_error():
        return f"its ClientApp failed: {msg.error.reason.strip().splitlines()[-1] if msg.error.reason else 'unknown'}"
    metrics = msg.content.metric_records.get("metrics", {})
    if int(metrics.get("realign-version", 0)) != realign_version:
        return f"trained on re-aligned emulator version {metrics.get('realign-version', 0)}, not {realign_version}"
    arrays = msg.content.array_records.get("arrays")
    if arrays is None:
        return "no arrays in the reply"
    if set(arrays.keys()) != set(names):
        extra = sorted(set(arrays.keys()) - set(names))[:2]
        missing = sorted(set(names) - set(arrays.keys()))[:2]
        return f"wrong keys (unexpected {extra}, missing {missing})"
    for name, want in expected.items():
        value = arrays[name].numpy()
        if tuple(value.shape) != tuple(want.shape):
            return f"wrong shape for {name}: {tuple(value.shape)} instead of {tuple(want.shape)}"
        if not np.isfinite(value).all():
            return f"NaN or Inf in {name}"
    return None


def pad_replies(replies: list[Message], sent: ArrayRecord) -> None:
    """Every reply's lower-rank LoRA factors padded (in place) to the server's rank
    (:func:`strategies.lora.pad_rank`), so that any strategy can average them."""
    state = {n: v.numpy() for n, v in sent.items()}
    for msg in replies:
        padded = pad_rank({n: a.numpy() for n, a in msg.content["arrays"].items()}, state)
        msg.content["arrays"] = ArrayRecord({n: Array(v) for n, v in padded.items()})


def in_sent_dtypes(aggregate: ArrayRecord, sent: ArrayRecord) -> ArrayRecord:
    """``aggregate`` with each array in the dtype it was sent to the owners in.

    Flower's FedOpt strategies (FedAdam, FedYogi, FedAdagrad) scale their step by a NumPy float64
    scalar, and NumPy 2 promotes float32 arrays times that scalar to float64: without the cast every
    later round sends twice the bytes down (the federated study measured 35.3 MB for FedAdam's run
    against FedAvg's 19.7) and checkpoints and the plugged-in adapters change precision.
    """
    if all(aggregate[name].dtype == sent[name].dtype for name in aggregate.keys() if name in sent):
        return aggregate
    return ArrayRecord({name: Array(array.numpy().astype(sent[name].dtype, copy=False)) if name in sent else array
                        for name, array in aggregate.items()})
