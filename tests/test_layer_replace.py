import torch

from scaleot_fed.arch import get_layers
from scaleot_fed.artifact import load_artifact, save_artifact
from scaleot_fed.harmonizer import Harmonizer
from scaleot_fed.layer_replace import LayerReplaceConfig, run_layer_replace, sample_candidate, swapped_blocks

from .conftest import tiny_model


def test_candidate_keeps_half_of_each_group():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12)
    for _ in range(20):
        keep = sample_candidate(scores, group_size=4, generator=g)
        assert keep.view(3, 4).sum(dim=1).tolist() == [2, 2, 2]


def test_candidate_favours_high_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([6.0, -6.0, 6.0, -6.0])
    kept = torch.stack([sample_candidate(scores, 4, g) for _ in range(200)]).float().mean(0)
    assert kept[0] > 0.8 and kept[2] > 0.8 and kept[1] < 0.2


def test_swapped_blocks_restores_the_model(tokens):
    model = tiny_model("llama")
    before = model(input_ids=tokens[:2]).logits
    with swapped_blocks(model, {3: Harmonizer(32, 4)}):
        assert isinstance(get_layers(model)[3], Harmonizer)
    assert torch.equal(model(input_ids=tokens[:2]).logits, before)


def _config(**kw):
    return LayerReplaceConfig(**({"steps": 4, "batch_size": 2, "block_size": 16, "harmonizer_rank": 8} | kw))


def test_layer_replace_moves_scores_trains_harmonizers_and_leaves_model_intact(family, tokens):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_layer_replace(model, tokens, _config(), progress=False)
    assert set(result.scores) == {2, 3, 4, 5}
    assert any(abs(s) > 1e-6 for s in result.scores.values())
    assert any(h.up.weight.abs().sum() > 0 for h in result.harmonizers.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(result.history["loss"]) == 4 and result.tokens_forward_backward == 4 * 2 * 16


def test_layer_replace_is_seeded(tokens):
    a = run_layer_replace(tiny_model("llama"), tokens, _config(seed=3), progress=False)
    b = run_layer_replace(tiny_model("llama"), tokens, _config(seed=3), progress=False)
    assert a.scores == b.scores
    assert all(torch.equal(a.harmonizers[i].up.weight, b.harmonizers[i].up.weight) for i in a.harmonizers)


def test_artifact_round_trip(tokens, tmp_path):
    result = run_layer_replace(tiny_model("gpt2"), tokens, _config(), "tiny-gpt2", progress=False)
    artifact = load_artifact(save_artifact(result, tmp_path))
    assert artifact.scores == result.scores
    assert artifact.meta["source_model"] == "tiny-gpt2"
    assert artifact.meta["ranking_least_important_first"] == result.ranking()
    x = torch.randn(1, 3, 32)
    for i, h in result.harmonizers.items():
        assert torch.equal(artifact.harmonizers[i](x), h(x))
    assert {"seconds", "tokens_forward_backward"} <= set(artifact.meta["cost"])
