"""What a federated run writes besides its checkpoint: per-round metrics (JSON, CSV, plot), the
partition plot, and the final five-row table (through the single-owner recipe)."""

from __future__ import annotations

import copy
import csv
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scaleot_fed.config import as_dict
from scaleot_fed.emulator import WEIGHTS, load_emulator
from scaleot_fed.plugin import save_plugged
from scaleot_fed.report import emulator_entry, write_results
from scaleot_fed.rundir import RowCache, cached_rows, write_json
from scaleot_fed.single_owner import SingleOwner, trained_path

from .config import FedConfig
from .partition import client_data, item_table, partition_indices, train_items

log = logging.getLogger("scaleot_fed.federation")

if TYPE_CHECKING:
    from .federation import FederatedRun


def per_owner_summary(owners: dict[str, dict]) -> dict:
    """The round's per-owner plug-in accuracy in four numbers: mean, worst, which owner, spread."""
    acc = {p: m["plug_in_acc"] for p, m in owners.items() if "plug_in_acc" in m}
    if not acc:
        return {}
    worst = min(acc, key=lambda p: (acc[p], int(p)))
    return {"per_owner_acc_mean": float(np.mean(list(acc.values()))), "per_owner_acc_worst": acc[worst],
            "per_owner_worst_owner": int(worst), "per_owner_acc_spread": max(acc.values()) - acc[worst]}


def per_owner_table(rounds: list[dict]) -> dict[str, dict[str, dict]]:
    """owner id -> round -> that owner's metrics (from the rounds' ``per_owner`` entries)."""
    table: dict[str, dict[str, dict]] = {}
    for row in rounds:
        for owner, metrics in row.get("per_owner", {}).items():
            table.setdefault(owner, {})[str(row["round"])] = metrics
    return dict(sorted(table.items(), key=lambda kv: int(kv[0])))


def write_metrics(out: Path, rounds: list[dict], summary: dict) -> None:
    """``metrics.json`` (``rounds``, the ``per_owner`` table, ``summary``), ``metrics.csv`` (one row
    per round, without the per-owner entries) and ``rounds.png``."""
    owners = per_owner_table(rounds)
    write_json(out / "metrics.json", {"rounds": rounds} | ({"per_owner": owners} if owners else {}) | summary)
    keys = sorted({k for row in rounds for k in row} - {"per_owner"})
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in rounds:
            writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in row.items()})
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
    owners = [r for r in rounds if "per_owner_acc_mean" in r]
    if owners:  # the owners' own held-out splits: mean, and the band from the worst to the best
        x = [r["round"] for r in owners]
        worst = [100 * r["per_owner_acc_worst"] for r in owners]
        a1.plot(x, [100 * r["per_owner_acc_mean"] for r in owners], marker="s", label="owners' mean")
        a1.plot(x, worst, linestyle="--", label="worst owner")
        a1.fill_between(x, worst, [w + 100 * r["per_owner_acc_spread"] for w, r in zip(worst, owners, strict=True)],
                        alpha=0.15, label="owners' spread")
    if acc or owners:
        a1.legend(fontsize=8)
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


PLOTTED_VALUES = 10
"""A partition plot stacks this many values of the split field (the most frequent), the rest as "other"."""


def partition_counts(config: FedConfig) -> tuple[str, list[str], np.ndarray]:
    """(the field the partition split, its values, items per owner and value)."""
    run = config.run
    parts = partition_indices(run.task, run.train_limit, config.partition, run.num_clients, run.seed)
    items = train_items(run.task, run.train_limit)
    name = config.partition.split_field
    column = item_table(list(items))[name]
    values = sorted({str(v) for v in column}, key=lambda v: (len(v), v) if name == "gold" else v)
    where = {v: k for k, v in enumerate(values)}
    counts = np.zeros((len(parts), len(values)), dtype=int)
    for owner, part in enumerate(parts):
        for i in part:
            counts[owner, where[str(column[i])]] += 1
    return name, values, counts


