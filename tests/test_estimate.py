"""`scaleot-fed estimate`: sizes from the config alone equal those of the real objects."""

import pytest
import torch

from scaleot_fed.emulator import EmulatorConfig
from scaleot_fed.emulator.build import build_emulator
from scaleot_fed.estimate import _saved_bytes, estimate
from scaleot_fed.finetune import FinetuneConfig, make_trainable
from scaleot_fed_cli.main import main

from .conftest import ALL_FAMILIES, tiny_config, tiny_model


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_estimate_counts_what_building_and_training_make(family):
    full = tiny_model(family, num_layers=8)
    emulator_config = EmulatorConfig("uniform-drop", 2, 0.5, rank_keep_ratio=0.5)
    finetune = FinetuneConfig(mode="lora", lora_r=4)
    est = estimate(tiny_config(family, 8), emulator_config, finetune, batch_size=2, seq_len=16)
    emulator = build_emulator(full, emulator_config)
    assert est.full_params == sum(p.numel() for p in full.parameters())
    assert est.emulator_params == sum(p.numel() for p in emulator.model.parameters())
    trained = make_trainable(emulator.model, list(emulator.adapter_positions()), finetune)
    assert est.trainable_params == sum(p.numel() for p in trained.parameters() if p.requires_grad)
    assert est.frozen_params == sum(p.numel() for p in trained.parameters() if not p.requires_grad)
    assert est.activation_bytes > 0
    assert est.round_bytes == {"down": 4 * est.trainable_params, "up": 4 * est.trainable_params}
    # the head's temporaries: logits and their gradient, (2 x 4 answer rows, vocab) float32 each
    assert est.transient_bytes == 2 * (2 * 4) * full.config.vocab_size * 4
    assert est.client_bytes()["transient"] == est.transient_bytes


def test_saved_activations_match_a_real_step_and_grow_with_the_batch():
    model = make_trainable(tiny_model("llama", num_layers=4), [0, 3], FinetuneConfig(mode="lora")).train()
    real = {}

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter) and not isinstance(tensor._base, torch.nn.Parameter):
            real.setdefault(id(tensor), tensor)
        return tensor

    ids = torch.randint(0, 96, (2, 16))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.get_base_model().base_model(input_ids=ids, attention_mask=torch.ones(2, 1, 16, 16).bool().tril(),
                                                   use_cache=False).last_hidden_state[:, -4:]
        logits = model.get_base_model().lm_head(hidden.reshape(-1, hidden.shape[-1]))
        torch.nn.functional.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
    measured = sum(t.numel() * t.element_size() for t in real.values())
    with torch.device("meta"):  # the same structure, no weights: what the estimate runs
        meta = make_trainable(_meta_llama(), [0, 3], FinetuneConfig(mode="lora"))
    assert _saved_bytes(meta, 2, 16, 0.25) == measured
    # about linear in the batch (rotary tables and the like do not grow with it)
    assert 1.95 * measured < _saved_bytes(meta, 4, 16, 0.25) <= 2 * measured


def _meta_llama():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(tiny_config("llama", 4))


def test_the_estimate_command_prints_every_figure(capsys, tiny_model_dir):
    assert main(["estimate", "--model", str(tiny_model_dir), "--adapters", "2", "--alpha", "0.5",
                 "--rank-keep-ratio", "0.5", "--seq-len", "32", "--clients", "4"]) == 0
    out = capsys.readouterr().out
    for text in ("parameters", "emulator (scaleot", "trainable per owner (lora)", "one owner's training",
                 "the model owner (server)", "concurrent clients in this machine's RAM"):
        assert text in out
    assert main(["estimate", "--model", str(tiny_model_dir), "--adapters", "3"]) == 2  # odd N_a: one line


@pytest.mark.parametrize("mode", ["adapter", "bitfit", "full"])
def test_every_training_mode_can_be_estimated(mode):
    est = estimate(tiny_config("llama", 8), EmulatorConfig("uniform-drop", 2, 0.5), FinetuneConfig(mode=mode),
                   batch_size=2, seq_len=16)
    assert est.trainable_params > 0 and est.activation_bytes > 0
    if mode == "full":  # the adapter blocks' own weights train: frozen + trained = the emulator
        assert est.frozen_params + est.trainable_params == est.emulator_params
