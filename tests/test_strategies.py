"""Aggregation: Flower's FedAvg over trainable state, and the LoRA-aware FFA-LoRA."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from scaleot_fed.errors import ConfigError
from strategies import BUILTIN as STRATEGIES
from strategies import build_strategy
from strategies.replies import in_sent_dtypes


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


class _Grid:
    """The part of Flower's Grid that ``configure_train`` uses."""

    def get_node_ids(self):
        return [1, 2, 3]

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)


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


def test_every_registered_strategy_builds_as_asked_and_bad_params_are_clear():
    for name in STRATEGIES:
        strategy = build_strategy(name)
        assert type(strategy) is STRATEGIES[name], name
        # the server loop samples the clients: the strategy takes every node it is handed
        assert (strategy.fraction_train, strategy.fraction_evaluate) == (1.0, 1.0), name
        assert (strategy.min_train_nodes, strategy.min_evaluate_nodes, strategy.min_available_nodes) == (1, 1, 1), name
    # the strategy's own keyword arguments arrive unchanged
    asked = {
        "fedprox": {"proximal_mu": 0.25},
        "fedadam": {"eta": 0.05, "beta_1": 0.8, "tau": 1e-2},
        "fedyogi": {"eta": 0.02, "beta_2": 0.9},
        "fedavgm": {"server_learning_rate": 0.5, "server_momentum": 0.7},
        "fedtrimmedavg": {"beta": 0.3},
        "krum": {"num_malicious_nodes": 2},
    }
    for name, params in asked.items():
        strategy = build_strategy(name, params)
        assert type(strategy) is STRATEGIES[name]
        assert {k: getattr(strategy, k) for k in params} == params, name
    with pytest.raises(ConfigError, match="unknown strategy"):
        build_strategy("fedmagic")
    with pytest.raises(ConfigError, match="fedprox"):
        build_strategy("fedprox", {"mu": 0.1})
    with pytest.raises(ConfigError, match="clients_per_round"):
        build_strategy("fedavg", {"fraction_train": 0.5})


def _state(x: np.ndarray) -> dict:
    return {"w": torch.from_numpy(np.asarray(x, dtype=np.float32))}


def test_fedadam_first_round_is_the_adam_step_on_the_weighted_mean_update():
    x0 = np.array([[0.5, -1.0, 2.0], [0.0, 0.25, -0.75]], dtype=np.float32)
    g = np.random.default_rng(3)
    clients = [x0 + g.normal(0, 0.1, x0.shape).astype(np.float32) for _ in range(3)]
    weights = [5, 15, 30]
    eta, beta_1, beta_2, tau = 0.05, 0.8, 0.95, 1e-3
    strategy = build_strategy("fedadam", {"eta": eta, "beta_1": beta_1, "beta_2": beta_2, "tau": tau})
    list(strategy.configure_train(1, ArrayRecord(torch_state_dict=_state(x0)), ConfigRecord(), _Grid()))
    agg, _ = strategy.aggregate_train(1, [_reply(_state(c), n) for c, n in zip(clients, weights)])

    x0_64 = x0.astype(np.float64)
    delta = sum(n * c.astype(np.float64) for c, n in zip(clients, weights)) / sum(weights) - x0_64
    m = (1 - beta_1) * delta  # first moment from zero
    v = (1 - beta_2) * delta**2  # second moment from zero
    step = eta * np.sqrt(1 - beta_2**2) / (1 - beta_1**2)  # Flower's bias correction, rounds counted from 1
    expected = x0_64 + step * m / (np.sqrt(v) + tau)
    out = _arrays(agg)["w"]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    fedavg_mean = x0_64 + delta
    assert not np.allclose(out, fedavg_mean, atol=1e-3)  # a server optimiser, not the plain average
    # Flower's step (a NumPy float64 scalar) makes it float64; the server loop casts it back to
    # what it sent, values kept to float32's precision
    sent = ArrayRecord(torch_state_dict=_state(x0))
    assert out.dtype == np.float64 and in_sent_dtypes(agg, sent)["w"].dtype == "float32"
    np.testing.assert_array_equal(in_sent_dtypes(agg, sent)["w"].numpy(), out.astype(np.float32))
    assert in_sent_dtypes(sent, sent) is sent  # nothing to cast: the record itself


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    clients = [np.array([1.0, 10.0]), np.array([2.0, -50.0]), np.array([3.0, 20.0]), np.array([100.0, 30.0]),
               np.array([-40.0, 40.0])]
    # beta 0.2 of 5 clients: the lowest and highest value of each coordinate go, the middle three are averaged
    agg, _ = build_strategy("fedtrimmedavg", {"beta": 0.2}).aggregate_train(
        1, [_reply(_state(c), n) for c, n in zip(clients, [1, 1, 1, 1, 100])])
    np.testing.assert_allclose(_arrays(agg)["w"], [(1 + 2 + 3) / 3, (10 + 20 + 30) / 3], rtol=1e-6)


