"""Data owners' partitions of a task's train split: Flower Datasets partitioners over an item field
(the answer index, the task of a mixture, a content field), and one hand-written split (owners
that name their tasks)."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from scaleot_fed.errors import ConfigError
from scaleot_fed.tasks import MCItem, load_task

from .config import FedConfig, PartitionConfig


def build_partitioner(config: PartitionConfig, num_partitions: int, seed: int):
    """The Flower Datasets partitioner for ``config`` (every kind but ``task`` with named tasks)."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    by = config.split_field
    if config.kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if config.kind == "natural":
        return NaturalIdPartitioner(partition_by=by)
    if config.classes_per_client is not None:
        return PathologicalPartitioner(num_partitions=num_partitions, partition_by=by,
                                       num_classes_per_partition=config.classes_per_client, seed=seed)
    return DirichletPartitioner(num_partitions=num_partitions, partition_by=by, alpha=config.alpha,
                                min_partition_size=config.min_partition_size, self_balancing=True, seed=seed)


def item_table(items: list[MCItem]) -> dict[str, list]:
    """The columns a partitioner can split on: ``idx``, ``gold``, ``num_choices``, ``context`` and
    every content field (``""`` where an item lacks it)."""
    names = sorted({k for i in items for k in i.fields})
    return {"idx": list(range(len(items))), "gold": [i.gold for i in items],
            "num_choices": [len(i.choices) for i in items], "context": [i.context for i in items]} | {
        name: [i.fields.get(name, "") for i in items] for name in names}


def assigned_tasks(values: list[str], owners: list[list[str]], seed: int) -> list[list[int]]:
    """Owner ``k`` holds the items whose task is in ``owners[k]``; a task's items (shuffled with
    ``seed``) are cut into near-equal contiguous shares among its holders, in owner order."""
    present = sorted(set(values))
    unknown = sorted({t for tasks in owners for t in tasks} - set(present))
    if unknown:
        raise ConfigError(f"partition.tasks names {unknown}, not in this run's tasks {present} "
                          "(set [run] task to a mixture such as \"piqa+arc_easy\")")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in owners]
    for task in present:
        holders = [k for k, tasks in enumerate(owners) if task in tasks]
        if not holders:
            raise ConfigError(f"no owner holds task {task!r} in partition.tasks; add it to an owner's list "
                              "or drop it from [run] task")
        indices = rng.permutation([i for i, v in enumerate(values) if v == task])
        for k, share in zip(holders, np.array_split(indices, len(holders)), strict=True):
            parts[k].extend(int(i) for i in share)
    return [sorted(p) for p in parts]


@functools.lru_cache(maxsize=4)
def train_items(task: str, train_limit: int | None) -> tuple[MCItem, ...]:
    """The shared train items (read once per process)."""
    return tuple(load_task(task, "train", train_limit))


def partition_indices(task: str, train_limit: int | None, config: PartitionConfig, num_partitions: int,
                      seed: int) -> tuple[tuple[int, ...], ...]:
    """Item indices of every partition (deterministic for a given seed)."""
    return _partition_indices(task, train_limit, json.dumps(dataclasses.asdict(config)), num_partitions, seed)


DIRICHLET_RESTARTS = 10
"""How many times a Dirichlet partitioner that gave up is started again."""
FLOWER_DRAWS = 11
"""The draws Flower's ``DirichletPartitioner`` makes before it gives up (flwr-datasets 0.6)."""


def _flower_split(table: dict[str, list], config: PartitionConfig, num_partitions: int, seed: int, task: str) -> list[list[int]]:
    """The partitioner's split of ``table`` into item indices per owner.

    A Dirichlet split rejects draws that leave an owner below ``min_partition_size`` and Flower's
    partitioner gives up after :data:`FLOWER_DRAWS` of them: with 2 answer values, 8 owners and
    alpha 0.1 (PIQA) that is 9 of 30 seeds. Started again with seeds derived from ``seed`` (up to
    :data:`DIRICHLET_RESTARTS` times) it keeps sampling the same law, draws conditioned on every
    owner's minimum, and a seed Flower could split gives the same owners as before.
    """
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    dataset = datasets.Dataset.from_dict(table)
    for restart in range(DIRICHLET_RESTARTS):
        partitioner = build_partitioner(config, num_partitions,
                                        seed if restart == 0 else int(np.random.SeedSequence([seed, restart]).generate_state(1)[0]))
        partitioner.dataset = dataset
        try:
            with warnings.catch_warnings():  # (one per rejected draw; the error below says it once)
                warnings.filterwarnings("ignore", message="The specified min_partition_size", category=UserWarning)
                return [list(partitioner.load_partition(p)["idx"]) for p in range(num_partitions)]
        except ValueError as exc:  # e.g. a pathological split with fewer values than needed
            if not (isinstance(partitioner, DirichletPartitioner) and "max number of attempts" in str(exc)):
                raise ConfigError(f"partition {config.kind} by {config.split_field!r} cannot split {task}: {exc}") from exc
            error = exc
    raise ConfigError(f"partition {config.kind} by {config.split_field!r} cannot split {task}: none of "
                      f"{DIRICHLET_RESTARTS * FLOWER_DRAWS} Dirichlet draws (alpha {config.alpha}) left each of "
                      f"{num_partitions} owners {config.min_partition_size} items; raise alpha, lower "
                      "min_partition_size or use fewer owners") from error


