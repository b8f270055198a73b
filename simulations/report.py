"""What a federated run writes besides its checkpoint: per-round metrics (JSON, CSV, plot), the
partition plot, and the final five-row table (through the single-owner recipe)."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from recipes.report import emulator_entry, write_results
from recipes.rundir import write_json
from recipes.single_owner import SingleOwner, trained_path
from scaleot_fed.config import as_dict
from scaleot_fed.emulator import WEIGHTS, load_emulator
from scaleot_fed.plugin import save_plugged

from .config import FedConfig
from .partition import client_data, partition_indices, train_items

if TYPE_CHECKING:
    from .federation import FederatedRun


def write_metrics(out: Path, rounds: list[dict], summary: dict) -> None:
    """``metrics.json`` (``rounds`` plus ``summary``), ``metrics.csv`` (one row per round) and
    ``rounds.png``."""
    write_json(out / "metrics.json", {"rounds": rounds} | summary)
    keys = sorted({k for row in rounds for k in row})
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in rounds:
            writer.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in row.items()})
    plot_rounds(rounds, out / "rounds.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rounds(rounds: list[dict], path: Path) -> None:
    """Server-side plug-in accuracy and the clients' losses per round."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    acc = [(r["round"], 100 * r["plug_in_acc"]) for r in rounds if "plug_in_acc" in r]
    if acc:
        a1.plot(*zip(*acc, strict=True), marker="o", label="plug-in acc")
    for axis in (a1, a2):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    a1.set_xlabel("round")
    a1.set_ylabel("accuracy (%)")
    a1.set_title("server-side plug-in accuracy")
    for key, label in (("train_loss", "client train loss"), ("client_val_loss", "client val loss (emulator)")):
        values = [r.get(key) for r in rounds]
        if any(v is not None for v in values):
            a2.plot([r["round"] for r in rounds], values, marker="o", label=label)
    a2.set_xlabel("round")
    a2.set_title("losses")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_partitions(config: FedConfig, out: Path) -> None:
    """``partitions.png`` (items per client, stacked by label) and ``partitions.json``."""
    run = config.run
    parts = partition_indices(run.task, run.train_limit, config.partition, run.num_clients, run.seed)
    items = train_items(run.task, run.train_limit)
    labels = sorted({i.gold for i in items})
    counts = np.array([[sum(items[j].gold == lab for j in p) for lab in labels] for p in parts])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(parts) + 2), 3.2))
    bottom = np.zeros(len(parts))
    for k, lab in enumerate(labels):
        ax.bar(range(len(parts)), counts[:, k], bottom=bottom, label=f"gold={lab}")
        bottom += counts[:, k]
    ax.set_xlabel("client (partition id)")
    ax.set_ylabel("training items")
    ax.set_title(f"{run.task}: {config.partition.kind} partition")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "partitions.png", dpi=110)
    plt.close(fig)
    write_json(out / "partitions.json", {"sizes": [len(p) for p in parts], "label_counts": counts.tolist(),
                                         "labels": labels}, indent=None)


def _pooled_owner(fed: FederatedRun, pool: bool) -> SingleOwner:
    """The owners' pooled data as one owner, trained for as many steps as the whole federation
    took (the centralised rows and the attacker use it; ``pool=False``: scoring only)."""
    config, run = fed.config, fed.config.run
    parts = [client_data(config, p, run.num_clients) for p in range(run.num_clients)] if pool else []
    pooled = [i for train, _ in parts for i in train]
    dev = [i for _, val in parts for i in val]
    ft = copy.deepcopy(config.finetune)
    ft.steps = run.num_rounds * run.clients_per_round * ft.steps
    ft.eval_items, ft.eval_every = len(dev), max(1, ft.steps // 4)
    return SingleOwner(fed.full, fed.tokenizer, pooled, dev, fed.eval_items, ft, run.eval_batch_size,
                       eval_placement=run.eval_placement())


def final_table(fed: FederatedRun) -> dict:
    """The five rows after the last round, for the federated aggregate and (when asked) the same
    data trained centrally; Full FT only when asked (it is centralised)."""
    config, run = fed.config, fed.config.run
    owner = _pooled_owner(fed, run.centralised_full_finetune or run.centralised_offsite or run.attack)
    name = config.emulator.name
    rows = {"full_zero_shot": owner.full_zero_shot(),
            "emulator_zero_shot": owner.emulator_zero_shot(name, load_emulator(fed.emulator_path))}
    if run.centralised_full_finetune:
        rows["full_finetune"] = owner.full_finetune()
    if run.attack:  # the owners' pooled data, every emulator weight, the attacker's own budget
        rows["emulator_attack"] = owner.attack(name, fed.emulator_path, config.attack)
    central = None
    if run.centralised_offsite:
        central = owner.emulator_finetune_and_plug_in(name, load_emulator(fed.emulator_path),
                                                      trained_path(fed.out / "centralised", config.finetune.mode))
    plugged = fed.plugged_model()
    save_plugged(plugged, fed.tokenizer, fed.out / "plugged")
    federated = {"emulator_finetune": owner.evaluate(fed.trainable), "plug_in": owner.evaluate(plugged)}
    entry_config = as_dict(config.emulator)
    emulators = {f"federated-{config.strategy.name}": emulator_entry(rows | federated, fed.emulator.manifest,
                                                                     entry_config)}
    if central is not None:
        emulators["centralised"] = emulator_entry(rows | central, fed.emulator.manifest, entry_config) | {
            "steps": owner.finetune.steps}
    results = {
        "model": run.model, "task": run.task, "n_train": len(train_items(run.task, run.train_limit)),
        "n_eval": len(fed.eval_items), "finetune": as_dict(config.finetune), "emulators": emulators,
        "federation": {"num_clients": run.num_clients, "clients_per_round": run.clients_per_round,
                       "num_rounds": run.num_rounds, "strategy": config.strategy.name,
                       "partition": as_dict(config.partition)},
    }
    write_results(fed.out, results)
    return results


def emulator_bytes(emulator_path: Path) -> int:
    return (emulator_path / WEIGHTS).stat().st_size
