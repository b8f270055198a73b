"""Offsite-Tuning's five-row table, one place for every program that reports it.

=====================  =====================================================
Full zero-shot         the full model, untouched
Emulator zero-shot     the emulator, untouched
Full fine-tuning       the full model, all blocks trained with the same method
Emulator fine-tuned    the emulator after training its adapter blocks
Plug-in                the full model with those trained adapter blocks
=====================  =====================================================

and the privacy gap = Plug-in - Emulator fine-tuned. Results hold one entry per emulator (or per
way of training it: federated, centralised); each entry's rows map a row name to
``{"acc", "acc_norm", ...}``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

from .files import file_name
from .rundir import write_json

ROWS = ("full_zero_shot", "emulator_zero_shot", "full_finetune", "emulator_finetune", "plug_in", "emulator_attack")
ROW_TITLES = {
    "full_zero_shot": "Full zero-shot",
    "emulator_zero_shot": "Emulator zero-shot",
    "full_finetune": "Full fine-tuning",
    "emulator_finetune": "Emulator fine-tuned",
    "plug_in": "Plug-in",
    "emulator_attack": "Attack (all emulator weights FT)",
}


def emulator_entry(rows: dict[str, dict], manifest: dict, config: dict) -> dict:
    """One emulator's entry of the results: its rows in table order, the gap (in ``acc`` and
    ``acc_norm``), the attack gap when there is an attack row, and its size."""
    attack = {"attack_gap": rows["plug_in"]["acc"] - rows["emulator_attack"]["acc"]} if "emulator_attack" in rows else {}
    return attack | {
        "config": config,
        "rows": {k: rows[k] for k in ROWS if k in rows},
        "gap": rows["plug_in"]["acc"] - rows["emulator_finetune"]["acc"],
        "gap_acc_norm": rows["plug_in"]["acc_norm"] - rows["emulator_finetune"]["acc_norm"],
        "num_params": manifest["num_params"],
        "source_num_params": manifest["source_num_params"],
    }


def write_results(out: Path, results: dict) -> None:
    """``results.json``, ``results.md`` and ``results.png`` in ``out``; every row's per-item
    record (``items``, see :meth:`scaleot_fed.single_owner.SingleOwner.evaluate`) moves to
    ``items/<entry>__<row>.loglik.json.gz`` (the entry's name made a file name:
    :func:`scaleot_fed.files.file_name`) and the row keeps its path as ``items_file``."""
    written: dict[int, dict] = {}  # a row shared by entries (the full model's) gets one file
    stems: dict[str, str] = {}  # file name -> entry: two names made the same file name stay apart
    for name, entry in results.get("emulators", {}).items():
        stem = file_name(name, "emulator")
        if stems.setdefault(stem, name) != name:
            stem = f"{stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
        for row, values in entry["rows"].items():
            if id(values) in written:
                entry["rows"][row] = written[id(values)]
            elif "items" in values:
                moved = dict(values)  # (the caller's row is left as it was)
                path = Path("items") / f"{stem}__{row}.loglik.json.gz"  # (a strategy named by path)
                (out / "items").mkdir(exist_ok=True)
                with gzip.open(out / path, "wt") as handle:
                    json.dump(moved.pop("items"), handle)
                moved["items_file"] = str(path)
                entry["rows"][row] = written[id(values)] = moved
    write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown_table(results))
    plot_results(results, out / "results.png")


def markdown_table(results: dict) -> str:
    """The five rows (acc, with acc_norm in brackets) per emulator, plus the gap."""
    names = list(results["emulators"])
    lines = [
        f"# Offsite-tuning: {results['model']} on {results['task']}",
        "",
        f"{results['n_train']} training items, {results['n_eval']} evaluation items, "
        f"fine-tuning mode {results['finetune']['mode']}, {results['finetune']['steps']} steps. "
        "Accuracy in % (acc_norm in brackets).",
        "",
        "| row | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for row in ROWS:
        if row == "emulator_attack" and not any(row in results["emulators"][n]["rows"] for n in names):
            continue
        cells = []
        for name in names:
            r = results["emulators"][name]["rows"].get(row)
            cells.append("n/a" if r is None else f"{100 * r['acc']:.1f} ({100 * r['acc_norm']:.1f})")
        lines.append(f"| {ROW_TITLES[row]} | " + " | ".join(cells) + " |")
    gaps = [f"{100 * results['emulators'][n]['gap']:+.1f} ({100 * results['emulators'][n]['gap_acc_norm']:+.1f})" for n in names]
    lines.append("| **Gap** (plug-in - emulator FT) | " + " | ".join(gaps) + " |")
    if any("attack_gap" in results["emulators"][n] for n in names):
        attack = [f"{100 * results['emulators'][n]['attack_gap']:+.1f}" if "attack_gap" in results["emulators"][n]
                  else "n/a" for n in names]
        lines.append("| **Attack gap** (plug-in - attack) | " + " | ".join(attack) + " |")
    sizes = [f"{results['emulators'][n]['num_params'] / results['emulators'][n]['source_num_params']:.0%}" for n in names]
    lines.append("| emulator size / full | " + " | ".join(sizes) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: Path) -> None:
    """Grouped bar chart: the five rows for every emulator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["emulators"])
    rows = [r for r in ROWS if any(r in results["emulators"][n]["rows"] for n in names)]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(names), 4))
    for k, row in enumerate(rows):
        values = [100 * results["emulators"][n]["rows"].get(row, {}).get("acc", float("nan")) for n in names]
        ax.bar([i + (k - (len(rows) - 1) / 2) * width for i in range(len(names))], values, width, label=ROW_TITLES[row])
    ax.set_xticks(range(len(names)), [f"{n}\ngap {100 * results['emulators'][n]['gap']:+.1f}" for n in names])
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{results['model']} on {results['task']} (n={results['n_eval']})")
    ax.legend(fontsize=7, loc="lower right")
    low = min(100 * r["acc"] for e in results["emulators"].values() for r in e["rows"].values())
    ax.set_ylim(max(0, low - 10), None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
