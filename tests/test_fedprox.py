"""FedProx: the server sends ``proximal-mu``; the data owner's local training adds
``mu/2 * ||w - w_global||^2``, whose gradient is ``mu * (w - w_global)``."""

import pytest
import torch

from scaleot_fed.finetune import FinetuneConfig, finetune, make_trainable, proximal_term
from scaleot_fed.tasks import MCItem

from .conftest import tiny_model


@pytest.mark.parametrize("mu", [0.3, 2.0])
def test_proximal_gradient_is_mu_times_the_distance_from_the_global_weights(mu):
    # two parameters away from their anchor (the global weights the round started from)
    a = torch.tensor(0.75, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.25, dtype=torch.float64, requires_grad=True)
    anchor = [torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)]
    term = proximal_term([a, b], anchor, mu)
    torch.testing.assert_close(term, torch.tensor(mu / 2 * (0.25**2 + 2.25**2), dtype=torch.float64))
    term.backward()
    torch.testing.assert_close(a.grad, torch.tensor(mu * 0.25, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(b.grad, torch.tensor(mu * -2.25, dtype=torch.float64), rtol=1e-12, atol=0)


def _distance_after_training(gpt2_tokenizer, mu: float) -> float:
    torch.manual_seed(0)
    model = tiny_model("gpt2", num_layers=2, vocab_size=len(gpt2_tokenizer))
    trained = make_trainable(model, [0, 1], FinetuneConfig(mode="full"))
    start = {n: p.detach().clone() for n, p in trained.named_parameters() if p.requires_grad}
    items = [MCItem(f"Question: say {w}\nAnswer:", ("x", w), 1) for w in ("red", "blue", "green", "tree")]
    config = FinetuneConfig(mode="full", steps=6, batch_size=2, lr=5e-3, warmup_ratio=0.0, schedule="constant",
                            eval_every=6, select_best=False)
    finetune(trained, gpt2_tokenizer, items, items, config, progress=False, proximal_mu=mu)
    return sum(float(((p - start[n]) ** 2).sum()) for n, p in trained.named_parameters() if n in start) ** 0.5


def test_local_training_applies_the_proximal_term(gpt2_tokenizer):
    # The same data, seed and steps: the pull towards the global weights keeps them closer.
    free, pulled = _distance_after_training(gpt2_tokenizer, 0.0), _distance_after_training(gpt2_tokenizer, 50.0)
    assert 0 < pulled < 0.9 * free


def test_the_fedprox_strategy_sends_mu_to_every_data_owner():
    from flwr.app import ArrayRecord, ConfigRecord, Message
    from flwr.supercore.task_identity import TaskIdentity

    from strategies import build_strategy

    class _Grid:
        def get_node_ids(self):
            return [1, 2, 3]

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    saved = {k: getattr(TaskIdentity, k) for k in ("_run_id", "_node_id", "_task_id") if hasattr(TaskIdentity, k)}
    TaskIdentity._run_id, TaskIdentity._node_id = 1, 0  # messages outside a running app need an identity
    if hasattr(TaskIdentity, "_task_id"):
        TaskIdentity._task_id = 0
    try:
        arrays = ArrayRecord(torch_state_dict={"w": torch.zeros(2)})
        messages = list(build_strategy("fedprox", {"proximal_mu": 0.3}).configure_train(1, arrays, ConfigRecord(),
                                                                                        _Grid()))
    finally:
        for k, v in saved.items():
            setattr(TaskIdentity, k, v)
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]
    # the key the data owner's train() reads (simulations/client_app.py) to set finetune's proximal_mu
    assert all(m.content["config"]["proximal-mu"] == 0.3 for m in messages)
