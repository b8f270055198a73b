import pytest
import torch
from transformers import BertConfig, T5Config

from scaleot_fed.arch import architecture_of, get_layers
from scaleot_fed.errors import ScaleOTError
from scaleot_fed.harmonizer import Harmonizer
from scaleot_fed.src import LowRankLinear, factors_save_memory, low_rank_factors, rank_for_ratio

from .conftest import tiny_config


def test_each_family_is_recognised(family):
    assert architecture_of(tiny_config(family)).name == family


@pytest.mark.parametrize("config", [BertConfig(), T5Config()])
def test_unknown_architecture_names_supported_families(config):
    with pytest.raises(ScaleOTError) as info:
        architecture_of(config)
    message = str(info.value)
    assert config.model_type in message
    for name in ("llama", "gpt2", "opt"):
        assert name in message


def test_fresh_harmonizer_is_identity_and_ignores_block_arguments():
    h = Harmonizer(32, rank=8)
    x = torch.randn(2, 5, 32)
    out = h(x, attention_mask=None, position_ids=torch.arange(5), cache=None, position_embeddings=(x, x), use_cache=True)
    assert out.shape == x.shape
    assert torch.equal(out, x)


def test_trained_harmonizer_is_not_identity():
    h = Harmonizer(32, rank=8)
    with torch.no_grad():
        h.up.weight.normal_()
    x = torch.randn(2, 5, 32)
    assert not torch.allclose(h(x), x)


def test_src_full_rank_reproduces_the_weight():
    w = torch.randn(48, 32)
    up, down = low_rank_factors(w, rank_for_ratio(48, 32, 1.0))
    assert torch.allclose(up @ down, w, atol=1e-5)


@pytest.mark.parametrize("ratio,expected", [(0.5, 16), (0.25, 8), (0.01, 1), (0.1, 3)])
def test_src_factors_have_exactly_the_requested_rank(ratio, expected):
    w = torch.randn(48, 32, dtype=torch.float64)
    rank = rank_for_ratio(48, 32, ratio)
    assert rank == expected
    up, down = low_rank_factors(w, rank)
    assert up.shape == (48, rank) and down.shape == (rank, 32)
    assert int(torch.linalg.matrix_rank(up @ down)) == rank


def test_src_truncation_is_the_best_approximation():
    w = torch.randn(40, 40, dtype=torch.float64)
    up, down = low_rank_factors(w, 10)
    s = torch.linalg.svdvals(w)
    # Eckart-Young: the error of the best rank-k approximation is the norm of the dropped values.
    assert torch.isclose(torch.linalg.norm(w - up @ down), s[10:].norm(), rtol=1e-8)


def test_low_rank_linear_stores_the_smaller_form_and_matches_dense():
    assert factors_save_memory(64, 64, 31) and not factors_save_memory(64, 64, 32)
    w, b = torch.randn(64, 64), torch.randn(64)
    x = torch.randn(3, 64)
    for rank in (8, 48):
        low = LowRankLinear.from_weight(w, b, rank)
        assert low.factored == (rank == 8)
        stored = sum(p.numel() for p in low.parameters()) - 64
        assert stored == (rank * 128 if low.factored else 64 * 64)
        assert torch.allclose(low(x), x @ low.dense_weight().T + b, atol=1e-5)


def test_get_layers_finds_every_block(family):
    from .conftest import tiny_model

    assert len(get_layers(tiny_model(family, num_layers=6))) == 6
