"""FedProx: the server sends ``proximal-mu``; the data owner's local training adds
``mu/2 * ||w - w_global||^2``, whose gradient is ``mu * (w - w_global)``."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from scaleot_fed.finetune import FinetuneConfig, finetune
from scaleot_fed.tasks import MCItem


class _TwoParameters(nn.Module):
    """Two trainable scalars (and a frozen one). The first training step's loss is linear,
    ``c_a * a + c_b * b``, so the weights leave the start; every later loss has zero gradient,
    so what reaches the parameters from then on is the proximal term alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.75, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(-1.25, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.tensor(2.0, dtype=torch.float64), requires_grad=False)
        self.c = (0.4, -0.9)
        self.seen: list[tuple[float, float]] = []  # (a, b) at each training forward
        self.grads: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
        self.a.register_hook(lambda g: self.grads["a"].append(g.detach().clone()))
        self.b.register_hook(lambda g: self.grads["b"].append(g.detach().clone()))

    def forward(self, input_ids, attention_mask=None, labels=None, use_cache=False):
        if not (self.training and torch.is_grad_enabled()):  # validation loss
            return SimpleNamespace(loss=(self.a + self.b + self.frozen).detach())
        self.seen.append((self.a.detach().clone(), self.b.detach().clone()))
        if len(self.seen) == 1:
            loss = self.c[0] * self.a + self.c[1] * self.b + self.frozen
        else:
            loss = (self.a + self.b + self.frozen) * 0.0
        return SimpleNamespace(loss=loss)


def _run(gpt2_tokenizer, mu: float, steps: int = 5) -> _TwoParameters:
    model = _TwoParameters()
    items = [MCItem(f"Question: say {w}\nAnswer:", ("x", w), 1) for w in ("red", "blue", "green", "tree")]
    config = FinetuneConfig(mode="full", steps=steps, batch_size=2, lr=0.1, warmup_ratio=0.0, schedule="constant",
                            eval_every=steps, select_best=False)
    finetune(model, gpt2_tokenizer, items, items, config, progress=False, proximal_mu=mu)
    assert len(model.seen) == len(model.grads["a"]) == len(model.grads["b"]) == steps
    return model


@pytest.mark.parametrize("mu", [0.3, 2.0])
def test_proximal_gradient_is_mu_times_the_distance_from_the_global_weights(gpt2_tokenizer, mu):
    model = _run(gpt2_tokenizer, mu)
    (a0, b0), c = model.seen[0], model.c
    # step 1 sits at the global weights: the proximal term adds nothing to the data gradient
    assert float(model.grads["a"][0]) == c[0] and float(model.grads["b"][0]) == c[1]
    for step in range(1, len(model.seen)):
        a, b = model.seen[step]
        assert not torch.equal(a, a0) and not torch.equal(b, b0)  # the weights have moved
        # the anchor stays the weights training started from (not the previous step's)
        torch.testing.assert_close(model.grads["a"][step], mu * (a - a0), rtol=1e-12, atol=0)
        torch.testing.assert_close(model.grads["b"][step], mu * (b - b0), rtol=1e-12, atol=0)
    assert float(model.frozen) == 2.0  # frozen parameters are neither trained nor anchored


def test_without_mu_there_is_no_proximal_term(gpt2_tokenizer):
    model = _run(gpt2_tokenizer, 0.0)
    assert not torch.equal(model.seen[-1][0], model.seen[0][0])
    assert all(float(g) == 0.0 for name in ("a", "b") for g in model.grads[name][1:])


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