def test_krum_returns_the_most_central_update_and_never_the_outlier():
    centre = np.array([1.0, -2.0, 0.5])
    eps = np.array([0.01, 0.0, 0.0])
    clients = [centre + eps, centre, np.array([50.0, 50.0, -50.0]), centre - eps]
    # n=4, f=0: each score sums the squared distances to the 2 nearest others;
    # centre: 2 eps^2, centre +- eps: eps^2 + 4 eps^2, the outlier: huge
    agg, _ = build_strategy("krum", {"num_malicious_nodes": 0}).aggregate_train(
        1, [_reply(_state(c), n) for c, n in zip(clients, [1, 1, 1000, 1])])
    np.testing.assert_array_equal(_arrays(agg)["w"], centre.astype(np.float32))


def test_mixed_rank_ffa_lora_aggregation_is_the_exact_mean_of_the_owners_updates():
    """Owners of ranks 2, 4 and 8 train the first ranks of the server's rank-8 factors (HetLoRA);
    padded back, the FFA-LoRA average is exactly the weighted mean of their B_i @ A[:r_i]."""
    from strategies import pad_rank, slice_rank

    g = torch.Generator().manual_seed(3)
    big, d_in, d_out = 8, 6, 5
    a = torch.randn(big, d_in, generator=g)
    sent_state = {"l.lora_A.weight": a, "l.lora_B.weight": torch.randn(d_out, big, generator=g)}
    sent = {k: v.numpy() for k, v in sent_state.items()}
    ranks, weights = [2, 4, 8], [3, 1, 2]
    replies, target = [], np.zeros((d_out, d_in))
    for r, w in zip(ranks, weights):
        owner = slice_rank(sent, r)  # what the owner receives
        assert owner["l.lora_A.weight"].shape == (r, d_in) and owner["l.lora_B.weight"].shape == (d_out, r)
        b = torch.randn(d_out, r, generator=g).numpy()  # what its training made of B
        target += w * (b @ owner["l.lora_A.weight"])
        padded = pad_rank({"l.lora_A.weight": owner["l.lora_A.weight"], "l.lora_B.weight": b}, sent)
        np.testing.assert_array_equal(padded["l.lora_B.weight"] @ padded["l.lora_A.weight"], b @ a.numpy()[:r])
        replies.append(_reply({k: torch.from_numpy(v) for k, v in padded.items()}, w))
    target /= sum(weights)
    strategy = build_strategy("ffa-lora")
    list(strategy.configure_train(1, ArrayRecord(torch_state_dict=sent_state), ConfigRecord(), _Grid()))
    out = _arrays(strategy.aggregate_train(1, replies)[0])
    np.testing.assert_allclose(out["l.lora_A.weight"], a.numpy(), rtol=1e-6)  # A stays the shared one
    np.testing.assert_allclose(out["l.lora_B.weight"] @ out["l.lora_A.weight"], target, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not a rank slice"):
        pad_rank({"l.lora_B.weight": np.zeros((d_out + 1, 2))}, sent)


def test_the_federated_studys_own_strategy_clips_every_update_to_the_rounds_median_norm():
    """configs/study_federated_strategies.py, named by its path as the study names it: updates of
    norm 1, 2 and 10 become 1, 2 and 2 before FedAvg weighs them."""
    from strategies import resolve_strategy
    from strategies.registry import TAKE_ALL

    strategy = resolve_strategy("configs/study_federated_strategies.py:MedianClippedFedAvg")(**TAKE_ALL)
    start = torch.zeros(4)
    list(strategy.configure_train(1, ArrayRecord(torch_state_dict={"w": start}), ConfigRecord(), _Grid()))
    directions = [torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 2.0, 0, 0]), torch.tensor([0, 0, 10.0, 0])]
    agg, _ = strategy.aggregate_train(1, [_reply({"w": d}, 1) for d in directions])
    np.testing.assert_allclose(_arrays(agg)["w"], [1 / 3, 2 / 3, 2 / 3, 0], rtol=1e-6)
