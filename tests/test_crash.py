import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scaleot_fed.arch import get_layers
from scaleot_fed.emulator import EmulatorConfig, load_emulator, save_emulator
from scaleot_fed.emulator.build import build_emulator
from scaleot_fed.emulator.crash import cluster_adjacent, linear_cka, token_similarity
from scaleot_fed.errors import ConfigError

from .conftest import tiny_model


def test_linear_cka_is_one_up_to_rotation_and_scale_and_low_for_unrelated():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ rotation + 1.0) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(2000, 8, generator=g)) < 0.05
    half = x * torch.tensor([1.0] * 4 + [0.0] * 4)  # half the directions: 4 / (sqrt(8) sqrt(4))
    assert linear_cka(x, half) == pytest.approx(2 ** -0.5, abs=0.03)


def test_token_similarity_is_not_decided_by_one_massive_activation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 8, generator=g), torch.randn(2000, 8, generator=g)
    x[0, 3] = y[0, 3] = 1e4  # an attention sink: one token, huge in one direction, in both blocks
    assert linear_cka(x, y) > 0.99  # the raw measure sees only the sink
    assert token_similarity([x, y])[0, 1] < 0.05


def test_adjacent_clustering_recovers_block_structure_and_stays_contiguous():
    groups = [[0, 1, 2], [3, 4], [5, 6, 7]]
    sim = np.full((8, 8), 0.2)
    for g in groups:
        sim[np.ix_(g, g)] = 0.9
    np.fill_diagonal(sim, 1.0)
    assert cluster_adjacent(sim, 3) == groups
    rng = np.random.default_rng(0)
    noisy = rng.uniform(size=(8, 8))
    for k in range(1, 9):
        clusters = cluster_adjacent((noisy + noisy.T) / 2, k)
        assert len(clusters) == k and sum(clusters, []) == list(range(8))
    with pytest.raises(ConfigError, match="cannot cluster"):
        cluster_adjacent(sim, 0)


def test_crash_emulator_shares_kept_blocks_stores_them_once_and_reloads_equal(tokens, tmp_path):
    model = tiny_model("llama", num_layers=10)
    emulator = build_emulator(model, EmulatorConfig("crash", 2, alpha=0.5, rank_keep_ratio=0.5), calibration=tokens)
    manifest = emulator.manifest
    layout = manifest["layout"]
    assert len(layout) == 10 and manifest["dropped_layers"] == []  # the full depth
    shared = {int(k): v for k, v in manifest["shared_layers"].items()}
    assert len(shared) == 4 and sorted(shared) == manifest["replaced_layers"]  # round(0.5 * 8)
    clusters = manifest["sharing"]["clusters"]
    assert sum(clusters, []) == list(range(1, 9)) and len(clusters) == 4
    for cluster, kept in zip(clusters, manifest["sharing"]["kept"]):
        assert kept in cluster and all(shared[m] == kept for m in cluster if m != kept)
    layers = get_layers(emulator.model)
    for pos, kept in shared.items():  # the same tensors, distinct modules (each its own cache slot)
        assert all(a is b for a, b in zip(layers[pos].parameters(), layers[kept].parameters()))
        assert layers[pos].self_attn is not layers[kept].self_attn and layers[pos].self_attn.layer_idx == pos

    assert all(f"{p}->{k}" in emulator.summary() for p, k in shared.items())  # what `info` prints
    out = save_emulator(emulator, tmp_path / "emu")
    stored = load_file(str(out / "model.safetensors"))
    unique = {p.data_ptr() for p in emulator.model.parameters()}
    assert len(stored) == len(unique) and manifest["num_params"] == sum(p.numel() for p in emulator.model.parameters())
    assert manifest["num_params"] < manifest["source_num_params"]
    reloaded = load_emulator(out, tokenizer=False)
    with torch.no_grad():
        assert torch.allclose(reloaded.model(input_ids=tokens[:3]).logits, emulator.model(input_ids=tokens[:3]).logits,
                              atol=1e-5)
    again = get_layers(reloaded.model)
    assert all(all(a is b for a, b in zip(again[p].parameters(), again[k].parameters())) for p, k in shared.items())
    # generation with a KV cache (one slot per position) equals generation without one
    prompt = tokens[:1, :5]
    cached = reloaded.model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = reloaded.model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_crash_refuses_missing_calibration_and_alpha_one(tokens):
    model = tiny_model("llama", num_layers=6)
    with pytest.raises(ConfigError, match="calibration"):
        build_emulator(model, EmulatorConfig("crash", 2, alpha=0.5))
    with pytest.raises(ConfigError, match="alpha < 1"):
        build_emulator(model, EmulatorConfig("crash", 2, alpha=1.0), calibration=tokens)
    from scaleot_fed.estimate import estimate
    from scaleot_fed.finetune import FinetuneConfig

    from .conftest import tiny_config

    with pytest.raises(ConfigError, match="alpha < 1"):  # the estimate says the same, before any model exists
        estimate(tiny_config("llama", 6), EmulatorConfig("crash", 2, alpha=1.0), FinetuneConfig(), batch_size=1,
                 seq_len=8)


def test_the_estimate_counts_a_crash_emulator_as_built(tokens):
    from scaleot_fed.estimate import estimate
    from scaleot_fed.finetune import FinetuneConfig, make_trainable

    from .conftest import tiny_config

    config, finetune = EmulatorConfig("crash", 2, 0.5, rank_keep_ratio=0.5), FinetuneConfig(mode="lora", lora_r=4)
    est = estimate(tiny_config("llama", 8), config, finetune, batch_size=2, seq_len=16)
    emulator = build_emulator(tiny_model("llama", num_layers=8), config, calibration=tokens)
    assert est.emulator_params == sum(p.numel() for p in emulator.model.parameters())
    trained = make_trainable(emulator.model, list(emulator.adapter_positions()), finetune)
    assert est.trainable_params == sum(p.numel() for p in trained.parameters() if p.requires_grad)
    dropped = estimate(tiny_config("llama", 8), EmulatorConfig("uniform-drop", 2, 0.5, rank_keep_ratio=0.5), finetune,
                       batch_size=2, seq_len=16)
    assert est.emulator_params == dropped.emulator_params  # the same blocks held ...
    assert est.activation_bytes > dropped.activation_bytes  # ... run over the full depth


def test_a_shared_position_takes_its_kept_blocks_attention_type(tokens, tmp_path):
    full = tiny_model("gemma2", num_layers=10)  # sliding and full attention alternate
    emulator = build_emulator(full, EmulatorConfig("crash", 2, alpha=0.5), calibration=tokens)
    shared = {int(p): k for p, k in emulator.manifest["shared_layers"].items()}
    assert any(full.config.layer_types[p] != full.config.layer_types[k] for p, k in shared.items())
    for p, k in shared.items():  # config and module agree: the kept block truly runs again
        assert emulator.model.config.layer_types[p] == full.config.layer_types[k]
    reloaded = load_emulator(save_emulator(emulator, tmp_path / "emu"), tokenizer=False)
    with torch.no_grad():
        assert torch.allclose(reloaded.model(input_ids=tokens[:2]).logits, emulator.model(input_ids=tokens[:2]).logits,
                              atol=1e-5)
