"""Secure aggregation (SecAgg+) of the trainable state: the server only ever holds the sum.

Flower's SecAgg+ lives in its legacy workflow (``SecAggPlusWorkflow`` on the server,
``secaggplus_mod`` on the clients). One round of it runs inside our loop: the round's owners are
registered with a legacy client manager, a legacy FedAvg hands them the fit instructions, the
workflow runs its four stages (setup, share keys, collect masked vectors, unmask) and leaves
the weighted average in its state. Owners mask their quantised, example-weighted update with
pairwise masks (Diffie-Hellman) and share their mask secrets (Shamir), so the server can unmask
the sum, even after dropouts down to the reconstruction threshold, and nothing else.

What the server gives up: it cannot check single updates (NaN, wrong shapes) or run robust
aggregation (Krum, trimmed mean) on them; it still sees each owner's train-loss metric. The run's
strategy aggregates the mean when it is sum-based (its aggregate needs only the mean:
:class:`strategies.ClientRequirements` ``sum_based``); any other is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from scaleot_fed.errors import ConfigError

if TYPE_CHECKING:
    from .config import FedConfig


@dataclass
class SecureAggregationConfig:
    """``[secure_aggregation]``: SecAgg+ instead of plain averaging (FedAvg weights by examples)."""

    enabled: bool = False
    num_shares: float = 1.0
    """Owners each one shares its mask secret with: a fraction of the round (1.0 = all: SecAgg)
    or a count (> 2; SecAgg+'s sparse graph, cheaper for large rounds)."""
    reconstruction_threshold: float = 0.67
    """Shares needed to rebuild a dropped owner's mask: a fraction (0, 1] or a count."""
    clipping_range: float = 8.0
    """Every trainable value is clipped to [-range, range] before quantisation."""
    quantization_range: int = 2**24
    """Quantisation levels across the clipping range (resolution 2 * range / levels); the sum of
    the round's quantised values must stay below 2**32 (about 256 owners per round at 2**24)."""
    max_weight: float | None = None
    """Upper bound on an owner's example count. Each update is scaled by examples / max_weight
    before quantisation, so a loose bound costs precision; default: the largest partition in a
    simulation, 1000 (Flower's default) for deployed owners."""
    timeout: float = 3600.0

    def __post_init__(self) -> None:
        if self.num_shares <= 0 or (self.num_shares > 1 and self.num_shares <= 2):
            raise ConfigError(f"secure_aggregation.num_shares must be a fraction in (0, 1] or a count > 2, "
                             f"got {self.num_shares}")
        if self.reconstruction_threshold <= 0:
            raise ConfigError("secure_aggregation.reconstruction_threshold must be > 0")
        if self.clipping_range <= 0 or self.quantization_range < 2 or (self.max_weight is not None and self.max_weight <= 0):
            raise ConfigError("secure_aggregation.clipping_range, quantization_range and max_weight must be positive")

    def workflow(self, max_weight: float):
        """Flower's ``SecAggPlusWorkflow`` with these settings (a count stays an int)."""
        from flwr.server.workflow import SecAggPlusWorkflow

        as_number = lambda x: int(x) if x > 1 else float(x)  # noqa: E731  (Flower reads int = count)
        return SecAggPlusWorkflow(as_number(self.num_shares), as_number(self.reconstruction_threshold),
                                  max_weight=float(self.max_weight or max_weight), clipping_range=self.clipping_range,
                                  quantization_range=self.quantization_range, timeout=self.timeout)


def content_bytes(content: RecordDict) -> int:
    """Bytes a message carries: arrays plus the bytes/str values of its config records (where
    SecAgg+ puts keys, shares and masked vectors)."""
    total = sum(r.count_bytes() for r in content.array_records.values())
    for record in content.config_records.values():
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            total += sum(len(v) for v in values if isinstance(v, (bytes, str)))
    return total


class _Recorder:
    """The grid as the server-side code sees it, counting what crosses and any plaintext arrays."""

    def __init__(self, grid) -> None:
        self._grid = grid
        self.bytes_down = self.bytes_up = self.plaintext_arrays = 0

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.bytes_down += sum(content_bytes(m.content) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if not reply.has_error():
                self.bytes_up += content_bytes(reply.content)
                self.plaintext_arrays += sum(len(r) for r in reply.content.array_records.values())
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


def secure_round(grid, node_ids: list[int], arrays: ArrayRecord, train_config: ConfigRecord, round_: int,
                 config: SecureAggregationConfig, max_weight: float = 1000.0) -> tuple[ArrayRecord | None, dict]:
    """One SecAgg+ round with the owners ``node_ids``; returns the averaged state (None when the
    protocol halted: too few owners left) and what it cost and saw. ``max_weight`` bounds an
    owner's example count when the config does not."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    names = list(arrays.keys())
    recorder = _Recorder(grid)
    manager = SimpleClientManager()
    for node in node_ids:
        manager.register(GridClientProxy(node, recorder, grid.run.run_id))
    seen: list[tuple[int, int, dict]] = []  # (node, examples, metrics) of the owners in the sum

    class Capture(LegacyFedAvg):
        def aggregate_fit(self, server_round, results, failures):
            seen.extend((proxy.node_id, res.num_examples, dict(res.metrics)) for proxy, res in results)
            return super().aggregate_fit(server_round, results, failures)

    strategy = Capture(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=len(node_ids),
                       min_available_clients=len(node_ids), on_fit_config_fn=lambda _: dict(train_config))
    start = ndarrays_to_parameters([np.asarray(arrays[n].numpy()) for n in names])
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: round_}),
                        MAIN_PARAMS_RECORD: compat.parameters_to_arrayrecord(start, keep_input=True)})
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=strategy, client_manager=manager)
    config.workflow(max_weight)(recorder, context)
    record = context.state.array_records[MAIN_PARAMS_RECORD]
    result = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
    examples = sum(n for _, n, _ in seen)
    keys = set.intersection(*(set(m) for _, _, m in seen)) if seen else set()
    # the owners' metrics (not their updates) stay visible: averaged by examples, like FedAvg's
    metrics = {k: sum(n * float(m[k]) for _, n, m in seen) / examples for k in sorted(keys)} if examples else None
    stats = {"bytes_down": recorder.bytes_down, "bytes_up": recorder.bytes_up,
             "plaintext_arrays_seen": recorder.plaintext_arrays, "nodes": [node for node, _, _ in seen],
             "metrics": metrics, "examples": examples}
    if not seen:  # the workflow halted before unmasking
        return None, stats
    return ArrayRecord({n: _array(v, arrays[n]) for n, v in zip(names, result)}), stats


def _array(value: np.ndarray, like):
    from flwr.app import Array

    return Array(np.asarray(value, dtype=np.asarray(like.numpy()).dtype))


# ----------------------------------------------------------------------------- client side

def is_secure(msg: Message) -> bool:
    """A SecAgg+ stage message (its content is in the legacy FitIns layout)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secure_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ rounds; plain rounds pass through."""
    if not is_secure(msg):
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, call_next)


def legacy_config(msg: Message) -> ConfigRecord:
    """The run config of a SecAgg+ train message."""
    return ConfigRecord(dict(compat.recorddict_to_fitins(msg.content, keep_input=True).config))


def legacy_parameters(msg: Message) -> list[np.ndarray]:
    """The state of a SecAgg+ train message, as a list in the exchange order."""
    from flwr.common import parameters_to_ndarrays

    return parameters_to_ndarrays(compat.recorddict_to_fitins(msg.content, keep_input=True).parameters)


def legacy_train_reply(msg: Message, state: list[np.ndarray], num_examples: int, metrics: dict) -> Message:
    """The reply ``secaggplus_mod`` masks: a legacy FitRes."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(state), num_examples, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def max_examples(config: FedConfig, deployed: bool) -> int:
    """The largest owner's training-item count (SecAgg+ scales updates by count / this, so a tight
    bound keeps precision); deployed owners' data is unknown to the server: 1000, Flower's default."""
    if deployed:
        return 1000
    from .partition import client_data

    run = config.run
    return max(len(client_data(config, p, run.num_clients)[0]) for p in range(run.num_clients))
