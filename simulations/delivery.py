"""Emulator delivery: ask every data owner for the emulator's hash, send it to those that lack it.

Owners are asked in batches and sent the emulator one at a time, so that owners sharing a machine
(a simulation's actors) find it on disk once the first has received it: the emulator crosses the
wire once per disk that lacks it, never per round. One owner that cannot take it is left out of the run; none taking it stops the run.
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


def _send(grid: Grid, node: int, emulator_path: Path, sha: str) -> int:
    """Send the emulator to ``node``; returns the bytes sent."""
    content = delivery_content(emulator_path, sha)
    size = content.array_records["emulator"].count_bytes() + sum(len(v) for v in content.config_records["files"].values())
    record = send_one(grid, Message(content, dst_node_id=node, message_type="query.emulator")).content["emulator"]
    if not bool(record["has"]):
        raise RunError("it could not store the emulator")
    log.info("delivered the emulator (%.1f MB) to node %s", size / 1e6, node)
    return size


def _ask_all(grid: Grid, nodes: list[int], sha: str) -> dict[int, tuple[int, bool] | str]:
    """Every node's ``(partition id, holds the emulator)``, from one batch of queries; a node that
    failed or did not answer maps to the reason."""
    query = RecordDict({"config": ConfigRecord({"sha256": sha})})
    messages = [Message(query, dst_node_id=node, message_type="query.emulator") for node in nodes]
    answers: dict[int, tuple[int, bool] | str] = dict.fromkeys(nodes, "no reply")
    for reply in grid.send_and_receive(messages, timeout=600):
        node = reply.metadata.src_node_id
        if reply.has_error():
            answers[node] = f"it failed the emulator query: {reply.error.reason}"
        else:
            record = reply.content["emulator"]
            answers[node] = (int(record["partition-id"]), bool(record["has"]))
    return answers


def deliver(grid: Grid, emulator_path: Path, sha: str, num_clients: int) -> Delivery:
    """Make sure every connected data owner holds the emulator ``sha``.

    All owners are asked at once; those that lack it get it one at a time. After a delivery the
    rest are asked again (at once) for as long as that finds owners that now hold it (owners
    sharing a disk, as a simulation's actors do); owners on disks of their own are then sent it
    without more questions. A population of any size costs one copy per disk and a few batches of
    queries, never a round trip per owner.
    """
    done = Delivery()
    answers = _ask_all(grid, wait_for_nodes(grid, num_clients), sha)
    reask = True
    while True:
        for node, answer in list(answers.items()):
            if isinstance(answer, str):  # one owner that cannot take the emulator does not stop the run
                log.error("data owner on node %s is left out of this run: %s", node, answer)
                del answers[node]
            elif answer[1]:
                done.node_to_partition[node] = answer[0]
                del answers[node]
        if not answers:
            break
        node = min(answers)
        try:
            done.bytes_down += _send(grid, node, emulator_path, sha)
            done.node_to_partition[node] = answers.pop(node)[0]
        except RunError as exc:
            log.error("data owner %s (node %s) is left out of this run: %s", answers.pop(node)[0], node, exc)
        if answers and reask:  # did that copy reach others (a shared disk)? Ask while it does.
            answers = _ask_all(grid, sorted(answers), sha)
            reask = any(not isinstance(a, str) and a[1] for a in answers.values())
    if not done.node_to_partition:
        raise RunError("no data owner could take the emulator (see the errors above)")
    if any(p < 0 for p in done.node_to_partition.values()):
        # Deployed owners hold their own data (no partition of ours): number them by node id.
        done.node_to_partition = {n: i for i, n in enumerate(sorted(done.node_to_partition))}
        done.deployed = True
        log.info("data owners (node id -> owner number): %s", done.node_to_partition)
    return done
