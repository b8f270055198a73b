import pytest
import torch

from scaleot_fed.arch import block_index_of_key
from scaleot_fed.distill import DistillConfig, distill_emulator, normalised_mse
from scaleot_fed.emulator import EmulatorConfig
from scaleot_fed.emulator.build import build_emulator
from scaleot_fed.errors import ConfigError

from .conftest import tiny_model


def test_normalised_mse():
    t = torch.full((2, 3), 2.0)
    assert float(normalised_mse(t, t)) == 0.0
    assert float(normalised_mse(torch.zeros_like(t), t)) == pytest.approx(1.0)


def test_distillation_trains_only_kept_middle_blocks_and_moves_towards_the_teacher(family, tokens):
    full = tiny_model(family)
    emulator = build_emulator(full, EmulatorConfig("uniform-drop", 2, alpha=0.5))
    before = {k: v.clone() for k, v in emulator.model.state_dict().items()}
    record = distill_emulator(full, emulator, tokens, DistillConfig(steps=12, batch_size=4, lr=3e-3))
    after = emulator.model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    middle = {p for p, e in enumerate(emulator.manifest["layout"]) if e["kind"] != "adapter"}
    assert changed and all(block_index_of_key(emulator.arch, k) in middle for k in changed)
    kd = record["history"]["kd_loss"]
    assert sum(kd[-3:]) < sum(kd[:3])
    assert record["tokens_forward_backward"] == 12 * 4 * tokens.shape[1]


def test_distillation_refuses_harmonized_emulators(tokens, tmp_path):
    from scaleot_fed.artifact import load_artifact, save_artifact
    from scaleot_fed.layer_replace import LayerReplaceConfig, run_layer_replace

    full = tiny_model("llama")
    result = run_layer_replace(full, tokens, LayerReplaceConfig(num_adapter_layers=2, steps=1, batch_size=2,
                                                               block_size=16, harmonizer_rank=4), progress=False)
    emulator = build_emulator(full, EmulatorConfig("scaleot", 2, alpha=0.5), load_artifact(save_artifact(result, tmp_path)))
    with pytest.raises(ConfigError, match="uniform-drop"):
        distill_emulator(full, emulator, tokens, DistillConfig(steps=1))


def test_a_distillation_is_its_seeds_whatever_ran_before_it(tokens):
    """GPT-2's dropout draws from the global random state: seeded by the distillation itself, a
    study builds the same emulator in any order (and the state around it is left as it was)."""
    full = tiny_model("gpt2")
    assert full.config.resid_pdrop > 0
    weights = []
    for before in (0, 1):
        emulator = build_emulator(full, EmulatorConfig("uniform-drop", 2, alpha=0.5))
        torch.manual_seed(before)  # whatever the process ran before
        outside = torch.rand(1)
        torch.manual_seed(before)
        distill_emulator(full, emulator, tokens, DistillConfig(steps=3, batch_size=4, lr=3e-3))
        assert torch.equal(torch.rand(1), outside)  # the global state around it untouched
        weights.append(emulator.model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    emulator = build_emulator(full, EmulatorConfig("uniform-drop", 2, alpha=0.5))
    distill_emulator(full, emulator, tokens, DistillConfig(steps=3, batch_size=4, lr=3e-3, seed=1))
    assert not all(torch.equal(weights[0][k], v) for k, v in emulator.model.state_dict().items())
