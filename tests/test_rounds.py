"""The server's round without Ray: per-owner messages, the round timeout, mixed-rank replies."""

import logging
from collections import Counter

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from scaleot_fed.errors import ConfigError
from simulations.config import fed_config_from_dict
from simulations.federation import FederatedRun, _SelectedGrid
from simulations.owners import personalise
from simulations.privacy import make_strategy
from simulations.realign_rounds import Realigner

from .test_strategies import task_identity  # noqa: F401  (messages outside an app need an identity)

NODES = {10: 0, 11: 1, 12: 2}


class _Grid:
    """A grid whose owner on node 12 never answers in time; the others return sent + 1."""

    def __init__(self):
        self.sent, self.timeouts = [], []

    def get_node_ids(self):
        return list(NODES)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def send_and_receive(self, messages, timeout=None):
        self.sent, replies = list(messages), []
        self.timeouts.append(timeout)
        for msg in self.sent:
            if msg.metadata.dst_node_id == 12:
                continue
            trained = {k: torch.from_numpy(v.numpy().copy()) for k, v in msg.content["arrays"].items()}
            trained["l.lora_B.weight"] += 1.0  # the owner trained B (and left A)
            metrics = MetricRecord({"num-examples": 1, "train-loss": 0.5, "train-steps": 2})
            replies.append(Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=trained), "metrics": metrics}),
                                   reply_to=msg))
        return replies


def _run(**owners):
    config = fed_config_from_dict({"run": {"num_clients": 3, "clients_per_round": 3, "round_timeout": 7.5},
                                   "finetune": {"mode": "lora", "lora_r": 4}, "owners": owners})
    run = FederatedRun(config)
    g = torch.Generator().manual_seed(0)
    run.sent = {"l.lora_A.weight": torch.randn(4, 6, generator=g), "l.lora_B.weight": torch.randn(5, 4, generator=g)}
    run.arrays = ArrayRecord(torch_state_dict=run.sent)
    run.names = tuple(run.sent)
    run.base_strategy, run.strategy = make_strategy(config)
    run.sha = "0" * 64
    run.realigner = Realigner(config.realign)
    run.node_to_partition, run.partition_to_node = dict(NODES), {p: n for n, p in NODES.items()}
    return run


def test_an_owner_past_the_round_timeout_is_dropped_and_lower_ranks_are_padded(caplog):
    run = _run(lora_r=[2, 4, 4], steps=[1, 2, 3])
    grid = _Grid()
    with caplog.at_level(logging.WARNING, logger="scaleot_fed.federation"):
        arrays, _, row = run._train_plain(grid, _SelectedGrid(grid, list(NODES)), list(NODES), [0, 1, 2], 1)
    assert grid.timeouts == [7.5]
    assert row["timed_out"] == [2] and row["failed"] == [2] and row["successful"] == 2
    assert "owner(s) [2] sent no reply within round_timeout=7.5 s" in caplog.text
    sent = {m.metadata.dst_node_id: m for m in grid.sent}
    # every owner's own settings, in its own config record; its rank slice of the factors
    assert sent[10].content["config"]["owner-lora-r"] == 2 and sent[10].content["config"]["owner-steps"] == 1
    assert sent[11].content["config"]["owner-lora-r"] == 4 and sent[12].content["config"]["owner-steps"] == 3
    assert sent[10].content["arrays"]["l.lora_A.weight"].numpy().shape == (2, 6)
    assert sent[10].content["arrays"]["l.lora_B.weight"].numpy().shape == (5, 2)
    assert row["bytes_up"] < 2 * run.arrays.count_bytes()  # the rank-2 owner sent half the factors
    # FedAvg of the padded replies: A kept, B = mean of (B[:, :2] + 1 | 0) and (B + 1)
    a, b = run.sent["l.lora_A.weight"].numpy(), run.sent["l.lora_B.weight"].numpy()
    low = np.zeros_like(b)
    low[:, :2] = b[:, :2] + 1
    out = {k: v.numpy() for k, v in arrays.items()}
    np.testing.assert_allclose(out["l.lora_A.weight"], a, rtol=1e-6)
    np.testing.assert_allclose(out["l.lora_B.weight"], (low + b + 1) / 2, rtol=1e-6)
    assert set(run.owner_metrics) == {0, 1}


