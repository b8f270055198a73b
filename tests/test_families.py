"""Every tested decoder family end to end on a tiny random model: build an emulator (with SRC,
fused q/k/v projections factorised group by group), save and load it, fine-tune LoRA on it, plug
the result into the full model and score it."""

import pytest
import torch

from scaleot_fed.arch import TESTED_FAMILIES, architecture_of, get_layers
from scaleot_fed.emulator import EmulatorConfig, load_emulator, save_emulator
from scaleot_fed.emulator.build import build_emulator
from scaleot_fed.errors import ConfigError
from scaleot_fed.evaluate import evaluate_multiple_choice
from scaleot_fed.finetune import FinetuneConfig, finetune, make_trainable
from scaleot_fed.plugin import plug_in_trained
from scaleot_fed.src import FusedLowRankLinear, LowRankLinear
from scaleot_fed.tasks import MCItem

from .conftest import ALL_FAMILIES, tiny_config, tiny_model

ITEMS = [MCItem(f"Question: say {w}\nAnswer:", ("no", w), 1) for w in ("red", "sky", "sea", "cup", "car", "tea")]


def test_the_tested_families_are_the_ones_the_tests_build():
    assert set(TESTED_FAMILIES) == set(ALL_FAMILIES)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_build_finetune_plug_in_and_score(family, gpt2_tokenizer, tmp_path):
    full = tiny_model(family, num_layers=6, vocab_size=len(gpt2_tokenizer))
    arch = architecture_of(full)
    assert architecture_of(tiny_config(family, 6, len(gpt2_tokenizer))) == arch  # weightless: the same answer
    emulator = build_emulator(full, EmulatorConfig("uniform-drop", 2, 0.5, rank_keep_ratio=0.5))
    layout = emulator.manifest["layout"]
    if getattr(full.config, "layer_types", None) is not None:  # per-layer lists follow the blocks
        assert emulator.model.config.layer_types == [full.config.layer_types[e["source"]] for e in layout]
    compressed = get_layers(emulator.model)[[e["kind"] for e in layout].index("compressed")]
    kinds = {type(compressed.get_submodule(p)) for p in arch.attention_projections}
    assert kinds == ({FusedLowRankLinear} if arch.fused_qkv == arch.attention_projections else
                     {LowRankLinear, FusedLowRankLinear} if arch.fused_qkv else {LowRankLinear})

    loaded = load_emulator(save_emulator(emulator, tmp_path / "emulator", tokenizer=gpt2_tokenizer))
    ids = torch.tensor([[5, 17, 301, 42, 7, 999, 3]])
    assert torch.allclose(loaded.model(input_ids=ids).logits, emulator.model(input_ids=ids).logits, atol=1e-5)

    config = FinetuneConfig(mode="lora", steps=2, batch_size=2, eval_every=2, eval_items=2, lr=1e-2, device="cpu")
    untouched = make_trainable(loaded.model, list(loaded.adapter_positions()), config)
    plugged = plug_in_trained(full, untouched, loaded)  # LoRA's B starts at zero: the full model again
    assert torch.allclose(plugged(input_ids=ids).logits, full(input_ids=ids).logits, atol=1e-5)

    finetune(untouched, gpt2_tokenizer, ITEMS, ITEMS[:2], config, progress=False)
    plugged = plug_in_trained(full, untouched, loaded)
    assert not torch.allclose(plugged(input_ids=ids).logits, full(input_ids=ids).logits, atol=1e-5)
    result = evaluate_multiple_choice(plugged, gpt2_tokenizer, ITEMS, batch_size=4)
    assert result["n"] == len(ITEMS) and 0.0 <= result["acc"] <= 1.0


@pytest.mark.parametrize("per_head", [False, True])
def test_a_fused_projection_is_compressed_group_by_group(per_head):
    """q, k and v of a fused weight get exactly what separate projections would get: each its
    own truncated SVD at the same rank ratio, put back in the fused row order."""
    from scaleot_fed.arch import Architecture
    from scaleot_fed.src import low_rank_factors, rank_for_ratio

    arch = Architecture("t", "layers", ("qkv",), "mlp", fused_qkv=("qkv",), qkv_sizes=(16, 8, 8),
                        per_head_qkv=per_head, head_dim=4)
    if per_head:  # GPT-NeoX has no grouped k/v: heads x (q, k, v) x head_dim
        arch = Architecture("t", "layers", ("qkv",), "mlp", fused_qkv=("qkv",), qkv_sizes=(16, 16, 16),
                            per_head_qkv=True, head_dim=4)
    rows = arch.qkv_rows()
    assert torch.equal(torch.sort(torch.cat(rows)).values, torch.arange(sum(arch.qkv_sizes)))
    if per_head:
        assert rows[0][:4].tolist() == [0, 1, 2, 3] and rows[1][:4].tolist() == [4, 5, 6, 7]
        assert rows[0][4:8].tolist() == [12, 13, 14, 15]  # the second head's q
    weight = torch.randn(sum(arch.qkv_sizes), 12, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(weight.shape[0])
    exact = FusedLowRankLinear.from_weight(weight, bias, rows, 1.0)
    assert torch.allclose(exact.dense_weight(), weight, atol=1e-5)
    low = FusedLowRankLinear.from_weight(weight, bias, rows, 0.5)
    for r, part in zip(rows, low.parts):
        up, down = low_rank_factors(weight[r], rank_for_ratio(len(r), 12, 0.5))
        assert torch.allclose(low.dense_weight()[r], up @ down, atol=1e-5)
        assert part.rank == rank_for_ratio(len(r), 12, 0.5)
    x = torch.randn(3, 12)
    assert torch.allclose(low(x), x @ low.dense_weight().T + bias, atol=1e-5)


def test_a_model_without_decoder_blocks_is_refused_naming_what_is_missing():
    from transformers import BertConfig

    with pytest.raises(ConfigError, match="attention is not causal"):
        architecture_of(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64))


def test_a_fused_projection_of_unknown_shape_is_refused():
    from transformers import GPTBigCodeConfig

    config = GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4, multi_query=True, vocab_size=96)  # c_attn: q + 1 k/v head
    with pytest.raises(ConfigError, match="c_attn fuses q, k and v in a (shape|row order) not known here"):
        architecture_of(config)


def test_per_layer_lists_follow_the_blocks_and_token_id_lists_do_not():
    from scaleot_fed.arch import set_layers

    model = tiny_model("gemma2", num_layers=4)
    model.config.eos_token_id = [1, 2, 3, 4]  # as long as the stack, but not per layer
    types = list(model.config.layer_types)
    blocks = get_layers(model)
    set_layers(model, [blocks[0], blocks[3]], [0, 3])
    assert model.config.layer_types == [types[0], types[3]] and model.config.num_hidden_layers == 2
    assert model.config.eos_token_id == [1, 2, 3, 4]
