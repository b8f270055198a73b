"""Data owners' partitions of a task's train split, via Flower Datasets partitioners."""

from __future__ import annotations

import dataclasses
import functools
import random
from pathlib import Path

from scaleot_fed.errors import ConfigError
from scaleot_fed.tasks import MCItem, load_task

from .config import FedConfig, PartitionConfig


def build_partitioner(config: PartitionConfig, num_partitions: int, seed: int):
    """The Flower Datasets partitioner named by ``config.kind``."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if config.kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if config.kind == "dirichlet":
        return DirichletPartitioner(num_partitions=num_partitions, partition_by=config.by, alpha=config.alpha,
                                    min_partition_size=config.min_partition_size, self_balancing=True, seed=seed)
    return PathologicalPartitioner(num_partitions=num_partitions, partition_by=config.by,
                                   num_classes_per_partition=config.classes_per_client, seed=seed)


def _as_dataset(items: list[MCItem]):
    import datasets

    return datasets.Dataset.from_dict({
        "idx": list(range(len(items))),
        "gold": [i.gold for i in items],
        "num_choices": [len(i.choices) for i in items],
        "context": [i.context for i in items],
    })


@functools.lru_cache(maxsize=4)
def train_items(task: str, train_limit: int | None) -> tuple[MCItem, ...]:
    """The shared train items (read once per process)."""
    return tuple(load_task(task, "train", train_limit))


def partition_indices(task: str, train_limit: int | None, config: PartitionConfig, num_partitions: int,
                      seed: int) -> tuple[tuple[int, ...], ...]:
    """Item indices of every partition (deterministic for a given seed)."""
    return _partition_indices(task, train_limit, dataclasses.astuple(config), num_partitions, seed)


@functools.lru_cache(maxsize=4)
def _partition_indices(task, train_limit, config_tuple, num_partitions, seed):
    config = PartitionConfig(*config_tuple)
    items = train_items(task, train_limit)
    if len(items) < num_partitions * 2:
        raise ConfigError(f"{len(items)} training items cannot feed {num_partitions} clients (need 2 each)")
    dataset = _as_dataset(items)
    if config.by not in dataset.column_names:
        raise ConfigError(f"partition.by={config.by!r} is not an item column; use one of {dataset.column_names}")
    partitioner = build_partitioner(config, num_partitions, seed)
    partitioner.dataset = dataset
    try:
        return tuple(tuple(partitioner.load_partition(p)["idx"]) for p in range(num_partitions))
    except ValueError as exc:  # e.g. pathological split with fewer labels than needed
        raise ConfigError(f"partitioner {config.kind} cannot split {task}: {exc}") from exc


def client_data(config: FedConfig, partition_id: int, num_partitions: int) -> tuple[list[MCItem], list[MCItem]]:
    """One simulated client's (train, validation) items: its partition of the task."""
    run = config.run
    indices = partition_indices(run.task, run.train_limit, config.partition, num_partitions, run.seed)[partition_id]
    items = train_items(run.task, run.train_limit)
    return _split([items[i] for i in indices], config, f"client {partition_id}", f"{run.seed}-split-{partition_id}")


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
