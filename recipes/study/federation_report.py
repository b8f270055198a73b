"""The report's federated part: each federation's per-owner rows (its worst data owner and the
owners' mean, each owner scored on its own held-out items), decided with a two-level bootstrap
(:func:`scaleot_fed.stats.group_bootstrap`), and per federated row what it cost and how it
converged: accuracy, worst owner and spread, bytes up and down, seconds per round, the last
round's validation loss, and the rounds' losses with a band over seeds (``federations.png``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from scaleot_fed.stats import Comparison, group_bootstrap

CURVES = ("client_val_loss", "train_loss")
"""The per-round losses drawn: the owners' validation loss (with client evaluation, the aggregate's on
their validation items; without, each sampled owner's after its local training) and training loss."""


def statistic(family: str) -> str:
    """The group statistic an owner row stands for (``.../worst_owner``: worst; ``.../owner_mean``: mean)."""
    return "worst" if family.endswith("/worst_owner") else "mean"


def owner_entry(family: str, resolver, resamples: int) -> dict | None:
    """An owner row of one task as the rows table holds it: the statistic's mean over seeds with
    its 95 % interval, per seed, and the owners per seed; ``None`` while no seed has owners."""
    found = resolver.groups(family)
    if found is None:
        return None
    groups, seeds, _ = found
    reduce = np.min if statistic(family) == "worst" else np.mean
    c = _within(group_bootstrap(groups, None, statistic(family), resamples), 0.0)
    return {"mean": c.difference, "ci95": list(c.ci95), "interval": c.interval, "seeds": len(seeds), "other_metric_mean": None,
            "per_seed": [float(reduce([g.mean() for g in owners])) for owners in groups], "per_seed_seeds": seeds,
            "owners": [len(owners) for owners in groups], "rows": resolver.sources(family, seeds)}


def owner_comparison(claim, resolvers: list, resamples: int) -> Comparison | None:
    """A claim over owner rows on one task, or over several (the mean of the tasks' differences,
    each task weighing the same): on every task both sides at the same seeds on the same owners'
    items (the same partition), and the same seeds on every task; else ``None`` (not decided)."""
    found = [(r.groups(claim.a), r.groups(claim.b)) for r in resolvers]
    if any(a is None or b is None or a[1] != b[1] or a[2] != b[2] for a, b in found) or \
            len({tuple(a[1]) for a, _ in found}) != 1:
        return None
    return _within(group_bootstrap([g for a, _ in found for g in a[0]], [g for _, b in found for g in b[0]],
                                   statistic(claim.a), resamples, tasks=len(found)), -1.0)


def _within(c: Comparison, low: float) -> Comparison:
    """``c`` with its interval cut to what an accuracy (``low`` 0) or a difference of two (``low``
    -1) can be: simultaneous bands around an owner of a few items reach past 0 and 1."""
    return dataclasses.replace(c, ci95=(max(c.ci95[0], low), min(c.ci95[1], 1.0)))


def federation_table(config, resolvers: dict) -> dict:
    """Per federated row (``<federation>[:<mode>]``) and task: seeds, the worst owner and the
    owners' spread (best - worst, in the task's metric, means over seeds), MB up and down per run
    and seconds per round (means over seeds), and the rounds' losses: mean, low and high over
    seeds, round by round, and the last round's validation loss (see :data:`CURVES`)."""
    study, out = config.study, {}
    for federation in config.federations:
        for mode in study.modes:
            name = federation.name + ("" if mode == study.modes[0] else f":{mode}")
            for task, resolver in resolvers.items():
                rows = [resolver.rows[k] for _, k in resolver.seeded_keys(f"{name}/plug_in")]
                if rows:
                    out.setdefault(name, {})[task] = federated_costs(rows, resolver.groups(f"{name}/worst_owner"))
    return out


def federated_costs(rows: list[dict], groups) -> dict:
    """One federated row's entry of :func:`federation_table` from its plug-in rows (one per seed)
    and its per-owner groups (``resolver.groups``; ``None``: no owners scored)."""
    entry: dict = {"seeds": len(rows)}
    if groups is not None:
        means = [[float(g.mean()) for g in owners] for owners in groups[0]]
        sizes = [g.size for owners in groups[0] for g in owners]  # (an owner's worst is as sure as its items)
        entry |= {"worst_owner": float(np.mean([min(m) for m in means])),
                  "owner_spread": float(np.mean([max(m) - min(m) for m in means])), "owners": len(means[0]),
                  "owner_items": [min(sizes), max(sizes)]}
    recorded = [r for r in rows if r.get("rounds")]  # (rows made before rounds were kept have none)
    rounds = [r["rounds"] for r in recorded]
    if rounds:
        entry["mb_up"] = float(np.mean([r["bytes_up_total"] for r in recorded])) / 1e6
        # the emulator's delivery apart: it crosses once per disk that lacks it, so whether a run paid
        # it depends on what the owners' caches held before (in a simulation: the study's run order)
        entry["mb_down"] = float(np.mean([r["bytes_down_total"] - sum(x.get("emulator_bytes_down") or 0 for x in r["rounds"])
                                          for r in recorded])) / 1e6
        sizes = [r["emulator_bytes"] for r in rows if r.get("emulator_bytes")]
        if sizes:
            entry["emulator_mb"] = float(np.mean(sizes)) / 1e6
        entry["seconds_per_round"] = float(np.mean([x["seconds"] for run in rounds for x in run]))
        length = min(len(run) for run in rounds)  # (every seed runs the same rounds)
        entry["curves"] = {"round": [run["round"] for run in rounds[0][:length]]}
        for key in CURVES:
            values = np.array([[x.get(key) if x.get(key) is not None else np.nan for x in run[:length]] for run in rounds])
            if not np.isnan(values).all():
                entry["curves"][key] = {"mean": np.nanmean(values, axis=0).tolist(),
                                        "low": np.nanmin(values, axis=0).tolist(), "high": np.nanmax(values, axis=0).tolist()}
        last = [run[-1].get("client_val_loss") for run in rounds]  # (each seed's own last round)
        if all(x is not None for x in last):
            # where the curves end: strategies whose plug-in scores tie can still differ in how far
            # the owners' adapters got (a seed that diverged reads nan here, not dropped)
            entry["last_val_loss"] = float(np.mean(last))
    return entry


