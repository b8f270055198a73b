"""Length-bucketed training batches: less padding, still a random order.

Each epoch the items are shuffled with the run's RNG and cut into pools of
``batches_per_pool * batch_size``; each pool is sorted by length and cut into batches, so a
batch holds items of similar length (little padding), and the batches of the epoch are shuffled
again so that lengths do not come in order. Items left over at the end of an epoch (fewer than a
batch) open the next one: every item is seen once per epoch, batches are always full.
"""

from __future__ import annotations

import random
from collections.abc import Iterator


class LengthBatches(Iterator[list[int]]):
    """An endless stream of index batches over items of the given ``lengths``."""

    def __init__(self, lengths: list[int], batch_size: int, rng: random.Random, batches_per_pool: int = 16) -> None:
        if not lengths:
            raise ValueError("no items to batch")
        self.lengths, self.rng = lengths, rng
        self.batch_size = min(batch_size, len(lengths))
        self.pool = batches_per_pool * self.batch_size
        self.queue: list[list[int]] = []
        self.carry: list[int] = []

    def _epoch(self) -> None:
        order = self.carry + self.rng.sample(range(len(self.lengths)), len(self.lengths))
        batches = []
        for start in range(0, len(order), self.pool):
            pool = sorted(order[start : start + self.pool], key=lambda i: self.lengths[i])
            batches += [pool[k : k + self.batch_size] for k in range(0, len(pool), self.batch_size)]
        self.carry = batches.pop() if len(batches[-1]) < self.batch_size else []
        self.rng.shuffle(batches)
        self.queue = batches

    def __next__(self) -> list[int]:
        while not self.queue:
            self._epoch()
        return self.queue.pop()

    def state(self) -> dict:
        """Where the stream is: enough for :meth:`restore` to continue it draw for draw."""
        return {"rng": self.rng.getstate(), "queue": [list(b) for b in self.queue], "carry": list(self.carry)}

    def restore(self, state: dict) -> None:
        """Continue the stream a :meth:`state` was taken from."""
        self.rng.setstate(state["rng"])
        self.queue, self.carry = [list(b) for b in state["queue"]], list(state["carry"])

    def padding_ratio(self, batches: list[list[int]]) -> float:
        """Share of padded positions in ``batches`` (each padded to its longest item)."""
        padded = sum(len(b) * max(self.lengths[i] for i in b) for b in batches)
        return 1 - sum(self.lengths[i] for b in batches for i in b) / padded
