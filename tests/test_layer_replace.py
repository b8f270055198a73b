import torch

from scaleot_fed.arch import get_layers
from scaleot_fed.artifact import load_artifact, save_artifact
from scaleot_fed.harmonizer import Harmonizer
from scaleot_fed.layer_replace import (
    LayerReplaceConfig,
    regression_scores,
    run_layer_replace,
    sample_candidate,
    swapped_blocks,
)

from .conftest import tiny_model


def test_global_candidate_replaces_the_alpha_share():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(13)
    for alpha, replaced in ((0.5, 6), (0.25, 3), (0.75, 10)):  # round(alpha * 13)
        for _ in range(10):
            assert int((~sample_candidate(scores, alpha, g)).sum()) == replaced


def test_group_candidate_replaces_half_of_each_group_and_sometimes_a_lone_block():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(13)  # groups of 4, 4, 4 and one lone block
    lone = []
    for _ in range(200):
        keep = sample_candidate(scores, 0.5, g, selection="group", group_size=4)
        assert keep[:12].view(3, 4).sum(dim=1).tolist() == [2, 2, 2]
        lone.append(float(keep[12]))
    assert 0.35 < sum(lone) / len(lone) < 0.65  # replaced with probability alpha, not never


def test_candidate_favours_high_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([6.0, -6.0, 6.0, -6.0])
    for selection in ("global", "group"):
        kept = torch.stack([sample_candidate(scores, 0.5, g, selection, 4) for _ in range(200)]).float().mean(0)
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


def test_regression_ranking_finds_the_block_whose_replacement_hurts(tokens):
    # a tiny model whose block 3 is made to matter: its harmonizer outputs garbage, the others
    # stand in exactly (identity), so the fit must put block 3 on top
    model = tiny_model("llama").eval()
    config = _config(ranking_candidates=24, ranking_batches=1)
    garbage = Harmonizer(32, 4)
    torch.nn.init.normal_(garbage.up.weight, std=5.0)
    harmonizers = {i: (garbage if i == 3 else _Keep(get_layers(model)[i])) for i in (2, 3, 4, 5)}
    scores, fit = regression_scores(model, tokens[:4], harmonizers, [2, 3, 4, 5], config, torch.Generator().manual_seed(0))
    assert int(torch.argmax(scores)) == 1 and abs(float(scores.sum())) < 1e-4
    assert fit["replaced_per_candidate"] == 2 and fit["r2"] > 0.9


class _Keep(torch.nn.Module):
    """A stand-in that runs the original block: replacing it changes nothing."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return self.block(*args, **kwargs)


def test_rl_and_regression_rankings_and_separate_report_texts(tokens):
    rl = run_layer_replace(tiny_model("llama"), tokens, _config(ranking="rl"), progress=False)
    assert rl.scores == rl.rl_scores and not rl.fit
    reg = run_layer_replace(tiny_model("llama"), tokens, _config(), progress=False)
    assert reg.rl_scores == rl.rl_scores and reg.scores != reg.rl_scores and reg.fit["candidates"] == 96
    assert len(reg.evaluation["replaced"]) == 2 and reg.evaluation["replaced"] == sorted(reg.ranking()[:2])


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


def test_rerank_draws_what_a_fresh_run_draws_and_more_candidates_change_only_the_ranking(tokens, tmp_path):
    import dataclasses

    import pytest

    from scaleot_fed.errors import ConfigError
    from scaleot_fed.rerank import rerank, rerank_changes

    model = tiny_model("llama")
    config = _config(ranking_candidates=12, ranking_batches=1)
    artifact = load_artifact(save_artifact(run_layer_replace(model, tokens, config, "tiny", progress=False), tmp_path))
    assert rerank_changes(artifact.meta, config) == []
    same = rerank(model, tokens, artifact, config)  # the harmonizers as saved, the ranking's own draws
    assert same.scores == pytest.approx(artifact.scores, abs=1e-6) and same.evaluation["replaced"] == artifact.meta[
        "evaluation"]["replaced"]
    more = dataclasses.replace(config, ranking_candidates=48, ranking_batches=2)
    assert rerank_changes(artifact.meta, more) == ["ranking_batches", "ranking_candidates"]
    again = rerank(model, tokens, artifact, more)
    assert again.fit["candidates"] == 48 and again.scores != same.scores
    assert again.rl_scores == {int(k): v for k, v in artifact.meta["rl_scores"].items()}
    cost = artifact.meta["cost"]
    old_fit = artifact.meta["ranking_fit"]["tokens"]  # (the tiny text has one reward batch: 4x the candidates)
    assert again.fit["tokens"] == 4 * old_fit and again.tokens_forward_only == cost["tokens_forward_only"] - old_fit + 4 * old_fit
    assert again.tokens_forward_backward == cost["tokens_forward_backward"]
    with pytest.raises(ConfigError, match="only ranking_candidates, ranking_batches may change"):
        rerank(model, tokens, artifact, dataclasses.replace(config, steps=8))
    assert rerank_changes(artifact.meta, dataclasses.replace(config, steps=8)) is None
