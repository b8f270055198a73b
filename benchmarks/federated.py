"""Federated runs on SmolLM2: framework overhead, scale, and bytes on the wire, in one run.

    python benchmarks/federated.py [--clients 8 32 128] [--rounds 2] [--steps 2]

1. Overhead: a simulated run (Flower + Ray, emulator delivery included) vs a plain sequential
   loop that trains the same clients on the same data with the same seeds and averages them.
2. Scale: peak resident memory of the whole process tree (server + Ray actors) and seconds per
   round for a growing number of clients with the same number per round.
3. Bytes per round per client vs the size of the full model.

Writes benchmarks/results/federated.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recipes.procs import tree_rss  # noqa: E402
from scaleot_fed.env import configure_environment  # noqa: E402

configure_environment(offline=True)


class TreeMemory:
    """Peak summed RSS of this process and all its descendants, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def base_config(out: str, clients: int, per_round: int, rounds: int, steps: int, emulator_path: str):
    from simulations.config import fed_config_from_dict

    return fed_config_from_dict({
        "run": {"out": out, "model": "smollm2-135m", "task": "piqa", "num_rounds": rounds, "num_clients": clients,
                "clients_per_round": per_round, "train_limit": max(800, 20 * clients), "eval_limit": 8,
                "eval_every": 1000, "final_table": False, "eval_batch_size": 8},
        "partition": {"kind": "iid"},
        "strategy": {"name": "fedavg"},
        "finetune": {"mode": "lora", "steps": steps, "batch_size": 4, "lr": 1e-3},
        "emulator": {"path": emulator_path},
    })


def sequential_loop(config) -> float:
    """The same training without Flower or Ray: one process, clients one after another."""
    import torch

    from scaleot_fed.emulator import load_emulator
    from scaleot_fed.finetune import finetune, make_trainable
    from simulations.client_app import exchange_state
    from simulations.federation import FederatedRun
    from simulations.partition import client_data

    start = time.perf_counter()
    emulator = load_emulator(config.emulator.path)
    torch.manual_seed(config.run.seed)
    model = make_trainable(emulator.model, list(emulator.adapter_positions()), config.finetune)
    names = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    params = dict(model.named_parameters())
    global_state = exchange_state(model, names)
    sampler = FederatedRun(config)
    for round_ in range(1, config.run.num_rounds + 1):
        updates = []
        for pid in sampler.sample_partitions(round_):
            with torch.no_grad():
                for n in names:
                    params[n].copy_(global_state[n])
            train, val = client_data(config, pid, config.run.num_clients)
            local = dataclasses.replace(config.finetune, seed=hash((config.run.seed, round_, pid)) % (2**31),
                                        eval_items=len(val), eval_every=config.finetune.steps, select_best=False)
            finetune(model, emulator.tokenizer, train, val, local, progress=False)
            updates.append((len(train), exchange_state(model, names)))
        total = sum(n for n, _ in updates)
        global_state = {k: sum(n * s[k] for n, s in updates) / total for k in names}
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--per-round", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "federated.json"))
    args = parser.parse_args()

    from scaleot_fed.emulator import EmulatorConfig, save_emulator
    from scaleot_fed.emulator_build import build_emulator
    from scaleot_fed.models import count_parameters, load_model
    from simulations.runner import simulate

    report: dict = {"rounds": args.rounds, "local_steps": args.steps, "per_round": args.per_round, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model("smollm2-135m")
        full_bytes = count_parameters(loaded.model) * 4
        emulator = build_emulator(loaded.model, EmulatorConfig("uniform-drop", 4, 0.5, 0.5))
        emulator_path = save_emulator(emulator, Path(tmp) / "emulator", tokenizer=loaded.tokenizer)
        del loaded, emulator
        os.environ["SCALEOT_FED_EMULATOR_CACHE"] = str(Path(tmp) / "client-cache")  # clients start without it

        # 1. overhead: a small federation, simulated vs sequential
        small = base_config(str(Path(tmp) / "overhead"), 4, 2, args.rounds, args.steps, str(emulator_path))
        start = time.perf_counter()
        simulate(small)
        simulated = time.perf_counter() - start
        sequential = sequential_loop(small)
        report["overhead"] = {"clients": 4, "per_round": 2, "simulated_s": simulated, "sequential_s": sequential,
                              "ratio": simulated / sequential}
        print(f"overhead: simulated {simulated:.1f} s vs sequential {sequential:.1f} s -> x{simulated / sequential:.2f}")

        # 2./3. scale and bytes
        for n in args.clients:
            config = base_config(str(Path(tmp) / f"scale-{n}"), n, min(args.per_round, n), args.rounds, args.steps,
                                 str(emulator_path))
            with TreeMemory() as memory:
                start = time.perf_counter()
                out = simulate(config)
                wall = time.perf_counter() - start
            metrics = json.loads((out / "metrics.json").read_text())
            rounds = metrics["rounds"]
            per_client_round = (rounds[-1]["bytes_down"] + rounds[-1]["bytes_up"]) / rounds[-1]["successful"]
            report["runs"][n] = {
                "wall_s": wall,
                "round_s": [r["seconds"] for r in rounds],
                "peak_tree_rss_mb": memory.peak / 2**20,
                "emulator_bytes_down": sum(r["emulator_bytes_down"] for r in rounds),
                "bytes_per_client_per_round": per_client_round,
                "bytes_per_client_per_round_vs_full_model": per_client_round / full_bytes,
            }
            r = report["runs"][n]
            print(f"{n:4d} clients: peak {r['peak_tree_rss_mb']:.0f} MB, rounds {', '.join(f'{s:.1f}' for s in r['round_s'])} s, "
                  f"{per_client_round / 1e6:.2f} MB per client per round ({r['bytes_per_client_per_round_vs_full_model']:.4%} "
                  f"of the {full_bytes / 1e6:.0f} MB full model), emulator sent {r['emulator_bytes_down'] / 1e6:.0f} MB")
    report["full_model_bytes"] = full_bytes
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
