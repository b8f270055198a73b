"""Privacy for the data owners on SmolLM2 + PIQA, side by side in one run: utility against
epsilon under differential privacy, and what secure aggregation (SecAgg+) costs.

    python benchmarks/privacy.py [--noise 0.3 1 3] [--local-noise 1] [--rounds 3]

Every run is a federated simulation of simulations/configs/privacy-piqa.toml (4 owners, all in
every round) with one change; runs already done are read back (resumable):

* ``none``: plain FedAvg; its mean update norm sets the clipping norm C of the DP runs (so
  clipping bites about half of the updates)
* ``secagg``: SecAgg+ instead of plain averaging
* ``central-z<z>``: every owner clips to C, the server adds N(0, (z C)^2) to the sum
* ``local-z<z>``: every owner clips to C and adds N(0, (z C)^2) to its own update

Prints plug-in accuracy, epsilon (client level, delta 1e-5, RDP accountant), seconds and bytes
per round; writes benchmarks/results/privacy.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaleot_fed.env import configure_environment  # noqa: E402

configure_environment(offline=True)

from scaleot_fed.config import load_toml  # noqa: E402
from simulations.config import fed_config_from_dict  # noqa: E402
from simulations.runner import simulate  # noqa: E402

BASE = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "privacy-piqa.toml"


def run(name: str, out_root: Path, rounds: int, **sections) -> dict:
    out = out_root / name
    if not (out / "DONE").exists():
        data = load_toml(BASE)
        data["run"] |= {"out": str(out), "num_rounds": rounds, "eval_every": rounds}
        for section, values in sections.items():
            data[section] = data.get(section, {}) | values
        simulate(fed_config_from_dict(data, name))
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["rounds"]
    last = rows[-1]
    return {
        "name": name,
        "plug_in_acc": last.get("plug_in_acc"),
        "epsilon": last.get("epsilon"),
        "update_norm": statistics.mean(r["update_norm"] for r in rows if r.get("update_norm") is not None)
        if any(r.get("update_norm") is not None for r in rows) else None,
        "seconds_per_round": statistics.mean(r["seconds"] for r in rows[1:] or rows),
        "bytes_up_per_round": statistics.mean(r["bytes_up"] for r in rows),
        "bytes_down_per_round": statistics.mean(r["bytes_down"] - r["emulator_bytes_down"] for r in rows),
        "privacy": metrics.get("privacy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    parser.add_argument("--local-noise", type=float, nargs="*", default=[1.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="runs/privacy-piqa")
    args = parser.parse_args()
    root = Path(args.out)

    results = [run("none", root, args.rounds)]
    clip = float(f"{results[0]['update_norm']:.2g}")
    print(f"mean update norm without DP: {results[0]['update_norm']:.4f} -> clipping_norm C = {clip}", flush=True)
    results.append(run("secagg", root, args.rounds, secure_aggregation={"enabled": True}))
    for z in args.noise:
        results.append(run(f"central-z{z:g}", root, args.rounds,
                           privacy={"mode": "central", "noise_multiplier": z, "clipping_norm": clip}))
    for z in args.local_noise:
        results.append(run(f"local-z{z:g}", root, args.rounds,
                           privacy={"mode": "local", "noise_multiplier": z, "clipping_norm": clip}))

    base = results[0]
    print(f"\n{'run':<14}{'plug-in acc':>12}{'epsilon':>10}{'s/round':>9}{'x plain':>8}{'MB up/round':>13}{'x plain':>8}")
    for r in results:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        print(f"{r['name']:<14}{100 * r['plug_in_acc']:>11.1f}%{eps:>10}{r['seconds_per_round']:>9.1f}"
              f"{r['seconds_per_round'] / base['seconds_per_round']:>8.2f}{r['bytes_up_per_round'] / 1e6:>13.2f}"
              f"{r['bytes_up_per_round'] / base['bytes_up_per_round']:>8.2f}")
    out = Path(__file__).resolve().parent / "results" / "privacy.json"
    out.write_text(json.dumps({"base_config": str(BASE.relative_to(BASE.parents[2])), "rounds": args.rounds,
                               "clipping_norm": clip, "delta": 1e-5, "runs": results}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
