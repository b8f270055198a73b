import json

import pytest
import torch
from safetensors.torch import load_file

from scaleot_fed.arch import architecture_of, get_layers, projection_weight
from scaleot_fed.artifact import load_artifact, save_artifact
from scaleot_fed.emulator import EmulatorConfig, PlanInputs, load_emulator, save_emulator
from scaleot_fed.emulator.build import build_emulator, plan_layout
from scaleot_fed.errors import ConfigError, IntegrityError
from scaleot_fed.layer_replace import LayerReplaceConfig, run_layer_replace

from .conftest import tiny_model

REQUIRED_MANIFEST_KEYS = (
    "source_model", "architecture", "num_layers", "adapter_layers", "kept_layers", "replaced_layers",
    "compressed_layers", "strategy", "alpha", "rank_keep_ratio", "num_params", "source_num_params", "weights_sha256",
)


def _artifact(model, tokens, tmp_path, adapters=2):
    config = LayerReplaceConfig(num_adapter_layers=adapters, steps=2, batch_size=2, block_size=16, harmonizer_rank=8)
    result = run_layer_replace(model, tokens, config, progress=False)
    return load_artifact(save_artifact(result, tmp_path / "importance"))


@torch.no_grad()
def _logits(model, tokens):
    return model(input_ids=tokens[:3]).logits


def test_alpha0_full_rank_emulator_equals_full_model(family, tokens, tmp_path):
    model = tiny_model(family)
    artifact = _artifact(model, tokens, tmp_path)
    identity = EmulatorConfig("scaleot", 4, alpha=0.5)
    identity.alpha = 0.0  # refused as a user's config (it is the full model), the reference point here
    emulator = build_emulator(model, identity, artifact)
    assert torch.allclose(_logits(emulator.model, tokens), _logits(model, tokens), atol=1e-5)
    reloaded = load_emulator(save_emulator(emulator, tmp_path / "emu"), tokenizer=False)
    assert torch.allclose(_logits(reloaded.model, tokens), _logits(model, tokens), atol=1e-5)


@pytest.mark.parametrize("strategy", ["scaleot", "importance-drop", "uniform-drop", "crash"])
def test_saved_emulator_holds_no_original_weight_of_replaced_or_compressed_blocks(family, strategy, tokens, tmp_path):
    model = tiny_model(family)
    artifact = _artifact(model, tokens, tmp_path)
    emulator = build_emulator(model, EmulatorConfig(strategy, 2, alpha=0.5, rank_keep_ratio=0.5), artifact,
                              calibration=tokens)
    out = save_emulator(emulator, tmp_path / "emu")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["replaced_layers"] and manifest["compressed_layers"]

    arch = architecture_of(model)
    layers = get_layers(model)
    forbidden = []
    for i in manifest["replaced_layers"]:
        forbidden += [p for p in layers[i].parameters()]
    for i in manifest["compressed_layers"]:
        for path in arch.attention_projections:
            proj = layers[i].get_submodule(path)
            forbidden += [proj.weight, projection_weight(proj, arch)]
    saved = load_file(str(out / "model.safetensors"))
    for tensor in saved.values():
        for original in forbidden:
            assert not (tensor.shape == original.shape and torch.equal(tensor, original.detach()))

    # kept-but-compressed projections hold at most the requested rank
    for record in manifest["compression"]:
        out_f, in_f = record["shape"]
        groups = [g["rows"] for g in record.get("groups", [])] or [out_f]  # fused q/k/v: each group its own
        assert record["rank"] == sum(max(1, round(0.5 * min(rows, in_f))) for rows in groups)
        assert [g["rank"] for g in record.get("groups", [])] == ([max(1, round(0.5 * min(r, in_f))) for r in groups]
                                                                 if "groups" in record else [])
        assert 0.0 < record["relative_error"] < 1.0


def test_manifest_fields_and_layout(family, tokens, tmp_path):
    model = tiny_model(family, num_layers=10)
    artifact = _artifact(model, tokens, tmp_path)
    emulator = build_emulator(model, EmulatorConfig("scaleot", 4, alpha=0.5, rank_keep_ratio=0.5), artifact, "tiny")
    out = save_emulator(emulator, tmp_path / "emu")
    manifest = json.loads((out / "manifest.json").read_text())
    for key in REQUIRED_MANIFEST_KEYS:
        assert key in manifest
    assert manifest["adapter_layers"] == [0, 1, 8, 9]
    assert len(manifest["replaced_layers"]) == 3  # round(0.5 * 6)
    # the replaced blocks are the lowest-scored ones
    lowest = sorted(range(2, 8), key=lambda i: (artifact.scores[i], i))[:3]
    assert sorted(manifest["replaced_layers"]) == sorted(lowest)
    assert manifest["num_params"] < manifest["source_num_params"]
    assert manifest["num_layers"] == 10 and manifest["emulator_num_layers"] == 10  # harmonizers keep positions