def federation_markdown(summary: dict) -> list[str]:
    """REPORT.md's section on the federated rows (none without federations)."""
    table = summary.get("federations")
    if not table:
        return []
    lines = ["## Federations", "",
             "The plug-in's accuracy (%) with its 95 % interval and seeds; each data owner's held-out items scored "
             "after the last round: the worst owner and the spread (best - worst), means over seeds, and the fewest and "
             "most held-out items an owner had (a skewed partition leaves some owners few); what a run's rounds "
             "moved (MB up, MB down) and, apart, the emulator each owner receives once before them (MB; it crosses "
             "once per disk that lacks it: in a simulation, whether a run paid it depends on the owners' cache); its "
             "seconds per round (2 CPU cores, simulated owners); the validation loss of the last round (nats per "
             "answer token on the emulator, weighted by the owners' items, mean over seeds; without client "
             "evaluation: the round's sampled owners after their local training, before aggregation): how far the "
             "adapters got, where accuracies tie; the losses per round are in federations.png (mean over seeds, "
             "band: low to high). A federation over a mixture "
             "of tasks is one run scored on each: its owners (each on its own task's items), bytes, seconds and "
             "losses are on its first task's line.",
             "", "| federated row | task | accuracy | worst owner | spread | items per owner | MB up | MB down | "
             "emulator MB | s/round | last val loss |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, per_task in table.items():
        for task, e in per_task.items():
            row = summary["rows"].get(f"{name}/plug_in", {}).get(task)
            acc = "" if row is None else (f"{100 * row['mean']:.1f} [{100 * row['ci95'][0]:.1f}, "
                                          f"{100 * row['ci95'][1]:.1f}] x{row['seeds']}")
            items = "-".join(str(n) for n in dict.fromkeys(e["owner_items"])) if "owner_items" in e else ""
            cells = [acc] + [f"{100 * e[k]:.1f}" if k in e else "" for k in ("worst_owner", "owner_spread")] + [items] + \
                [f"{e[k]:.1f}" if k in e else "" for k in ("mb_up", "mb_down", "emulator_mb", "seconds_per_round")] + \
                [f"{e['last_val_loss']:.2f}" if "last_val_loss" in e else ""]
            lines.append(f"| {name} | {task} | " + " | ".join(cells) + " |")
    curves = any("curves" in e for per_task in table.values() for e in per_task.values())
    return lines + ["", "![federations](federations.png)" if curves else "(no per-round record in these rows)", ""]


def plot_convergence(summary: dict, path: Path) -> None:
    """One panel per task and loss: each federated row's loss per round, mean over seeds with a
    band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary.get("federations") or {}
    panels = [(task, key) for task in summary["tasks"] for key in CURVES
              if any(key in e.get(task, {}).get("curves", {}) for e in table.values())]
    if not panels:
        return
    from matplotlib.ticker import MaxNLocator

    # one look per federation in every panel (colour, and a marker: rows that coincide, as
    # strategies that do not differ at these settings, stay visible), one legend for all
    markers = "osD^v<>xP*"
    style = {name: {"color": f"C{i % 10}", "marker": markers[(i + i // 10) % len(markers)], "markersize": 3}
             for i, name in enumerate(table)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    for ax, (task, key) in zip(axes[0], panels):
        for name, per_task in table.items():
            curves = per_task.get(task, {}).get("curves", {})
            if key in curves:
                ax.plot(curves["round"], curves[key]["mean"], label=name, linewidth=1, **style[name])
                ax.fill_between(curves["round"], curves[key]["low"], curves[key]["high"], alpha=0.2,
                                color=style[name]["color"])
        ax.set_title(f"{task}: {key}", fontsize=8)
        ax.set_xlabel("round", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend([handles[n] for n in table if n in handles], [n for n in table if n in handles], fontsize=7,
               loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(6, len(handles)), frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
