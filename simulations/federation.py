"""The model owner's federated loop: one concrete loop around a Flower strategy.

Per round: pick clients (deterministically, by partition id), let the strategy configure and
aggregate, reject bad updates (errors, NaN/Inf, wrong keys or shapes) with a log line naming the
client, stop with an error when fewer than ``min_successful_clients`` remain (never silently keep
the old weights), evaluate, and checkpoint (aggregate, strategy state, round, RNG states,
resolved config) so ``--resume`` continues a killed run to the same result.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import inspect
import json
import logging
import pickle
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent
from safetensors.torch import load_file, save_file

from scaleot_fed.attack import attack_emulator
from scaleot_fed.config import as_dict
from scaleot_fed.emulator import check_shippable
from scaleot_fed.errors import ConfigError, ScaleOTError
from scaleot_fed.evaluate import evaluate_multiple_choice
from scaleot_fed.finetune import finetune, make_trainable
from scaleot_fed.models import load_model
from scaleot_fed.offsite import ROWS, markdown_table, plot_results, prepare_emulator
from scaleot_fed.plugin import plug_in_trained, save_plugged
from scaleot_fed.tasks import load_task
from strategies import STRATEGIES, build_strategy

from .client_app import delivery_content
from .config import FedConfig
from .partition import client_data, partition_indices, train_items
from .privacy import UNIT_WEIGHT, PrivacyLedger, wrap_strategy
from .secure import secure_round

log = logging.getLogger("scaleot_fed.federation")


class RoundFailed(ScaleOTError):
    """Too few clients of a round succeeded."""


def make_strategy(config: FedConfig) -> tuple[Strategy, Strategy]:
    """The run's strategy and what aggregates (the same, or Flower's DP wrapper around it).

    Under differential privacy owners are averaged with equal weights (a weight from the data
    size would change the average's sensitivity), so the strategy weighs by :data:`UNIT_WEIGHT`.
    """
    params = dict(config.strategy.params)
    if config.privacy.enabled:
        if params.get("weighted_by_key", UNIT_WEIGHT) != UNIT_WEIGHT:
            raise ConfigError("[privacy] averages owners with equal weights; remove strategy.params.weighted_by_key")
        if "weighted_by_key" in inspect.signature(STRATEGIES[config.strategy.name]).parameters:
            params["weighted_by_key"] = UNIT_WEIGHT
    base = build_strategy(config.strategy.name, params)
    try:
        return base, wrap_strategy(base, config.privacy, config.run.num_clients, config.run.clients_per_round)
    except ValueError as exc:
        raise ConfigError(f"[privacy] {exc}") from exc


class _SelectedGrid:
    """A view of the grid that shows only the nodes this round picked, in a fixed order, so the
    strategy's own sampling takes exactly them."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._nodes = grid, list(node_ids)

    def get_node_ids(self):
        return list(self._nodes)

    def __getattr__(self, name):
        return getattr(self._grid, name)


def _to_torch(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in arrays.items()}


class FederatedRun:
    """Everything the server does for one run; ``run(grid)`` is the whole job."""

    def __init__(self, config: FedConfig, resume: bool = False) -> None:
        self.config = config
        self.out = Path(config.run.out)
        self.resume = resume
        self.metrics: list[dict] = []
        self.bytes_down_total = 0
        self.bytes_up_total = 0
        self.emulator_bytes_down = 0
        self.stopped: str | None = None
        self.deployed = False  # owners bring their own data (a deployment), not our partitions

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        run = self.config.run
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(as_dict(self.config), indent=1))
        loaded = load_model(run.model)
        self.full, self.tokenizer = loaded.model, loaded.tokenizer
        self.emulator = prepare_emulator(self.config.emulator, self.full, self.tokenizer, self.config.layer_replace,
                                         run.model, self.out, log=log.info)
        self.emulator_path = Path(self.config.emulator.path or self.out / self.config.emulator.name / "emulator")
        self.sha = self.emulator.manifest["weights_sha256"]
        check_shippable(self.emulator.manifest, run.private_blocks)  # before anything is sent
        torch.manual_seed(run.seed)  # LoRA's initial A comes from here: same seed, same start
        # The server's emulator becomes the holder of the aggregate (the pristine one is on disk).
        self.trainable = make_trainable(self.emulator.model, list(self.emulator.adapter_positions()),
                                        self.config.finetune)
        self.names = tuple(n for n, p in self.trainable.named_parameters() if p.requires_grad)
        self.arrays = ArrayRecord(torch_state_dict={n: p.detach().clone() for n, p in self.trainable.named_parameters()
                                                    if n in self.names})
        self.base_strategy, self.strategy = make_strategy(self.config)
        self.privacy = PrivacyLedger(self.config.privacy, run.num_clients)
        self.eval_items = load_task(run.eval_task or run.task, "validation", run.eval_limit)
        self.start_round = 1
        if self.resume:
            self._load_checkpoint()

    # ------------------------------------------------------------------ emulator delivery

    def _wait_for_nodes(self, grid: Grid, timeout: float = 120.0) -> list[int]:
        deadline = time.time() + timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.config.run.num_clients:
                return nodes
            if time.time() > deadline:
                raise ScaleOTError(
                    f"only {len(nodes)} of num_clients={self.config.run.num_clients} data owners connected "
                    f"within {timeout:.0f} s; start more SuperNodes or lower num_clients"
                )
            time.sleep(1.0)

    def deliver(self, grid: Grid) -> None:
        """Ask every data owner for the emulator's hash; send it only to those that lack it.

        One node at a time, so that owners sharing a machine (a simulation's actors) find it on
        disk once the first has received it: the emulator crosses the wire once per process
        that lacks it, never per round.
        """
        self.node_to_partition: dict[int, int] = {}
        tamper = self.config.debug.tamper_delivery
        for node in self._wait_for_nodes(grid):
            owner = "?"
            try:
                query = RecordDict({"config": ConfigRecord({"sha256": self.sha})})
                record = self._send_one(grid, Message(query, dst_node_id=node, message_type="query.emulator")
                                        ).content["emulator"]
                owner = int(record["partition-id"])
                if not bool(record["has"]):
                    content = delivery_content(self.emulator_path, self.sha)
                    if tamper:  # debug: the receiver must notice
                        weights = content.array_records["emulator"]["weights"].numpy().copy()
                        weights[len(weights) // 2] ^= 0xFF
                        content = delivery_content(self.emulator_path, self.sha, weights)
                        tamper = False
                    size = content.array_records["emulator"].count_bytes() + sum(
                        len(v) for v in content.config_records["files"].values())
                    record = self._send_one(grid, Message(content, dst_node_id=node, message_type="query.emulator")
                                            ).content["emulator"]
                    if not bool(record["has"]):
                        raise ScaleOTError("it could not store the emulator")
                    self.emulator_bytes_down += size
                    log.info("delivered the emulator (%.1f MB) to node %s", size / 1e6, node)
            except ScaleOTError as exc:
                # One owner that cannot take the emulator does not stop the federation.
                log.error("data owner %s (node %s) is left out of this run: %s", owner, node, exc)
                continue
            self.node_to_partition[node] = owner
        if not self.node_to_partition:
            raise ScaleOTError("no data owner could take the emulator (see the errors above)")
        if any(p < 0 for p in self.node_to_partition.values()):
            # Deployed owners hold their own data (no partition of ours): number them by node id.
            self.node_to_partition = {n: i for i, n in enumerate(sorted(self.node_to_partition))}
            self.deployed = True
            log.info("data owners (node id -> owner number): %s", self.node_to_partition)
            run = self.config.run
            if run.final_table and (run.centralised_full_finetune or run.centralised_offsite or run.attack):
                raise ScaleOTError("run.centralised_* and run.attack train on the owners' pooled data, which the "
                                   "model owner of a deployment does not have: they are simulation-only")
        else:
            self._plot_partitions()
        self.partition_to_node = {p: n for n, p in self.node_to_partition.items()}

    def _send_one(self, grid: Grid, message: Message) -> Message:
        replies = list(grid.send_and_receive([message], timeout=600))
        if not replies or replies[0].has_error():
            reason = replies[0].error.reason if replies else "no reply"
            raise ScaleOTError(f"data owner {message.metadata.dst_node_id} failed the emulator query: {reason}")
        return replies[0]

    # ------------------------------------------------------------------ rounds

    def sample_partitions(self, round_: int) -> list[int]:
        rng = random.Random(f"{self.config.run.seed}-round-{round_}")
        return sorted(rng.sample(range(self.config.run.num_clients), self.config.run.clients_per_round))

    def _train_config(self, round_: int) -> ConfigRecord:
        return ConfigRecord({"fed-config": self.config.to_json(), "sha256": self.sha, "round": round_})

    def check_reply(self, msg: Message) -> str | None:
        """Why a train reply cannot be averaged in, or None when it can."""
        if msg.has_error():
            return f"client error: {msg.error.reason.strip().splitlines()[-1] if msg.error.reason else 'unknown'}"
        arrays = msg.content.array_records.get("arrays")
        if arrays is None:
            return "no arrays in the reply"
        if set(arrays.keys()) != set(self.names):
            extra = sorted(set(arrays.keys()) - set(self.names))[:2]
            missing = sorted(set(self.names) - set(arrays.keys()))[:2]
            return f"wrong keys (unexpected {extra}, missing {missing})"
        for name, expected in self.arrays.items():
            value = arrays[name].numpy()
            if tuple(value.shape) != tuple(expected.shape):
                return f"wrong shape for {name}: {tuple(value.shape)} instead of {tuple(expected.shape)}"
            if not np.isfinite(value).all():
                return f"NaN or Inf in {name}"
        return None

    def run_round(self, grid: Grid, round_: int) -> dict:
        start = time.time()
        partitions = self.sample_partitions(round_)
        nodes = [self.partition_to_node[p] for p in partitions if p in self.partition_to_node]
        view = _SelectedGrid(grid, nodes)
        train = self._train_secure if self.config.secure_aggregation.enabled else self._train_plain
        new_arrays, train_metrics, row = train(grid, view, nodes, partitions, round_)
        self.arrays = new_arrays
        bytes_down = row.pop("bytes_down")

        eval_metrics = train_metrics  # the clients' own validation loss after local training
        if self.config.run.client_eval:
            eval_messages = list(self.strategy.configure_evaluate(round_, self.arrays, self._train_config(round_), view))
            bytes_down += sum(m.content.array_records["arrays"].count_bytes() for m in eval_messages)
            eval_replies = [m for m in grid.send_and_receive(eval_messages, timeout=3600) if not m.has_error()]
            eval_replies.sort(key=lambda m: self.node_to_partition[m.metadata.src_node_id])
            eval_metrics = self.strategy.aggregate_evaluate(round_, eval_replies) if eval_replies else None

        row = {
            "round": round_,
            "clients": partitions,
            "successful": row.pop("successful"),
            "failed": row.pop("failed"),
            "train_loss": float(train_metrics["train-loss"]) if train_metrics else None,
            "update_norm": float(train_metrics["update-norm"]) if train_metrics and "update-norm" in train_metrics else None,
            "client_val_loss": float(eval_metrics["client-val-loss"]) if eval_metrics else None,
            "bytes_down": bytes_down + (self.emulator_bytes_down if round_ == self.start_round else 0),
            "bytes_up": row.pop("bytes_up"),
            "emulator_bytes_down": self.emulator_bytes_down if round_ == self.start_round else 0,
        } | row | self.privacy.after_round(self.metrics, partitions)
        if round_ % self.config.run.eval_every == 0 or round_ == self.config.run.num_rounds:
            row |= {f"plug_in_{k}": v for k, v in self.plug_in_eval().items() if k != "n"}
        row["seconds"] = time.time() - start
        self.bytes_down_total += row["bytes_down"]
        self.bytes_up_total += row["bytes_up"]
        return row

    def _train_plain(self, grid: Grid, view: Grid, nodes: list[int], partitions: list[int], round_: int):
        """Train messages through the strategy; every update checked before it is averaged."""
        messages = list(self.strategy.configure_train(round_, self.arrays, self._train_config(round_), view))
        bytes_down = sum(m.content.array_records["arrays"].count_bytes() for m in messages)
        replies = list(grid.send_and_receive(messages, timeout=3600))
        good, failed = [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            reason = self.check_reply(msg)
            if reason:
                failed.append(self.node_to_partition.get(node, -1))
                log.warning("round %d: rejected update of client %s (node %s): %s", round_,
                            self.node_to_partition.get(node), node, reason)
            else:
                good.append(msg)
        answered = {m.metadata.src_node_id for m in replies}
        failed += [p for p in partitions if self.partition_to_node.get(p) not in answered]
        self._enough(round_, len(good), partitions, failed)
        good.sort(key=lambda m: self.node_to_partition[m.metadata.src_node_id])  # fixed order: same sums
        bytes_up = sum(m.content.array_records["arrays"].count_bytes() for m in good)
        new_arrays, train_metrics = self.strategy.aggregate_train(round_, good)
        if new_arrays is None:
            why = (" (differential privacy accounts for exactly clients_per_round updates per round: "
                   "every sampled owner must succeed)" if self.config.privacy.enabled and failed else "")
            raise RoundFailed(f"round {round_}: the strategy produced no aggregate{why}")
        return new_arrays, train_metrics, {"successful": len(good), "failed": sorted(set(failed)),
                                           "bytes_down": bytes_down, "bytes_up": bytes_up}

    def _train_secure(self, grid: Grid, view: Grid, nodes: list[int], partitions: list[int], round_: int):
        """One SecAgg+ round: the server learns the average, never a single owner's update."""
        new_arrays, stats = secure_round(grid, nodes, self.arrays, self._train_config(round_), round_,
                                         self.config.secure_aggregation, self._max_examples())
        summed = set(stats.pop("nodes"))
        failed = [p for p in partitions if self.partition_to_node.get(p) not in summed]
        if failed:
            log.warning("round %d: clients %s are not in the secure sum (dropped out)", round_, failed)
        self._enough(round_, len(summed), partitions, failed)
        if new_arrays is None:
            raise RoundFailed(f"round {round_}: secure aggregation halted (too few owners left to unmask the sum; "
                              f"reconstruction_threshold={self.config.secure_aggregation.reconstruction_threshold})")
        return new_arrays, stats.pop("metrics"), stats | {
            "successful": len(summed), "failed": failed}

    def _max_examples(self) -> int:
        """The largest owner's training-item count (SecAgg+ scales updates by count / this, so a
        tight bound keeps precision); deployed owners' data is unknown here: 1000, Flower's default."""
        if self.deployed:
            return 1000
        run = self.config.run
        return max(len(client_data(self.config, p, run.num_clients)[0]) for p in range(run.num_clients))

    def _enough(self, round_: int, good: int, partitions: list[int], failed: list[int]) -> None:
        if good < self.config.run.min_successful_clients:
            raise RoundFailed(
                f"round {round_}: only {good} of {len(partitions)} clients returned a usable update "
                f"(min_successful_clients={self.config.run.min_successful_clients}; failed clients {sorted(set(failed))}); "
                f"the last good aggregate is in {self.out / 'checkpoint'}"
            )

    # ------------------------------------------------------------------ evaluation

    def _load_into_trainable(self) -> None:
        params = dict(self.trainable.named_parameters())
        with torch.no_grad():
            for name, value in _to_torch(self.arrays).items():
                params[name].copy_(value)

    def plugged_model(self):
        """The full model with the current aggregate plugged in."""
        self._load_into_trainable()
        return plug_in_trained(self.full, self.trainable, self.emulator)

    def _evaluate(self, model) -> dict:
        return evaluate_multiple_choice(model, self.tokenizer, self.eval_items, batch_size=self.config.run.eval_batch_size)

    def plug_in_eval(self) -> dict:
        return self._evaluate(self.plugged_model())

    # ------------------------------------------------------------------ checkpoints and reports

    def save_checkpoint(self, round_: int) -> None:
        ckpt = self.out / "checkpoint"
        tmp = self.out / ".checkpoint.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in _to_torch(self.arrays).items()}, str(tmp / "aggregate.safetensors"))
        # Our own file, written and read by the server only (never from the network). A DP
        # wrapper's accountant is not kept: it is rebuilt from the rounds done (see _load_checkpoint).
        (tmp / "strategy.pkl").write_bytes(pickle.dumps(self.base_strategy.__dict__))
        state = {
            "round": round_,
            "sha256": self.sha,
            # Client sampling uses its own seeded Random per round; the global states are kept so a
            # resumed server continues exactly where it stopped (Flower's sampling orders nodes with them).
            "python_random": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "torch_random": torch.get_rng_state().tolist(),
            "bytes_down_total": self.bytes_down_total,
            "bytes_up_total": self.bytes_up_total,
        }
        (tmp / "state.json").write_text(json.dumps(state))
        (tmp / "metrics.json").write_text(json.dumps(self.metrics))
        if ckpt.exists():
            old = self.out / ".checkpoint.old"
            ckpt.replace(old)
            tmp.replace(ckpt)
            shutil.rmtree(old)
        else:
            tmp.replace(ckpt)

    def _load_checkpoint(self) -> None:
        ckpt = self.out / "checkpoint"
        if not (ckpt / "state.json").is_file():
            raise ScaleOTError(f"{self.out} has no checkpoint to resume from")
        state = json.loads((ckpt / "state.json").read_text())
        if state["sha256"] != self.sha:
            raise ScaleOTError(f"the checkpoint in {ckpt} belongs to another emulator")
        self.arrays = ArrayRecord(torch_state_dict=load_file(str(ckpt / "aggregate.safetensors")))
        self.base_strategy.__dict__.update(pickle.loads((ckpt / "strategy.pkl").read_bytes()))
        accountant = getattr(self.strategy, "accountant", None)
        if accountant is not None and state["round"] > 0:
            accountant.compose(GaussianPrivacyEvent(self.config.privacy.noise_multiplier, self.config.run.clients_per_round,
                                                    self.config.run.num_clients), state["round"])
        torch.set_rng_state(torch.tensor(state["torch_random"], dtype=torch.uint8))
        version, internal, gauss = state["python_random"]
        random.setstate((version, tuple(internal), gauss))
        self.metrics = json.loads((ckpt / "metrics.json").read_text())
        self.bytes_down_total, self.bytes_up_total = state["bytes_down_total"], state["bytes_up_total"]
        self.start_round = state["round"] + 1
        log.info("resuming %s after round %d", self.out, state["round"])

    def write_metrics(self) -> None:
        (self.out / "metrics.json").write_text(json.dumps(
            {"rounds": self.metrics, "bytes_down_total": self.bytes_down_total, "bytes_up_total": self.bytes_up_total,
             "emulator_bytes": (self.emulator_path / "model.safetensors").stat().st_size,
             "trainable_bytes": self.arrays.count_bytes(),
             "full_model_bytes": sum(p.numel() * p.element_size() for p in self.full.parameters())}
            | ({"privacy": self.privacy.report(self.metrics)} if self.config.privacy.enabled else {})
            | ({"stopped_early": self.stopped} if self.stopped else {}), indent=1))
        keys = sorted({k for row in self.metrics for k in row})
        with open(self.out / "metrics.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            for row in self.metrics:
                writer.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in row.items()})
        self._plot_rounds()

    def _plot_rounds(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.metrics]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        acc = [(r["round"], 100 * r["plug_in_acc"]) for r in self.metrics if "plug_in_acc" in r]
        if acc:
            a1.plot(*zip(*acc), marker="o", label="plug-in acc")
        from matplotlib.ticker import MaxNLocator

        for axis in (a1, a2):
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        a1.set_xlabel("round")
        a1.set_ylabel("accuracy (%)")
        a1.set_title("server-side plug-in accuracy")
        for key, label in (("train_loss", "client train loss"), ("client_val_loss", "client val loss (emulator)")):
            values = [r.get(key) for r in self.metrics]
            if any(v is not None for v in values):
                a2.plot(rounds, values, marker="o", label=label)
        a2.set_xlabel("round")
        a2.set_title("losses")
        a2.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.out / "rounds.png", dpi=110)
        plt.close(fig)

    def _plot_partitions(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        run = self.config.run
        parts = partition_indices(run.task, run.train_limit, self.config.partition, run.num_clients, run.seed)
        items = train_items(run.task, run.train_limit)
        labels = sorted({i.gold for i in items})
        counts = np.array([[sum(items[j].gold == lab for j in p) for lab in labels] for p in parts])
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(parts) + 2), 3.2))
        bottom = np.zeros(len(parts))
        for k, lab in enumerate(labels):
            ax.bar(range(len(parts)), counts[:, k], bottom=bottom, label=f"gold={lab}")
            bottom += counts[:, k]
        ax.set_xlabel("client (partition id)")
        ax.set_ylabel("training items")
        ax.set_title(f"{run.task}: {self.config.partition.kind} partition")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(self.out / "partitions.png", dpi=110)
        plt.close(fig)
        (self.out / "partitions.json").write_text(json.dumps(
            {"sizes": [len(p) for p in parts], "label_counts": counts.tolist(), "labels": labels}))

    def final_table(self) -> dict:
        """The five rows after the last round (Full FT only when asked: it is centralised)."""
        run = self.config.run
        from scaleot_fed.emulator import load_emulator

        rows = {"full_zero_shot": self._evaluate(self.full),
                "emulator_zero_shot": self._evaluate(load_emulator(self.emulator_path).model)}
        if run.centralised_full_finetune or run.centralised_offsite or run.attack:
            # The pooled client data, trained for as many examples as the whole federation saw.
            parts = [client_data(self.config, p, run.num_clients) for p in range(run.num_clients)]
            pooled = [i for train, _ in parts for i in train]
            dev = [i for _, val in parts for i in val]
            ft = copy.deepcopy(self.config.finetune)
            ft.steps = run.num_rounds * run.clients_per_round * ft.steps
            ft.eval_items, ft.eval_every = len(dev), max(1, ft.steps // 4)
        if run.centralised_full_finetune:
            model = copy.deepcopy(self.full)
            trained = make_trainable(model, list(range(model.config.num_hidden_layers)), ft)
            finetune(trained, self.tokenizer, pooled, dev, ft, progress=False)
            rows["full_finetune"] = self._evaluate(trained)
        if run.attack:  # the owners' pooled data, every emulator weight, the attacker's own budget
            attack_ft = dataclasses.replace(self.config.attack, eval_items=len(dev))
            model, _ = attack_emulator(self.emulator_path, pooled, dev, attack_ft)
            rows["emulator_attack"] = self._evaluate(model)
            del model
        central = None
        if run.centralised_offsite:
            emulator = load_emulator(self.emulator_path)
            trained = make_trainable(emulator.model, list(emulator.adapter_positions()), ft)
            finetune(trained, self.tokenizer, pooled, dev, ft, progress=False)
            central = {"emulator_finetune": self._evaluate(trained),
                       "plug_in": self._evaluate(plug_in_trained(self.full, trained, emulator)),
                       "steps": ft.steps}
        self._load_into_trainable()
        rows["emulator_finetune"] = self._evaluate(self.trainable)
        plugged = self.plugged_model()
        save_plugged(plugged, self.tokenizer, self.out / "plugged")
        rows["plug_in"] = self._evaluate(plugged)
        entry = {"config": as_dict(self.config.emulator),
                 "num_params": self.emulator.manifest["num_params"],
                 "source_num_params": self.emulator.manifest["source_num_params"]}

        def result(own: dict) -> dict:
            table = rows | own
            attack = {"attack_gap": table["plug_in"]["acc"] - table["emulator_attack"]["acc"]} \
                if "emulator_attack" in table else {}
            return entry | attack | {"rows": {k: table[k] for k in ROWS if k in table},
                                     "gap": table["plug_in"]["acc"] - table["emulator_finetune"]["acc"],
                                     "gap_acc_norm": table["plug_in"]["acc_norm"] - table["emulator_finetune"]["acc_norm"]}

        emulators = {f"federated-{self.config.strategy.name}": result({})}
        if central is not None:
            emulators["centralised"] = result(central) | {"steps": central["steps"]}
        results = {
            "model": run.model, "task": run.task, "n_train": len(train_items(run.task, run.train_limit)),
            "n_eval": len(self.eval_items), "finetune": as_dict(self.config.finetune),
            "emulators": emulators,
            "federation": {"num_clients": run.num_clients, "clients_per_round": run.clients_per_round,
                           "num_rounds": run.num_rounds, "strategy": self.config.strategy.name,
                           "partition": as_dict(self.config.partition)},
        }
        (self.out / "results.json").write_text(json.dumps(results, indent=1))
        (self.out / "results.md").write_text(markdown_table(results))
        plot_results(results, self.out / "results.png")
        return results

    # ------------------------------------------------------------------ the job

    def run(self, grid: Grid) -> None:
        self.setup()
        self.deliver(grid)
        stop_after = self.config.debug.stop_after_round
        for round_ in range(self.start_round, self.config.run.num_rounds + 1):
            try:
                row = self.run_round(grid, round_)
            except PrivacyBudgetExhausted as exc:  # raised before anything of the round was sent
                log.warning("round %d not run: %s; finishing with the aggregate of round %d", round_, exc, round_ - 1)
                self.stopped = f"privacy budget (max_epsilon={self.config.privacy.max_epsilon}) reached before round {round_}"
                self.write_metrics()
                break
            self.metrics.append(row)
            self.save_checkpoint(round_)
            self.write_metrics()
            log.info("round %d: %s", round_, {k: v for k, v in row.items() if k not in ("clients",)})
            if stop_after is not None and round_ >= stop_after and round_ < self.config.run.num_rounds:
                log.warning("debug.stop_after_round=%d: stopping as if killed", stop_after)
                return
        save_file({k: v.contiguous() for k, v in _to_torch(self.arrays).items()}, str(self.out / "aggregate.safetensors"))
        if self.config.run.final_table:
            self.final_table()
        (self.out / "DONE").write_text("ok\n")