def test_a_reply_of_the_wrong_rank_is_rejected():
    run = _run(lora_r=[2, 4, 4])
    grid = _Grid()
    messages = personalise(run.config, run.node_to_partition,
                           list(run.strategy.configure_train(1, run.arrays, run._train_config(1), grid)))
    replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(messages, timeout=1)}
    assert run.check_reply(replies[10]) is None and run.check_reply(replies[11]) is None
    run.node_to_partition[10] = 1  # owner of rank 4 answering with rank-2 factors
    assert "wrong shape for l.lora_A.weight: (2, 6) instead of (4, 6)" in run.check_reply(replies[10])


def test_owner_tiers_are_drawn_with_the_seed_and_lists_are_checked():
    base = {"run": {"num_clients": 40, "clients_per_round": 4}, "finetune": {"mode": "lora", "lora_r": 16}}
    owners = {"assign": "tiers", "lora_r": [4, 16], "steps": [5, 20], "tier_weights": [0.75, 0.25]}
    config = fed_config_from_dict(base | {"owners": owners})
    drawn = [config.owners.settings(p, seed=0) for p in range(40)]
    assert drawn == [config.owners.settings(p, seed=0) for p in range(40)]  # the same seed, the same tiers
    assert all(d in ({"lora_r": 4, "steps": 5}, {"lora_r": 16, "steps": 20}) for d in drawn)  # tiers are joint
    assert 20 <= Counter(d["lora_r"] for d in drawn)[4] <= 38  # about three quarters weak
    assert drawn != [config.owners.settings(p, seed=1) for p in range(40)]
    for owners, match in [({"lora_r": [4, 8]}, "one entry per owner"),
                          ({"assign": "tiers", "lora_r": [4, 8], "steps": [1, 2, 3]}, "one length"),
                          ({"assign": "tiers", "lora_r": [4, 32]}, "above the server's rank"),
                          ({"steps": [0] * 40}, "integers >= 1"),
                          ({"tier_weights": [1.0]}, "needs assign")]:
        with pytest.raises(ConfigError, match=match):
            fed_config_from_dict(base | {"owners": owners})
    with pytest.raises(ConfigError, match="mode = 'full'"):
        fed_config_from_dict(base | {"finetune": {"mode": "full"}, "owners": {"assign": "tiers", "lora_r": [4]}})


def test_a_checkpoint_keeps_the_realigned_emulator_and_resume_restores_it(tmp_path):
    """What the owners hold after a re-alignment survives a checkpoint: the tensors come back,
    the server's emulator gets them, and the version continues."""
    from simulations.checkpoint import RoundState, load_checkpoint, save_checkpoint

    g = torch.Generator().manual_seed(4)
    realigned = {"model.layers.3.mlp.down_proj.weight": torch.randn(6, 5, generator=g)}
    arrays = ArrayRecord(torch_state_dict={"l.lora_B.weight": torch.randn(5, 4, generator=g)})
    rows = [{"round": 1, "realign": {"version": 1}}, {"round": 2, "realign": {"version": 2}}]
    save_checkpoint(tmp_path, RoundState(2, arrays, {}, rows, 10, 20, None, realigned), "f" * 64)
    ckpt = load_checkpoint(tmp_path, "f" * 64)
    assert ckpt.realigned.keys() == realigned.keys()
    assert all(torch.equal(ckpt.realigned[k], realigned[k]) for k in realigned)
    model = torch.nn.Module()
    model.register_parameter("w", torch.nn.Parameter(torch.zeros(6, 5)))
    realigner = Realigner(fed_config_from_dict({}).realign)
    realigner.restore({"w": realigned["model.layers.3.mlp.down_proj.weight"]}, model, 2)
    assert torch.equal(model.w.detach(), realigned["model.layers.3.mlp.down_proj.weight"]) and realigner.version == 2
    with pytest.raises(Exception, match="do not exist"):
        realigner.restore({"nope": torch.zeros(1)}, model, 3)
    save_checkpoint(tmp_path / "plain", RoundState(1, arrays, {}, rows[:1], 1, 2), "f" * 64)
    assert load_checkpoint(tmp_path / "plain", "f" * 64).realigned == {}
