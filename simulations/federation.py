"""The model owner's federated loop: one concrete loop around a Flower strategy.

Per round: pick clients (deterministically, by partition id), let the strategy configure and
aggregate, reject bad updates (errors, NaN/Inf, wrong keys or shapes) with a log line naming the
client, stop with an error when fewer than ``min_successful_clients`` remain (never silently keep
the old weights), evaluate, and checkpoint (:mod:`simulations.checkpoint`) so ``--resume``
continues a killed run to the same result. Delivery of the emulator is in
:mod:`simulations.delivery`, metrics files and the final table in :mod:`simulations.report`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from scaleot_fed.config import as_dict
from scaleot_fed.errors import ConfigError, RunError
from scaleot_fed.finetune import make_trainable
from scaleot_fed.manifest import check_shippable
from scaleot_fed.models import load_model
from scaleot_fed.plugin import plug_in_trained, plugged_for_scoring
from scaleot_fed.rundir import lock_run_dir, write_json
from scaleot_fed.single_owner import prepare_emulator
from scaleot_fed.tracking import STATE, Tracking
from strategies.replies import in_sent_dtypes, pad_replies, reply_problem

from .checkpoint import RoundState, has_checkpoint, load_checkpoint, save_aggregate, save_checkpoint, to_torch
from .config import FedConfig
from .delivery import deliver
from .owners import expected_state, owner_eval_items, personalise, score_with_owners
from .privacy import PrivacyLedger, make_strategy
from .realign_rounds import Realigner
from .report import emulator_bytes, final_table, per_owner_summary, plot_partitions, write_metrics
from .secure import max_examples, secure_round

log = logging.getLogger("scaleot_fed.federation")


class RoundFailed(RunError):
    """Too few clients of a round succeeded."""


class _SelectedGrid:
    """A view of the grid that shows only the nodes this round picked, in a fixed order, so the
    strategy's own sampling takes exactly them."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._nodes = grid, list(node_ids)

    def get_node_ids(self):
        return list(self._nodes)

    def __getattr__(self, name):
        return getattr(self._grid, name)


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
        self.owner_metrics: dict[int, dict] = {}  # the last round's train metrics, per owner
        self.last_plug_in: tuple | None = None  # (aggregate, its plug-in row with items) of the last evaluation

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        run = self.config.run
        self.out = lock_run_dir(self.out)  # simulate() holds it already; `flwr run .` takes it here
        write_json(self.out / "config.json", as_dict(self.config))
        loaded = load_model(run.model)
        self.full, self.tokenizer = loaded.model, loaded.tokenizer
        self.emulator = prepare_emulator(self.config.emulator, self.full, self.tokenizer, self.config.layer_replace,
                                         run.model, self.out, log=log.info)
        self.emulator_path = self.config.emulator.emulator_dir(self.out)
        self.sha = self.emulator.manifest["weights_sha256"]
        check_shippable(self.emulator.manifest, run.private_blocks)  # before anything is sent
        torch.manual_seed(run.seed)
        # The server's emulator becomes the holder of the aggregate (the pristine one is on disk);
        # LoRA's initial A comes from [finetune] seed: same seed, same start.
        self.trainable = make_trainable(self.emulator.model, list(self.emulator.adapter_positions()),
                                        self.config.finetune)
        self.names = tuple(n for n, p in self.trainable.named_parameters() if p.requires_grad)
        self.arrays = ArrayRecord(torch_state_dict={n: p.detach().clone() for n, p in self.trainable.named_parameters()
                                                    if n in self.names})
        self.base_strategy, self.strategy = make_strategy(self.config)
        self.privacy = PrivacyLedger(self.config.privacy, run.num_clients)
        self.realigner = Realigner(self.config.realign)
        self.realigner.prepare(self)
        self.eval_items = run.evaluation_items()
        self.start_round = 1
        if self.resume:
            self._resume()

    def deliver(self, grid: Grid) -> None:
        """Every data owner gets the emulator (once); the server learns who is who."""
        run = self.config.run
        done = deliver(grid, self.emulator_path, self.sha, run.num_clients)
        self.node_to_partition, self.emulator_bytes_down, self.deployed = (
            done.node_to_partition, done.bytes_down, done.deployed)
        if self.deployed:
            if run.final_table and (run.centralised_full_finetune or run.centralised_offsite or run.attack):
                raise ConfigError("run.centralised_* and run.attack train on the owners' pooled data, which the "
                                   "model owner of a deployment does not have: they are simulation-only")
            if run.per_owner_eval:
                raise ConfigError("run.per_owner_eval scores the plug-in on each owner's held-out data, which the "
                                  "model owner of a deployment does not have: use per_owner_local instead")
        else:
            plot_partitions(self.config, self.out)
        self.partition_to_node = {p: n for n, p in self.node_to_partition.items()}

    # ------------------------------------------------------------------ rounds

    def sample_partitions(self, round_: int) -> list[int]:
        rng = random.Random(f"{self.config.run.seed}-round-{round_}")
        return sorted(rng.sample(range(self.config.run.num_clients), self.config.run.clients_per_round))

    def _train_config(self, round_: int) -> ConfigRecord:
        return ConfigRecord({"fed-config": self.config.to_json(), "sha256": self.sha, "round": round_})

    def check_reply(self, msg: Message) -> str | None:
        """Why a train reply cannot be averaged in, or None when it can."""
        owner = self.node_to_partition.get(msg.metadata.src_node_id)
        return reply_problem(msg, self.names, expected_state(self.arrays, self.config, owner), self.realigner.version)

    def run_round(self, grid: Grid, round_: int) -> dict:
        start = time.time()
        partitions = self.sample_partitions(round_)
        nodes = [self.partition_to_node[p] for p in partitions if p in self.partition_to_node]
        view = _SelectedGrid(grid, nodes)
        train = self._train_secure if self.config.secure_aggregation.enabled else self._train_plain
        new_arrays, train_metrics, row = train(grid, view, nodes, partitions, round_)
        self.arrays = in_sent_dtypes(new_arrays, self.arrays)
        bytes_down = row.pop("bytes_down")
        realigned = self.realigner.run(self) if self.realigner.due(round_, self.config.run.num_rounds) else None
        owners = {p: {"train_loss": float(m["train-loss"]), "steps": int(m["train-steps"])}
                  | ({"local_acc": float(m["local-acc"])} if "local-acc" in m else {})
                  for p, m in self.owner_metrics.items() if "train-steps" in m}
        timing = {"seconds_train": time.time() - start}

        eval_metrics = train_metrics  # the clients' own validation loss after local training
        if self.config.run.client_eval:
            eval_messages = list(self.strategy.configure_evaluate(round_, self.arrays, self._train_config(round_), view))
            eval_messages = personalise(self.config, self.node_to_partition, eval_messages)
            realign_eval = self.realigner.attach(eval_messages)
            row["realign_bytes_down"] = row.get("realign_bytes_down", 0) + realign_eval
            bytes_down += sum(m.content["arrays"].count_bytes() for m in eval_messages) + realign_eval
            eval_replies = [m for m in grid.send_and_receive(eval_messages, timeout=self.config.run.round_timeout)
                            if not m.has_error()]
            eval_replies.sort(key=lambda m: self.node_to_partition[m.metadata.src_node_id])
            for m in eval_replies:
                owners.setdefault(self.node_to_partition[m.metadata.src_node_id], {})["emulator_val_loss"] = float(
                    m.content["metrics"]["client-val-loss"])
            eval_metrics = self.strategy.aggregate_evaluate(round_, eval_replies) if eval_replies else None
            timing["seconds_client_eval"] = time.time() - start - timing["seconds_train"]

        row = {
            "round": round_, "clients": partitions, "successful": row.pop("successful"), "failed": row.pop("failed"),
            "train_loss": float(train_metrics["train-loss"]) if train_metrics else None,
            "update_norm": float(train_metrics["update-norm"]) if train_metrics and "update-norm" in train_metrics else None,
            "client_val_loss": float(eval_metrics["client-val-loss"]) if eval_metrics else None,
            "bytes_down": bytes_down + (self.emulator_bytes_down if round_ == self.start_round else 0),
            "bytes_up": row.pop("bytes_up"),
            "emulator_bytes_down": self.emulator_bytes_down if round_ == self.start_round else 0,
        } | row | self.privacy.after_round(self.metrics, partitions)
        if round_ % self.config.run.eval_every == 0 or round_ == self.config.run.num_rounds:
            row |= self._evaluate_round(owners, timing)
        row |= {"realign": realigned} if realigned else {}
        if owners:
            row["per_owner"] = {str(p): owners[p] for p in sorted(owners)}
            row |= per_owner_summary(row["per_owner"])
        if train_metrics and "client-seconds" in train_metrics:  # mean over the round's owners
            timing["client_seconds_mean"] = float(train_metrics["client-seconds"])
        row["seconds"] = time.time() - start
        row["timing"] = timing
        self.bytes_down_total += row["bytes_down"]
        self.bytes_up_total += row["bytes_up"]
        return row

    def _evaluate_round(self, owners: dict[int, dict], timing: dict) -> dict:
        """The server's scores of this round: the plug-in (overall and, when asked, per owner into
        ``owners``), and the emulator with the aggregate when ``emulator_eval``."""
        eval_start, row = time.time(), {}
        overall, per_owner = self.plug_in_eval()
        self.last_plug_in = (self.arrays, overall)  # the final table's plug-in row, if nothing changes after
        row |= {f"plug_in_{k}": v for k, v in overall.items() if k not in ("n", "items", "owners")}
        for p, metrics in per_owner.items():
            owners.setdefault(p, {}).update(metrics)
        if self.config.run.emulator_eval:  # the emulator the owners hold, with the aggregate
            row["emulator_acc"] = score_with_owners(self.trainable, self.tokenizer, self.eval_items, {},
                                                    self.config.run.eval_batch_size)[0]["acc"]
        timing["seconds_plug_in_eval"] = time.time() - eval_start
        return row

    def _train_plain(self, grid: Grid, view: Grid, nodes: list[int], partitions: list[int], round_: int):
        """Train messages through the strategy; every update checked before it is averaged."""
        messages = list(self.strategy.configure_train(round_, self.arrays, self._train_config(round_), view))
        messages = personalise(self.config, self.node_to_partition, messages)
        realign_bytes = self.realigner.attach(messages)
        bytes_down = sum(m.content.array_records["arrays"].count_bytes() for m in messages) + realign_bytes
        replies = list(grid.send_and_receive(messages, timeout=self.config.run.round_timeout))
        good, failed = [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            reason = self.check_reply(msg)
            if reason:
                failed.append(self.node_to_partition.get(node, -1))
                log.warning("round %d: rejected update of data owner %s (node %s): %s", round_,
                            self.node_to_partition.get(node), node, reason)
            else:
                good.append(msg)
        answered = {m.metadata.src_node_id for m in replies}
        timed_out = [p for p in partitions if p in self.partition_to_node and self.partition_to_node[p] not in answered]
        if timed_out:
            log.warning("round %d: owner(s) %s sent no reply within round_timeout=%g s: dropped from this round",
                        round_, timed_out, self.config.run.round_timeout)
        failed += timed_out + [p for p in partitions if p not in self.partition_to_node]  # (never sent: left out)
        self._enough(round_, len(good), partitions, failed)
        good.sort(key=lambda m: self.node_to_partition[m.metadata.src_node_id])  # fixed order: same sums
        bytes_up = sum(m.content.array_records["arrays"].count_bytes() for m in good)
        if self.config.owners.lora_r:  # lower-rank factors back to the server's rank
            pad_replies(good, self.arrays)
        self.owner_metrics = {self.node_to_partition[m.metadata.src_node_id]: m.content["metrics"] for m in good}
        new_arrays, train_metrics = self.strategy.aggregate_train(round_, good)
        if new_arrays is None:
            why = (" (differential privacy accounts for exactly clients_per_round updates per round: "
                   "every sampled owner must succeed)" if self.config.privacy.enabled and failed else "")
            raise RoundFailed(f"round {round_}: the strategy produced no aggregate{why}")
        return new_arrays, train_metrics, {"successful": len(good), "failed": sorted(set(failed)),
                                           "timed_out": timed_out, "bytes_down": bytes_down, "bytes_up": bytes_up,
                                           "realign_bytes_down": realign_bytes}

    def _train_secure(self, grid: Grid, view: Grid, nodes: list[int], partitions: list[int], round_: int):
        """One SecAgg+ round: the server learns the owners' (example-weighted) mean, never a single
        owner's update; the configured strategy, a sum-based one, then aggregates that mean as it
        would the replies (FedAvg keeps it, FedAdam / FedYogi / FedAvgM take their server step)."""
        # what the strategy sends this round (FedProx's proximal-mu, FFA-LoRA's frozen A), and the
        # state it keeps for its aggregate (the arrays sent)
        instructions = list(self.strategy.configure_train(round_, self.arrays, self._train_config(round_), view))
        config = instructions[0].content["config"] if instructions else self._train_config(round_)
        mean, stats = secure_round(grid, nodes, self.arrays, config, round_, self.config.secure_aggregation,
                                   max_examples(self.config, self.deployed))
        self.owner_metrics = {}  # the server sees only the sum
        summed = set(stats.pop("nodes"))
        failed = [p for p in partitions if self.partition_to_node.get(p) not in summed]
        if failed:
            log.warning("round %d: data owners %s are not in the secure sum (dropped out)", round_, failed)
        self._enough(round_, len(summed), partitions, failed)
        if mean is None:
            raise RoundFailed(f"round {round_}: secure aggregation halted (too few owners left to unmask the sum; "
                              f"reconstruction_threshold={self.config.secure_aggregation.reconstruction_threshold})")
        seen = stats.pop("metrics") or {}
        # the mean as the one reply the strategy aggregates: weight = every summed owner's examples
        reply = Message(RecordDict({"arrays": mean, "metrics": MetricRecord(
            {**seen, "num-examples": stats.pop("examples")})}), reply_to=instructions[0])
        new_arrays, _ = self.strategy.aggregate_train(round_, [reply])
        if new_arrays is None:
            raise RoundFailed(f"round {round_}: the strategy produced no aggregate from the secure sum")
        return new_arrays, seen or None, stats | {"successful": len(summed), "failed": failed}

    def _enough(self, round_: int, good: int, partitions: list[int], failed: list[int]) -> None:
        if good < self.config.run.min_successful_clients:
            raise RoundFailed(
                f"round {round_}: only {good} of {len(partitions)} data owners returned a usable update "
                f"(min_successful_clients={self.config.run.min_successful_clients}; failed: {sorted(set(failed))}); "
                + (f"the last good aggregate is in {self.out / 'checkpoint'}" if has_checkpoint(self.out) else
                   "no checkpoint exists yet (no round has completed): fix the data owners and start the run again")
            )

    # ------------------------------------------------------------------ evaluation

    def load_aggregate(self) -> None:
        """Put the current aggregate into the trainable emulator (what its rows score)."""
        params = dict(self.trainable.named_parameters())
        with torch.no_grad():
            for name, value in to_torch(self.arrays).items():
                params[name].copy_(value)

    def plugged_model(self):
        """The full model with the current aggregate plugged in."""
        self.load_aggregate()
        return plug_in_trained(self.full, self.trainable, self.emulator)

    def plug_in_eval(self) -> tuple[dict, dict[int, dict]]:
        """The plug-in's scores on the evaluation items, and per owner on its held-out items."""
        self.load_aggregate()
        with plugged_for_scoring(self.full, self.trainable, self.emulator, self.config.run.eval_placement()) as model:
            return score_with_owners(model, self.tokenizer, self.eval_items, owner_eval_items(self.config),
                                     self.config.run.eval_batch_size)

    # ------------------------------------------------------------------ checkpoints and reports

    def save_checkpoint(self, round_: int) -> None:
        save_checkpoint(self.out, RoundState(round_, self.arrays, self.base_strategy.__dict__, self.metrics,
                                             self.bytes_down_total, self.bytes_up_total, as_dict(self.config),
                                             self.realigner.state), self.sha)

    def _resume(self) -> None:
        ckpt = load_checkpoint(self.out, self.sha)
        self.arrays = in_sent_dtypes(ckpt.arrays, self.arrays)  # (the trainable's: a checkpoint may predate the cast)
        self.base_strategy.__dict__.update(ckpt.strategy_state)
        accountant = getattr(self.strategy, "accountant", None)
        if accountant is not None and ckpt.round > 0:
            accountant.compose(GaussianPrivacyEvent(self.config.privacy.noise_multiplier,
                                                    self.config.run.clients_per_round, self.config.run.num_clients),
                               ckpt.round)
        self.metrics = ckpt.metrics
        self.bytes_down_total, self.bytes_up_total = ckpt.bytes_down_total, ckpt.bytes_up_total
        self.start_round = ckpt.round + 1
        if ckpt.realigned:  # the emulator as the owners hold it
            self.realigner.restore(ckpt.realigned, self.trainable,
                                   max(r["realign"]["version"] for r in self.metrics if "realign" in r))
        log.info("resuming %s after round %d", self.out, ckpt.round)

    def write_metrics(self) -> None:
        write_metrics(self.out, self.metrics, {
            "bytes_down_total": self.bytes_down_total, "bytes_up_total": self.bytes_up_total,
            "emulator_bytes": emulator_bytes(self.emulator_path),
            "trainable_bytes": self.arrays.count_bytes(),
            "full_model_bytes": sum(p.numel() * p.element_size() for p in self.full.parameters())}
            | ({"privacy": self.privacy.report(self.metrics)} if self.config.privacy.enabled else {})
            | ({"stopped_early": self.stopped} if self.stopped else {}))

    # ------------------------------------------------------------------ the job

    def run(self, grid: Grid) -> None:
        self.setup()
        with Tracking(self.config.tracking, self.out, resume=self.resume) as self.tracking:
            self.tracked_rounds(grid)

    def tracked_rounds(self, grid: Grid) -> None:
        """Delivery, the rounds, the final table; each round's row also to the tracker."""
        self.tracking.params(as_dict(self.config))
        missed = set(self.tracking.missed([row["round"] for row in self.metrics]))
        for row in self.metrics:  # a resume: the rounds the tracked run missed (stopped before tracking them)
            if row["round"] in missed:
                self.tracking.metrics(tracked_row(row), row["round"])
        self.deliver(grid)
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
            self.tracking.metrics(tracked_row(row), round_)
            log.info("round %d: %s", round_, {k: v for k, v in row.items() if k not in ("clients",)})
        save_aggregate(self.arrays, self.out / "aggregate.safetensors")
        if self.config.run.final_table:
            final_table(self)
        summary = json.loads((self.out / "metrics.json").read_text())
        self.tracking.metrics({k: v for k, v in summary.items() if k not in ("rounds", "per_owner")},
                              self.metrics[-1]["round"] if self.metrics else 0)
        self.tracking.artifacts(sorted(p for p in self.out.iterdir() if p.suffix in (".md", ".json", ".csv", ".png")
                                       and p.name not in ("config.json", STATE)))
        (self.out / "DONE").write_text("ok\n")


def tracked_row(row: dict) -> dict:
    """A round's row as the tracker gets it: its numbers under their ``metrics.json`` paths
    (``per_owner/3/plug_in_acc``, ``timing/train``), without the round number and the owner lists."""
    return {k: v for k, v in row.items() if k not in ("round", "clients", "failed")}