def plot_partitions(config: FedConfig, out: Path) -> None:
    """``partitions.png`` (items per owner, stacked by the values of the field that was split) and
    ``partitions.json`` (sizes and the per-owner counts of every value)."""
    run = config.run
    name, values, counts = partition_counts(config)
    order = np.argsort(-counts.sum(axis=0), kind="stable")
    shown = sorted(order[:PLOTTED_VALUES].tolist())
    rest = counts[:, [k for k in range(len(values)) if k not in shown]].sum(axis=1)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(counts) + 2), 3.2))
    bottom = np.zeros(len(counts))
    for k in shown:
        ax.bar(range(len(counts)), counts[:, k], bottom=bottom, label=f"{name}={values[k]}"[:40])
        bottom += counts[:, k]
    if rest.any():
        ax.bar(range(len(counts)), rest, bottom=bottom, color="lightgrey", label=f"{len(values) - len(shown)} other")
    ax.set_xlabel("owner (partition id)")
    ax.set_ylabel("training items")
    task = run.task if len(run.task) <= 48 else run.task[:45] + "..."
    ax.set_title(f"{config.partition.kind} partition by {name}\n{task}", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "partitions.png", dpi=110)
    plt.close(fig)
    write_json(out / "partitions.json", {"sizes": counts.sum(axis=1).tolist(), "field": name, "values": values,
                                         "counts": counts.tolist()}, indent=None)


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
    # rows are kept in the run folder as they finish: a run resumed after a failure in the final
    # table does not compute them again (a new run starts from an empty folder)
    rows = RowCache(fed.out)
    return SingleOwner(fed.full, fed.tokenizer, pooled, dev, fed.eval_items, ft, run.eval_batch_size,
                       eval_placement=run.eval_placement(), cache=cached_rows(rows, log.info), checkpoint=rows.checkpoint)


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
    fed.load_aggregate()  # (the emulator fine-tuned row scores it)
    if run.save_plugged:
        save_plugged(fed.plugged_model(), fed.tokenizer, fed.out / "plugged")
    last = fed.last_plug_in  # the last round scored this aggregate's plug-in already: not twice
    tuned, plug = f"{name}/federated/emulator_finetune", f"{name}/federated/plug_in"
    # the plug-in first: scoring the emulator places the trainable in the scoring dtype, in place
    plug_in = owner.cache(plug, lambda: last[1] if last and last[0] is fed.arrays
                          else fed.plug_in_eval()[0] if run.per_owner_eval  # (with each owner's items)
                          else owner.evaluate(fed.plugged_model(), plug))  # (a full copy: built only here)
    federated = {"emulator_finetune": owner.cache(tuned, lambda: owner.evaluate(fed.trainable, tuned)), "plug_in": plug_in}
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
                       "partition": as_dict(config.partition), "owners": as_dict(config.owners)},
    }
    owners = per_owner_table(fed.metrics)
    if owners:
        results["per_owner"] = owners
    write_results(fed.out, results)
    if any("per_owner_acc_mean" in r for r in fed.metrics):  # the plug-in was scored per owner
        with open(fed.out / "results.md", "a") as handle:
            handle.write(per_owner_markdown(fed.metrics, owners))
    return results


def per_owner_markdown(rounds: list[dict], owners: dict[str, dict[str, dict]]) -> str:
    """The plug-in on every owner's held-out split per evaluation round (with the owner's local
    adapters beside it when measured), then the mean, worst owner and spread."""
    evaluated = [r for r in rounds if "per_owner_acc_mean" in r]
    lines = ["", "## Per owner: plug-in accuracy (%) on each owner's held-out items", "",
             "| owner | " + " | ".join(f"round {r['round']}" for r in evaluated) + " | own adapters on the emulator |",
             "|---|" + "---|" * (len(evaluated) + 1)]  # owner + rounds + own adapters: len + 2 columns
    for owner, by_round in owners.items():
        cells = [f"{100 * by_round[str(r['round'])]['plug_in_acc']:.1f}" if str(r["round"]) in by_round
                 and "plug_in_acc" in by_round[str(r["round"])] else "" for r in evaluated]
        local = [m["local_acc"] for m in by_round.values() if "local_acc" in m]
        lines.append(f"| {owner} | " + " | ".join(cells) + f" | {f'{100 * local[-1]:.1f}' if local else ''} |")
    for label, key in (("mean", "per_owner_acc_mean"), ("worst", "per_owner_acc_worst"),
                       ("spread (best - worst)", "per_owner_acc_spread")):
        lines.append(f"| {label} | " + " | ".join(f"{100 * r[key]:.1f}" for r in evaluated) + " | |")
    lines.append("| worst owner | " + " | ".join(str(r["per_owner_worst_owner"]) for r in evaluated) + " | |")
    return "\n".join(lines) + "\n"


def emulator_bytes(emulator_path: Path) -> int:
    return (emulator_path / WEIGHTS).stat().st_size
