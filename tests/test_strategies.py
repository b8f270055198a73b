"""Aggregation: Flower's FedAvg over trainable state, and the LoRA-aware FFA-LoRA."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from scaleot_fed.errors import ConfigError
from strategies import STRATEGIES, build_strategy


@pytest.fixture(autouse=True)
def task_identity():
    """Messages outside a running app need an identity (Flower sets it per task)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {k: getattr(TaskIdentity, k) for k in ("_run_id", "_node_id", "_task_id") if hasattr(TaskIdentity, k)}
    TaskIdentity._run_id, TaskIdentity._node_id = 1, 0
    if hasattr(TaskIdentity, "_task_id"):
        TaskIdentity._task_id = 0
    yield
    for k, v in saved.items():
        setattr(TaskIdentity, k, v)


def _reply(state: dict, n: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=state), "metrics": MetricRecord({"num-examples": n})})
    msg = Message(content, dst_node_id=1, message_type="train")
    return Message(content, reply_to=msg)


def _arrays(record: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in record.items()}


def test_fedavg_is_the_example_weighted_average():
    g = torch.Generator().manual_seed(0)
    states = [{"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(4, generator=g)} for _ in range(3)]
    weights = [10, 30, 60]
    agg, _ = build_strategy("fedavg").aggregate_train(1, [_reply(s, n) for s, n in zip(states, weights)])
    for key in states[0]:
        expected = sum(w * s[key].numpy() for s, w in zip(states, weights)) / sum(weights)
        np.testing.assert_allclose(_arrays(agg)[key], expected, rtol=1e-6, atol=1e-7)


def test_ffa_lora_aggregation_is_exact_for_the_product_where_ab_averaging_is_not():
    g = torch.Generator().manual_seed(1)
    r, d_in, d_out = 2, 6, 5
    a_shared = torch.randn(r, d_in, generator=g)
    bs = [torch.randn(d_out, r, generator=g) for _ in range(3)]
    weights = [1, 2, 3]
    target = sum(w * (b @ a_shared) for b, w in zip(bs, weights)) / sum(weights)  # mean of the updates

    # FFA-LoRA: A frozen (identical everywhere), B averaged -> exact
    strategy = build_strategy("ffa-lora")
    sent = ArrayRecord(torch_state_dict={"l.lora_A.weight": a_shared, "l.lora_B.weight": torch.zeros(d_out, r)})
    config = ConfigRecord()

    class _Grid:
        def get_node_ids(self):
            return [1, 2, 3]

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    messages = list(strategy.configure_train(1, sent, config, _Grid()))
    assert all(m.content["config"]["freeze-lora-a"] for m in messages)
    replies = [_reply({"l.lora_A.weight": a_shared, "l.lora_B.weight": b}, w) for b, w in zip(bs, weights)]
    agg, _ = strategy.aggregate_train(1, replies)
    out = _arrays(agg)
    np.testing.assert_allclose(out["l.lora_B.weight"] @ out["l.lora_A.weight"], target.numpy(), rtol=1e-5, atol=1e-6)

    # plain FedAvg of A and B when clients' A differ: mean(B) @ mean(A) != mean(B @ A)
    as_ = [torch.randn(r, d_in, generator=g) for _ in range(3)]
    target2 = sum(w * (b @ a) for a, b, w in zip(as_, bs, weights)) / sum(weights)
    naive, _ = build_strategy("fedavg").aggregate_train(
        1, [_reply({"l.lora_A.weight": a, "l.lora_B.weight": b}, w) for a, b, w in zip(as_, bs, weights)])
    naive = _arrays(naive)
    assert not np.allclose(naive["l.lora_B.weight"] @ naive["l.lora_A.weight"], target2.numpy(), atol=1e-3)

    # a client that moved A is refused
    moved = replies[:2] + [_reply({"l.lora_A.weight": a_shared + 1, "l.lora_B.weight": bs[2]}, 3)]
    with pytest.raises(ValueError, match="frozen"):
        strategy.aggregate_train(1, moved)


def test_every_registered_strategy_builds_and_bad_params_are_clear():
    for name in STRATEGIES:
        assert build_strategy(name) is not None
    with pytest.raises(ConfigError, match="unknown strategy"):
        build_strategy("fedmagic")
    with pytest.raises(ConfigError, match="fedprox"):
        build_strategy("fedprox", {"mu": 0.1})
    with pytest.raises(ConfigError, match="clients_per_round"):
        build_strategy("fedavg", {"fraction_train": 0.5})