_WARNED: set[str] = set()
"""The tasks whose skew by answer position was already warned about."""


def warn_if_position_skew(task: str, train_limit: int | None, config: PartitionConfig) -> None:
    """Warn, once per task and process, where a partition over ``gold`` skews only the correct
    answer's position: every item has its own choices and most contexts do not list them, so
    neither training (``context + choices[gold]``) nor continuation scoring shows the model an
    index, and the owners differ in how many and which questions they hold, not in what they see.
    Called where a run or study is checked, before any owner starts (not in each owner's process)."""
    if config.kind in ("iid", "task") or config.split_field != "gold" or task in _WARNED:
        return
    items = train_items(task, train_limit)
    listed = sum(all(c in i.context for c in i.choices) for i in items)  # a context such as "(A) x (B) y"
    if len({tuple(i.choices) for i in items}) == 1 or 2 * listed > len(items):
        return  # gold is a class (one label set), or the prompt shows the positions
    _WARNED.add(task)
    warnings.warn(f"partition {config.kind} by 'gold' on {task}: each item has its own choices and its context does "
                  "not list them, so gold is only the correct answer's position, which the model never sees; owners "
                  "differ in how many and which questions they hold, not in their content. For content skew use "
                  "kind = \"topic\" over a content field (where the task has one) or \"task\" (a mixture).",
                  UserWarning, stacklevel=1)


@functools.lru_cache(maxsize=4)
def _partition_indices(task, train_limit, config_json, num_partitions, seed):
    config = PartitionConfig(**json.loads(config_json))
    items = train_items(task, train_limit)
    if len(items) < num_partitions * 2:
        raise ConfigError(f"{len(items)} training items cannot feed {num_partitions} data owners (need 2 each)")
    table = item_table(items)
    by = config.split_field
    if config.kind != "iid" and by not in table:
        raise ConfigError(f"partition.by={by!r} is not a field of {task}'s items; use one of {', '.join(table)}")
    if config.kind == "task" and config.tasks:
        parts = assigned_tasks(table["task"], config.tasks, seed)
    else:
        if config.kind == "natural":
            counts = Counter(table[by])
            if len(counts) != num_partitions:
                raise ConfigError(f"a natural partition by {by!r} has one owner per value: {task} has {len(counts)} "
                                  f"values, so set num_clients = {len(counts)} (it is {num_partitions})")
            rare = sorted(v for v, n in counts.items() if n < 2)
            if rare:
                raise ConfigError(f"a natural partition by {by!r} makes an owner of every value, but {rare[:3]} "
                                  f"({len(rare)} in all) have fewer than 2 items; use kind = \"topic\" instead")
        parts = _flower_split(table, config, num_partitions, seed, task)
    small = [(k, len(p)) for k, p in enumerate(parts) if len(p) < 2]
    if small:
        raise ConfigError(f"partition {config.kind} by {by!r} leaves owner(s) {small[:3]} (id, items) with fewer than "
                          "2 items (one to train, one to validate); raise train_limit or alpha, or use fewer owners")
    return tuple(tuple(p) for p in parts)


def client_data(config: FedConfig, partition_id: int, num_partitions: int) -> tuple[list[MCItem], list[MCItem]]:
    """One simulated data owner's (train, validation) items: its partition of the task."""
    run = config.run
    indices = partition_indices(run.task, run.train_limit, config.partition, num_partitions, run.seed)[partition_id]
    items = train_items(run.task, run.train_limit)
    return _split([items[i] for i in indices], config, f"data owner {partition_id}", f"{run.seed}-split-{partition_id}")


def local_data(config: FedConfig, path: str) -> tuple[list[MCItem], list[MCItem]]:
    """A deployed data owner's (train, validation) items: its own file or folder (``data-path``),
    capped at ``train_limit`` like the shared task in a simulation."""
    if not Path(path).exists():
        raise ConfigError(f"data-path {path} does not exist on this data owner's machine")
    return _split(load_task(path, "train", config.run.train_limit), config, f"data owner file {path}",
                  f"{config.run.seed}-split-{path}")


def _split(items: list[MCItem], config: FedConfig, who: str, seed: str) -> tuple[list[MCItem], list[MCItem]]:
    """Hold out ``client_val_fraction`` of an owner's items (a fixed shuffle per owner)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * config.run.client_val_fraction))
    if len(order) - n_val < 1:
        raise ConfigError(f"{who} has {len(order)} items: too few to hold out a validation split")
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]
