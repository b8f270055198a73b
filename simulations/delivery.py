"""Emulator delivery: ask every data owner for the emulator's hash, send it to those that lack it.

One node at a time, so that owners sharing a machine (a simulation's actors) find it on disk once
the first has received it: the emulator crosses the wire once per process that lacks it, never
per round. One owner that cannot take it is left out of the run; none taking it stops the run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from scaleot_fed.errors import RunError

from .client_app import delivery_content

log = logging.getLogger("scaleot_fed.federation")


@dataclass
class Delivery:
    """Who holds the emulator after delivery, and what it cost."""

    node_to_partition: dict[int, int] = field(default_factory=dict)
    bytes_down: int = 0
    deployed: bool = False
    """The owners are SuperNodes that bring their own data (numbered by node id), not our partitions."""


def wait_for_nodes(grid: Grid, num_clients: int, timeout: float = 120.0) -> list[int]:
    """The connected node ids once ``num_clients`` have connected (sorted)."""
    deadline = time.time() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= num_clients:
            return nodes
        if time.time() > deadline:
            raise RunError(
                f"only {len(nodes)} of num_clients={num_clients} data owners connected "
                f"within {timeout:.0f} s; start more SuperNodes or lower num_clients"
            )
        time.sleep(1.0)


def send_one(grid: Grid, message: Message) -> Message:
    """Send one message and return its reply; an error or no reply raises."""
    replies = list(grid.send_and_receive([message], timeout=600))
    if not replies or replies[0].has_error():
        reason = replies[0].error.reason if replies else "no reply"
        raise RunError(f"data owner {message.metadata.dst_node_id} failed the emulator query: {reason}")
    return replies[0]


def _tampered(emulator_path: Path, sha: str) -> RecordDict:
    """The delivery with one byte flipped (debug: its receiver must notice)."""
    content = delivery_content(emulator_path, sha)
    weights = content.array_records["emulator"]["weights"].numpy().copy()
    weights[len(weights) // 2] ^= 0xFF
    return delivery_content(emulator_path, sha, weights)


def _ask(grid: Grid, node: int, sha: str) -> tuple[int, bool]:
    """``(partition id, holds the emulator)`` of the owner on ``node``."""
    query = RecordDict({"config": ConfigRecord({"sha256": sha})})
    record = send_one(grid, Message(query, dst_node_id=node, message_type="query.emulator")).content["emulator"]
    return int(record["partition-id"]), bool(record["has"])


def _send(grid: Grid, node: int, emulator_path: Path, sha: str, tamper: bool) -> int:
    """Send the emulator to ``node``; returns the bytes sent."""
    content = _tampered(emulator_path, sha) if tamper else delivery_content(emulator_path, sha)
    size = content.array_records["emulator"].count_bytes() + sum(len(v) for v in content.config_records["files"].values())
    record = send_one(grid, Message(content, dst_node_id=node, message_type="query.emulator")).content["emulator"]
    if not bool(record["has"]):
        raise RunError("it could not store the emulator")
    log.info("delivered the emulator (%.1f MB) to node %s", size / 1e6, node)
    return size


def deliver(grid: Grid, emulator_path: Path, sha: str, num_clients: int, tamper: bool = False) -> Delivery:
    """Make sure every connected data owner holds the emulator ``sha``.

    Parameters
    ----------
    tamper:
        Debug: flip one byte of the first delivery (its receiver must refuse it).
    """
    done = Delivery()
    for node in wait_for_nodes(grid, num_clients):
        owner: int | str = "?"
        has = True
        try:
            owner, has = _ask(grid, node, sha)
            size = 0 if has else _send(grid, node, emulator_path, sha, tamper)
        except RunError as exc:
            # One owner that cannot take the emulator does not stop the federation.
            log.error("data owner %s (node %s) is left out of this run: %s", owner, node, exc)
            tamper = tamper and has  # a tampered copy, once sent, is used up
            continue
        tamper = tamper and has
        done.node_to_partition[node] = owner
        done.bytes_down += size
    if not done.node_to_partition:
        raise RunError("no data owner could take the emulator (see the errors above)")
    if any(p < 0 for p in done.node_to_partition.values()):
        # Deployed owners hold their own data (no partition of ours): number them by node id.
        done.node_to_partition = {n: i for i, n in enumerate(sorted(done.node_to_partition))}
        done.deployed = True
        log.info("data owners (node id -> owner number): %s", done.node_to_partition)
    return done
