"""Streaming build and plug-in (safetensors read tensor by tensor) against the in-memory paths."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from scaleot_fed.emulator import EmulatorConfig, load_emulator, save_emulator
from scaleot_fed.emulator.build import build_emulator
from scaleot_fed.emulator.streaming import build_emulator_streaming, plug_in_streaming
from scaleot_fed.errors import ConfigError
from scaleot_fed.finetune import FinetuneConfig, make_trainable
from scaleot_fed.models import load_model
from scaleot_fed.plugin import export_trained, plug_in_path

from .conftest import tiny_model
from .test_emulator import _artifact


def _sharded(tmp_path, family, num_layers=8):
    """A tiny random model saved as several safetensors shards with an index."""
    folder = tmp_path / f"{family}-sharded"
    tiny_model(family, num_layers=num_layers).save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.mark.parametrize("family,strategy", [("llama", "scaleot"), ("gemma3_text", "uniform-drop"),
                                             ("phi3", "uniform-drop"), ("gpt_neox", "uniform-drop")])  # (GPT-2: below)
def test_streaming_build_writes_the_in_memory_emulator_byte_for_byte(tmp_path, tokens, family, strategy):
    folder = _sharded(tmp_path, family)
    model = load_model(str(folder), tokenizer=False).model
    config = EmulatorConfig(strategy, 2, alpha=0.5, rank_keep_ratio=0.5)
    importance = _artifact(model, tokens, tmp_path) if strategy == "scaleot" else None
    memory = save_emulator(build_emulator(model, config, importance, source_model="tiny"), tmp_path / "memory")
    streamed = build_emulator_streaming(folder, config, tmp_path / "streamed", importance, source_model="tiny")
    for name in ("model.safetensors", "manifest.json", "config.json"):
        assert (memory / name).read_bytes() == (streamed / name).read_bytes(), name
    emulator = load_emulator(streamed, tokenizer=False)  # and it loads and runs
    assert torch.isfinite(emulator.model(input_ids=tokens[:2]).logits).all()


@pytest.mark.parametrize("family,mode", [("llama", "lora"), ("gpt2", "lora")])  # (full: test_cli)
def test_streaming_plug_in_writes_the_in_memory_plugged_model(tmp_path, family, mode):
    folder = _sharded(tmp_path, family)
    emulator_dir = build_emulator_streaming(folder, EmulatorConfig("uniform-drop", 2, alpha=0.5), tmp_path / "emu")
    emulator = load_emulator(emulator_dir, tokenizer=False)
    trainable = make_trainable(emulator.model, list(emulator.adapter_positions()), FinetuneConfig(mode=mode, lora_r=4))
    with torch.no_grad():  # trained: every trainable tensor moved
        for p in (p for p in trainable.parameters() if p.requires_grad):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    trained = export_trained(trainable, emulator, tmp_path / ("lora" if mode == "lora" else "state.safetensors"))
    expected = plug_in_path(load_model(str(folder), tokenizer=False).model, emulator.manifest, trained).state_dict()
    out = plug_in_streaming(folder, emulator.manifest, trained, tmp_path / "plugged")
    assert len(list(out.glob("model-*.safetensors"))) == 8 + 1  # a shard per block, one for the rest
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert got.keys() == expected.keys()
    changed = [k for k in got if not torch.equal(got[k], load_model(str(folder), tokenizer=False).model.state_dict()[k])]
    assert changed and all(torch.equal(got[k], expected[k]) for k in got), [k for k in got if not torch.equal(got[k], expected[k])][:3]


def test_streaming_refuses_what_it_cannot_read(tmp_path):
    folder = _sharded(tmp_path, "llama")
    emulator_dir = build_emulator_streaming(folder, EmulatorConfig("uniform-drop", 2, alpha=0.5), tmp_path / "emu")
    manifest = load_emulator(emulator_dir, tokenizer=False).manifest
    other = _sharded(tmp_path / "other", "gpt2")
    with pytest.raises(Exception, match="fingerprint"):
        plug_in_streaming(other, manifest | {"adapter_layers": [0]}, tmp_path / "x.safetensors", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ConfigError, match="without --stream"):
        build_emulator_streaming(tmp_path / "empty", EmulatorConfig("uniform-drop", 2, alpha=0.5), tmp_path / "e2")


def test_files_without_the_model_prefix_and_in_another_precision_stream_as_from_pretrained(tmp_path):
    """GPT-2's hub files name tensors without ``transformer.``, and a config may ask for another
    precision than the files hold: the streamed fingerprint, emulator and plug-in still equal
    what the loaded model gives."""
    import json

    from safetensors.torch import load_file, save_file

    from scaleot_fed.emulator.streaming import fingerprint_of, lazy_state, meta_model
    from scaleot_fed.models import model_fingerprint

    folder = tmp_path / "gpt2-hub-style"
    tiny_model("gpt2").save_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"dtype": "bfloat16"}))
    loaded = load_model(str(folder), tokenizer=False).model
    assert next(loaded.parameters()).dtype == torch.bfloat16
    model, files = meta_model(folder)
    assert fingerprint_of(lazy_state(model, files)) == model_fingerprint(loaded)
    config = EmulatorConfig("uniform-drop", 2, alpha=0.5, rank_keep_ratio=0.5)
    memory = save_emulator(build_emulator(loaded, config), tmp_path / "memory")
    streamed = build_emulator_streaming(folder, config, tmp_path / "streamed")
    assert (memory / "model.safetensors").read_bytes() == (streamed / "model.safetensors").read_bytes()
    emulator = load_emulator(streamed, tokenizer=False)
    trainable = make_trainable(emulator.model, list(emulator.adapter_positions()), FinetuneConfig(mode="full"))
    trained = export_trained(trainable, emulator, tmp_path / "state.safetensors")
    out = plug_in_streaming(folder, emulator.manifest, trained, tmp_path / "plugged")
    assert len(list(out.glob("model-*.safetensors"))) == 8 + 1  # streamed block by block, prefix or not
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected = plug_in_path(loaded, emulator.manifest, trained).state_dict()
    assert all(torch.equal(got[k].to(expected[k].dtype), expected[k]) for k in expected)