def test_uniform_drop_keeps_evenly_spaced_blocks():
    layout = plan_layout(14, EmulatorConfig("uniform-drop", 2, alpha=0.5), PlanInputs(0.5))
    middle_kept = [e["source"] for e in layout if e["kind"] == "block"]
    assert middle_kept == [1, 3, 5, 8, 10, 12]
    assert [e["source"] for e in layout if e["kind"] == "adapter"] == [0, 13]


def test_emulator_generates_with_kv_cache(family, tokens, tmp_path):
    model = tiny_model(family)
    artifact = _artifact(model, tokens, tmp_path)
    for strategy in ("scaleot", "uniform-drop"):
        emulator = build_emulator(model, EmulatorConfig(strategy, 2, alpha=0.5, rank_keep_ratio=0.5), artifact)
        reloaded = load_emulator(save_emulator(emulator, tmp_path / strategy), tokenizer=False)
        with torch.no_grad():
            out = reloaded.model.generate(tokens[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.allclose(_logits(reloaded.model, tokens), _logits(emulator.model, tokens), atol=1e-6)
        assert out.shape == (1, 9)


def test_tampered_or_missing_weights_are_refused(tokens, tmp_path):
    model = tiny_model("llama")
    emulator = build_emulator(model, EmulatorConfig("uniform-drop", 2, alpha=0.5))
    out = save_emulator(emulator, tmp_path / "emu")
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        load_emulator(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load_emulator(out)
    with pytest.raises(IntegrityError, match="not an emulator folder"):
        load_emulator(tmp_path)


def test_artifact_from_another_model_is_refused(tokens, tmp_path):
    artifact = _artifact(tiny_model("llama", seed=0), tokens, tmp_path)
    with pytest.raises(IntegrityError, match="different model"):
        build_emulator(tiny_model("llama", seed=1), EmulatorConfig("scaleot", 2, alpha=0.5), artifact)


def test_artifact_made_with_more_adapters_is_refused(tokens, tmp_path):
    model = tiny_model("llama")
    artifact = _artifact(model, tokens, tmp_path, adapters=4)
    with pytest.raises(ConfigError, match="larger N_a"):
        build_emulator(model, EmulatorConfig("scaleot", 2, alpha=0.5), artifact)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"rank_keep_ratio": 2.0}, "rank_keep_ratio"),
        ({"num_adapter_layers": 3}, "even"),
        ({"method": "magic"}, "unknown emulator strategy"),
    ],
)
def test_bad_emulator_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EmulatorConfig(**kwargs)


def test_adapters_must_be_fewer_than_blocks():
    with pytest.raises(ConfigError, match="smaller than"):
        build_emulator(tiny_model("gpt2", num_layers=4), EmulatorConfig("uniform-drop", 4, alpha=0.5))


def test_importance_strategies_need_an_artifact():
    with pytest.raises(ConfigError, match="layer-replace"):
        build_emulator(tiny_model("opt"), EmulatorConfig("importance-drop", 2, alpha=0.5))


def test_saving_is_deterministic(tmp_path):
    model = tiny_model("gpt2")  # tied embeddings: one stored name, chosen the same way every time
    shas = []
    for i in range(2):
        emulator = build_emulator(model, EmulatorConfig("uniform-drop", 2, alpha=0.5))
        shas.append(json.loads((save_emulator(emulator, tmp_path / str(i)) / "manifest.json").read_text())["weights_sha256"])
    assert shas[0] == shas[1]


def test_emulators_that_would_give_the_model_away_are_refused():
    from scaleot_fed.manifest import check_shippable

    model = tiny_model("llama", num_layers=8)
    identity = EmulatorConfig("uniform-drop", 2, alpha=0.5)
    identity.alpha = 0.0  # EmulatorConfig refuses it; check_shippable is the last line of defence
    whole = build_emulator(model, identity)
    with pytest.raises(IntegrityError, match="the full model"):
        check_shippable(whole.manifest)
    emulator = build_emulator(model, EmulatorConfig("uniform-drop", 2, alpha=0.5))
    check_shippable(emulator.manifest, emulator.manifest["dropped_layers"])  # dropped blocks never leave
    kept = emulator.manifest["kept_layers"][0]
    with pytest.raises(IntegrityError, match=f"blocks marked private would leave the model owner: {kept}"):
        check_shippable(emulator.manifest, [kept])
    with pytest.raises(IntegrityError, match="adapter"):
        check_shippable(emulator.manifest, [emulator.manifest["adapter_layers"][0]])
