import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from scaleot_fed.arch import block_index_of_key
from scaleot_fed.emulator import EmulatorConfig
from scaleot_fed.emulator.build import build_emulator
from scaleot_fed.errors import IntegrityError
from scaleot_fed.plugin import load_adapter_state, plug_in, plug_in_path, save_adapter_state

from .conftest import tiny_model


@torch.no_grad()
def _logits(model, tokens):
    return model(input_ids=tokens[:3]).logits


def _emulator(model, family_adapters=4):
    return build_emulator(model, EmulatorConfig("uniform-drop", family_adapters, alpha=0.5, rank_keep_ratio=0.5))


def _train_adapters(emulator, seed=7):
    """Stand-in for training: add distinct random values to every adapter-block parameter."""
    g = torch.Generator().manual_seed(seed)
    layers = emulator.model.get_submodule(emulator.arch.layers_path)
    with torch.no_grad():
        for position in emulator.adapter_positions():
            for p in layers[position].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_plug_in_from_a_file_carries_the_trained_values_into_the_source_blocks(family, tokens, tmp_path):
    model = tiny_model(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _logits(model, tokens)
    emulator = _emulator(model)
    # 4 adapters of 8 blocks: the bottom two stay at 0, 1; the top two sit at 4, 5 in the emulator
    assert emulator.adapter_positions() == {0: 0, 1: 1, 4: 6, 5: 7}
    layers_path = emulator.arch.layers_path

    # untouched adapters give the model back
    path = save_adapter_state(emulator.adapter_state_dict(), tmp_path / "untouched.safetensors", emulator.manifest)
    assert torch.allclose(_logits(plug_in_path(copy.deepcopy(model), emulator.manifest, path), tokens), expected,
                          atol=1e-6)

    # trained adapters: the full model carries exactly the trained values, at the source positions
    _train_adapters(emulator)
    path = save_adapter_state(emulator.adapter_state_dict(), tmp_path / "trained.safetensors", emulator.manifest)
    plugged = plug_in_path(model, emulator.manifest, path)
    trained_layers = emulator.model.get_submodule(layers_path)
    full_layers = plugged.get_submodule(layers_path)
    for position, source in emulator.adapter_positions().items():
        trained = dict(trained_layers[position].named_parameters())
        full = dict(full_layers[source].named_parameters())
        assert trained.keys() == full.keys()
        for name, value in trained.items():
            assert torch.equal(full[name], value), (source, name)
            assert not torch.equal(full[name], original[f"{layers_path}.{source}.{name}"]), (source, name)
    after = plugged.state_dict()
    for key, value in original.items():  # nothing outside the adapter blocks moved
        if block_index_of_key(emulator.arch, key) not in {0, 1, 6, 7}:
            assert torch.equal(after[key], value), key
    assert not torch.allclose(_logits(plugged, tokens), expected, atol=1e-3)


def test_plug_in_changes_only_adapter_blocks_and_top_blocks_land_at_source_positions(family, tokens):
    model = tiny_model(family)
    emulator = _emulator(model)
    with torch.no_grad():  # "train": perturb every adapter-block parameter of the emulator
        for position in emulator.adapter_positions():
            for p in emulator.model.get_submodule(emulator.arch.layers_path)[position].parameters():
                p.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    written = plug_in(model, emulator.manifest, emulator.adapter_state_dict())
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == set(written)
    assert {block_index_of_key(emulator.arch, k) for k in changed} == {0, 1, 6, 7}
    for key in changed:  # the top adapters (emulator positions 4,5) went to blocks 6,7
        assert torch.allclose(after[key], before[key] + 1.0)


def test_plug_in_refuses_non_adapter_keys_and_foreign_models(tokens):
    model = tiny_model("llama")
    emulator = _emulator(model)
    bad = {"model.layers.3.mlp.up_proj.weight": model.state_dict()["model.layers.3.mlp.up_proj.weight"]}
    with pytest.raises(IntegrityError, match="not in an adapter block"):
        plug_in(model, emulator.manifest, bad)
    nan_state = {k: torch.full_like(v, float("nan")) for k, v in emulator.adapter_state_dict().items()}
    with pytest.raises(IntegrityError, match="NaN"):
        plug_in(model, emulator.manifest, nan_state)
    with pytest.raises(IntegrityError, match="not from this model"):
        plug_in(tiny_model("llama", seed=5), emulator.manifest, emulator.adapter_state_dict())


def test_state_file_of_another_model_is_refused(tmp_path):
    a, b = tiny_model("gpt2", seed=0), tiny_model("gpt2", seed=1)
    ea, eb = _emulator(a), _emulator(b)
    path = save_adapter_state(ea.adapter_state_dict(), tmp_path / "s.safetensors", ea.manifest)
    with pytest.raises(IntegrityError, match="another model"):
        load_adapter_state(path, eb.manifest)


def test_lora_folder_merges_into_adapter_blocks_only(tokens, tmp_path):
    model = tiny_model("llama")
    emulator = _emulator(model)
    # A LoRA in the full model's numbering on the adapter blocks, with non-zero B.
    lora = get_peft_model(
        tiny_model("llama"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1, 6, 7]),
    )
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    lora.save_pretrained(tmp_path / "lora")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = plug_in_path(model, emulator.manifest, tmp_path / "lora")
    after = merged.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(block_index_of_key(emulator.arch, k) in {0, 1, 6, 7} for k in changed)
    assert all(("q_proj" in k or "v_proj" in k) for k in changed)

    outside = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[3]))
    outside.save_pretrained(tmp_path / "outside")
    with pytest.raises(IntegrityError, match="outside the adapter blocks"):
        plug_in_path(tiny_model("llama"), emulator.manifest, tmp_path / "outside")


def test_plugged_model_round_trips_through_save_pretrained(tokens, tmp_path):
    model = tiny_model("opt")
    before = _logits(model, tokens)
    emulator = _emulator(model)
    _train_adapters(emulator)
    written = plug_in(model, emulator.manifest, emulator.adapter_state_dict())
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    saved = reloaded.state_dict()
    assert all(torch.equal(saved[k], emulator.adapter_state_dict()[k]) for k in written)  # the trained values
    assert torch.allclose(_logits(reloaded, tokens), _logits(model, tokens), atol=1e-6)
    assert not torch.allclose(_logits(reloaded, tokens), before, atol=1e-3)  # and they make a difference


@pytest.mark.parametrize("mode", ["lora", "adapter"])
def test_plugging_in_place_scores_as_a_copy_and_restores_the_full_model(mode, tokens):
    """The server's per-round scoring plugs into its own full model and puts the adapter blocks
    back: the logits equal the copied plug-in's and the full model is bitwise what it was."""
    from scaleot_fed.devices import Placement
    from scaleot_fed.finetune import FinetuneConfig, make_trainable
    from scaleot_fed.plugin import plug_in_trained, plugged_for_scoring

    full = tiny_model("llama")
    before = {k: v.clone() for k, v in full.state_dict().items()}
    emulator = build_emulator(full, EmulatorConfig("uniform-drop", 2, 0.5))
    trained = make_trainable(emulator.model, list(emulator.adapter_positions()), FinetuneConfig(mode=mode))
    with torch.no_grad():
        for p in (p for p in trained.parameters() if p.requires_grad):
            p.add_(0.1 * torch.randn_like(p))
    expected = plug_in_trained(full, trained, emulator).eval()(input_ids=tokens[:2]).logits
    with plugged_for_scoring(full, trained, emulator, Placement("cpu", "float32")) as model:
        assert torch.allclose(model.eval()(input_ids=tokens[:2]).logits, expected, atol=1e-5)
    after = full.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
