"""Every benchmark's ratio next to its ideal, in one table (read from benchmarks/results/*.json).

    python benchmarks/summary.py        # `make bench` runs the benchmarks, then this

Each line names the benchmark script that measured it; a benchmark not run yet is listed as such.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def rows() -> list[tuple[str, str, str, str]]:
    """(what, measured, ideal, target) per line."""
    out = []
    a = _load("finetune_cost")
    if a and "flop_ideal_ratio" in a:
        out.append(("(a) emulator+LoRA / full FT, tokens/s", f"{a['speed_ratio']:.2f}x",
                    f"{a['flop_ideal_ratio']:.2f}x (FLOPs)", ">= 0.85 of ideal"))
        out.append(("(a) emulator+LoRA / full FT, peak memory", f"{a['memory_ratio']:.2f}x",
                    f"{a['memory_ideal_ratio']:.2f}x (bytes)", "within 1.15x of ideal"))
    b = _load("evaluate_speed")
    for task in (b or {}).get("tasks", []):
        out.append((f"(b) scoring new / old, {task['task']} items/s", f"{task['ratio']:.2f}x",
                    f"{task['flop_ideal_ratio']:.2f}x (FLOPs); roofline {task['roofline_items_per_s']:.1f} it/s "
                    f"vs {task['items_per_s']['new']:.1f}", ">= 2.5x"))
    c = _load("federated")
    if c and "median" in c.get("overhead", {}):
        med = c["overhead"]["median"]
        out.append(("(c) simulation / plain loop, whole run", f"{med['ratio']:.2f}x", "1.00x", "<= 1.15x"))
        out.append(("(c) simulation / plain loop, rounds only", f"{med['round_ratio']:.2f}x", "1.00x", "<= 1.15x"))
    d = _load("precision")
    if d:
        ideal = (f"{d['ideal_matmul_ratio']:.2f}x (matmuls alone)" if "ideal_matmul_ratio" in d
                 else "1.00x without bf16 units")
        out.append(("(d) bf16 / fp32 LoRA on CPU, tokens/s", f"{d['ratio_bf16_over_fp32']:.2f}x", ideal, "-"))
        out.append(("(d) bf16 / fp32 frozen weight bytes", f"{d['frozen_bytes']['bfloat16'] / d['frozen_bytes']['float32']:.2f}x", "0.50x", "-"))
    if c and "memory" in c:
        e = c["memory"]
        out.append((f"(e) simulation peak / must hold ({e['clients']} clients)", f"{e['ratio']:.2f}x", "1.00x",
                    "<= 1.5x"))
    population = _load("population")
    if population:
        runs = population["runs"]
        peaks = [runs[n]["peak_tree_rss_mb"] for n in sorted(runs, key=int)]
        out.append((f"population {min(runs, key=int)} -> {max(runs, key=int)} owners, peak memory",
                    f"{max(peaks) / min(peaks):.2f}x", "1.00x (flat)", "flat"))
    streaming = _load("streaming")
    for step, label in (("build", "build-emulator --stream"), ("plug_in", "plug-in --stream")):
        if streaming and step in streaming:
            params = streaming["checkpoint"]["params"] / 1e9
            out.append((f"{label} ({params:.2f}B) peak / bound", f"{streaming[step]['peak_over_bound']:.2f}x",
                        "<= 1.00x", "<= 1.00x"))
    for check in _load("estimate_check") or []:
        out.append((f"estimate / measured owner memory, {check['batch_size']} x {check['seq_len']}",
                    f"{check['ratio']:.2f}x", "1.00x", "within 25 %"))
    owners = _load("owner_intervals")
    if owners:
        lowest = {k: min(line["coverage"][k] for line in owners["lines"]) for k in ("percentile", "study")}
        out.append(("worst-owner interval, lowest coverage over scenarios", f"{lowest['study']:.2f}",
                    "0.95", f"nominal (percentiles alone: {lowest['percentile']:.2f})"))
    return out


def main() -> None:
    table = rows()
    if not table:
        raise SystemExit(f"no results in {RESULTS}: run `make bench` first")
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    header = ("benchmark", "measured", "ideal", "target")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    for line in (header, *table):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
    missing = [n for n in ("finetune_cost", "evaluate_speed", "federated", "precision", "estimate_check", "population",
                           "streaming", "owner_intervals")
               if _load(n) is None]
    if missing:
        print(f"not run yet: {', '.join(missing)}")


if __name__ == "__main__":
    main()
