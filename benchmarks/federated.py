"""Federated runs on SmolLM2: framework overhead, memory, scale and bytes on the wire, in one run.

    python benchmarks/federated.py [--clients 8 32 128] [--rounds 2] [--steps 2] [--repeats 3]

(c) Overhead: a simulated run (Flower + Ray, emulator delivery included) vs a plain loop in one
    process (every core) that trains the same clients on the same data with the same seeds and
    averages them; paired repeats; the simulation's rounds broken down (training phase vs the
    owners' own work, client evaluation, the server's plug-in evaluation, start-up).
(e) Peak resident memory of the whole process tree (server + Ray daemons + actors) vs what it
    must hold: Ray's daemons measured empty, the server's process with the full model and the
    emulator, and per concurrent actor one owner's training measured alone.
Scale: peak memory and seconds per round for a growing population, the same number per round;
bytes per round per client vs the size of the full model.

Writes benchmarks/results/federated.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scaleot_fed.env import configure_environment  # noqa: E402
from scaleot_fed.procs import descendants, process_table, tree_rss  # noqa: E402

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
                "eval_every": 1000, "final_table": False, "eval_batch_size": 8, "client_eval": False},
        "partition": {"kind": "iid"},
        "strategy": {"name": "fedavg"},
        "finetune": {"mode": "lora", "steps": steps, "batch_size": 4, "lr": 1e-3},
        "emulator": {"path": emulator_path},
    })


def sequential_loop(config) -> dict:
    """The same training without Flower or Ray: one process (every core), clients one after
    another, the same data and seeds, FedAvg by hand. Returns its seconds by phase."""
    import torch

    from scaleot_fed.emulator import load_emulator
    from scaleot_fed.finetune import finetune, make_trainable
    from simulations.client_app import exchange_state
    from simulations.federation import FederatedRun
    from simulations.partition import client_data

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    emulator = load_emulator(config.emulator.path)
    torch.manual_seed(config.run.seed)
    model = make_trainable(emulator.model, list(emulator.adapter_positions()), config.finetune)
    names = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    params = dict(model.named_parameters())
    global_state = exchange_state(model, names)
    sampler = FederatedRun(config)
    setup = time.perf_counter() - start
    rounds = []
    for round_ in range(1, config.run.num_rounds + 1):
        round_start, updates = time.perf_counter(), []
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
        rounds.append(time.perf_counter() - round_start)
    torch.set_num_threads(1)
    return {"setup_s": setup, "round_s": rounds, "total_s": time.perf_counter() - start}


def overhead(args, tmp: Path, emulator_path: Path) -> dict:
    """(c) simulated vs plain loop, paired repeats, with the simulation's per-round breakdown."""
    from simulations.runner import simulate

    pairs = []
    for repeat in range(args.repeats):
        config = base_config(str(tmp / f"overhead-{repeat}"), args.overhead_clients, args.overhead_clients,
                             args.rounds, args.overhead_steps, str(emulator_path))
        start = time.perf_counter()
        out = simulate(config)
        simulated = time.perf_counter() - start
        rows = json.loads((out / "metrics.json").read_text())["rounds"]
        loop = sequential_loop(config)
        # steady state: the rounds without the final plug-in evaluation (the loop has none)
        sim_rounds = sum(r["seconds"] - r["timing"].get("seconds_plug_in_eval", 0.0) for r in rows)
        pairs.append({
            "simulated_s": simulated, "sequential_s": loop["total_s"], "ratio": simulated / loop["total_s"],
            "round_ratio": sim_rounds / sum(loop["round_s"]),
            "sim_startup_and_reports_s": simulated - sum(r["seconds"] for r in rows),
            "sim_rounds": [r["timing"] | {"seconds": r["seconds"]} for r in rows], "loop": loop,
        })
        print(f"  repeat {repeat + 1}: simulated {simulated:.1f} s vs loop {loop['total_s']:.1f} s "
              f"(rounds only: {pairs[-1]['round_ratio']:.2f}x)", flush=True)
    med = {k: statistics.median(p[k] for p in pairs) for k in ("simulated_s", "sequential_s", "ratio", "round_ratio",
                                                                "sim_startup_and_reports_s")}
    rounds = [r for p in pairs for r in p["sim_rounds"]]
    parallel = min(args.overhead_clients, os.cpu_count() or 1)
    client = statistics.median(r["client_seconds_mean"] for r in rounds)
    train = statistics.median(r["seconds_train"] for r in rounds)
    ideal_train = client * -(-args.overhead_clients // parallel)  # owners run `parallel` at a time
    print(f"(c) simulation vs plain loop ({args.overhead_clients} clients, all per round, {args.rounds} rounds x "
          f"{args.overhead_steps} steps; median of {args.repeats} paired repeats)")
    print(f"    whole run {med['ratio']:.2f}x ({med['simulated_s']:.1f} s vs {med['sequential_s']:.1f} s; start-up, "
          f"delivery and reports {med['sim_startup_and_reports_s']:.1f} s), rounds only {med['round_ratio']:.2f}x "
          "(ideal 1.00x, or below with owners in parallel)")
    print(f"    a round's training phase {train:.2f} s: owners' own work {client:.2f} s each, {parallel} at a time "
          f"-> {ideal_train:.2f} s; messaging, (de)serialisation and scheduling {train - ideal_train:.2f} s")
    return {"clients": args.overhead_clients, "rounds": args.rounds, "steps": args.overhead_steps,
            "median": med, "round_train_s": train, "client_s": client, "parallel_owners": parallel, "pairs": pairs}


def must_hold(emulator_path: Path, full_bytes: int, emulator_bytes: int, actors: int) -> dict:
    """(e) what a simulation cannot do without: Ray's daemons (measured empty), the server
    (a process with the full model and the emulator), and per actor one owner's training
    (measured alone in a fresh process: interpreter, emulator, LoRA state, activations)."""
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    time.sleep(3)
    ray_empty = sum(p.rss_bytes for p in descendants(os.getpid(), process_table()))
    ray.shutdown()
    cmd = [sys.executable, str(Path(__file__).with_name("finetune_cost.py")), "--worker", "emulator + LoRA",
           "--emulator", str(emulator_path), "--steps", "2", "--threads", "1"]
    owner = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    server = owner["baseline_rss"] + full_bytes + emulator_bytes
    return {"ray_daemons": ray_empty, "server": server, "owner": owner["peak_rss"], "actors": actors,
            "total": ray_empty + server + actors * owner["peak_rss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--per-round", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--overhead-clients", type=int, default=4)
    parser.add_argument("--overhead-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale-only", action="store_true",
                        help="only the growing populations (e.g. --clients 10 100 1000 --per-round 4)")
    parser.add_argument("--memory-only", action="store_true",
                        help="only (e): the first population's peak memory vs what it must hold")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "federated.json"))
    args = parser.parse_args()

    from scaleot_fed.emulator import EmulatorConfig, save_emulator
    from scaleot_fed.emulator.build import build_emulator
    from scaleot_fed.models import count_parameters, load_model
    from simulations.runner import simulate

    report: dict = {"rounds": args.rounds, "local_steps": args.steps, "per_round": args.per_round, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        loaded = load_model("smollm2-135m")
        full_bytes = count_parameters(loaded.model) * 4
        emulator = build_emulator(loaded.model, EmulatorConfig("uniform-drop", 4, 0.5, 0.5))
        emulator_path = save_emulator(emulator, tmp / "emulator", tokenizer=loaded.tokenizer)
        emulator_bytes = (emulator_path / "model.safetensors").stat().st_size
        del loaded, emulator
        os.environ["SCALEOT_FED_EMULATOR_CACHE"] = str(tmp / "client-cache")  # clients start without it

        if not (args.scale_only or args.memory_only):
            report["overhead"] = overhead(args, tmp, emulator_path)
        if args.memory_only:
            args.clients = args.clients[:1]

        # (e) and scale: peak memory of the whole process tree for growing populations
        for n in args.clients:
            if args.scale_only:  # every population starts without the emulator: its delivery is measured too
                os.environ["SCALEOT_FED_EMULATOR_CACHE"] = str(tmp / f"client-cache-{n}")
            config = base_config(str(tmp / f"scale-{n}"), n, min(args.per_round, n), args.rounds, args.steps,
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
                  f"of the {full_bytes / 1e6:.0f} MB full model), emulator sent {r['emulator_bytes_down'] / 1e6:.0f} MB",
                  flush=True)
        actors = min(args.per_round, os.cpu_count() or 1)
        need = {"total": float("nan")} if args.scale_only else must_hold(emulator_path, full_bytes, emulator_bytes, actors)
        peak = report["runs"][args.clients[0]]["peak_tree_rss_mb"] * 2**20
        report["memory"] = need | {"peak": peak, "ratio": peak / need["total"], "clients": args.clients[0]}
        if args.scale_only:
            peaks = [report["runs"][n]["peak_tree_rss_mb"] for n in args.clients]
            print(f"scale: peak memory {' -> '.join(f'{p:.0f}' for p in peaks)} MB for {args.clients} owners "
                  f"({args.per_round} per round): {max(peaks) / min(peaks):.2f}x from the smallest to the largest "
                  "population (ideal: 1.00x, flat)")
        else:
            print(f"(e) peak memory of a {args.clients[0]}-client simulation {peak / 2**30:.2f} GB vs what it must "
                  f"hold {need['total'] / 2**30:.2f} GB = {peak / need['total']:.2f}x (Ray daemons "
                  f"{need['ray_daemons'] / 2**20:.0f} MB + server {need['server'] / 2**20:.0f} MB + {actors} actors x "
                  f"{need['owner'] / 2**20:.0f} MB)")
    report["full_model_bytes"] = full_bytes
    if args.memory_only and Path(args.out).exists():  # (e) alone: the file keeps its (c) measurement
        report = json.loads(Path(args.out).read_text()) | {k: report[k] for k in ("memory", "full_model_bytes")} | {
            "memory_runs": report["runs"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
