"""Scoring with shared contexts encoded once (scaleot_fed.packing) against one request per choice."""

import pytest
import torch

from scaleot_fed.evaluate import choice_loglikelihoods, encode_pair
from scaleot_fed.packing import PackedItem, worth_packing

from .conftest import tiny_model

GROUPS = [
    ("A long shared context that the choices all continue, with a few more words in it:",
     [" red", " a much longer answer of several words", " blue sky"]),
    ("Short one:", [" yes", " no"]),
    ("Another context, of medium length, here", [" one", " two words", " three more words", " x"]),
]


def _head_rows(model, gpt2_tokenizer, pack: bool) -> int:
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    choice_loglikelihoods(model, gpt2_tokenizer, GROUPS, batch_size=4, pack=pack)
    hook.remove()
    return sum(rows)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "mistral", "qwen2"])
def test_packed_scores_equal_one_request_per_choice(family, attention, gpt2_tokenizer):
    model = tiny_model(family, num_layers=3, vocab_size=len(gpt2_tokenizer))
    model.config._attn_implementation = attention
    flat = choice_loglikelihoods(model, gpt2_tokenizer, GROUPS, batch_size=4, pack=False)
    packed = choice_loglikelihoods(model, gpt2_tokenizer, GROUPS, batch_size=4, pack=True)
    assert [len(s) for s in packed] == [len(xs) for _, xs in GROUPS]
    assert torch.allclose(torch.tensor(sum(packed, [])), torch.tensor(sum(flat, [])), atol=1e-5, rtol=0)
    # the head still sees one row per continuation token and nothing else
    answer_tokens = sum(len(encode_pair(gpt2_tokenizer, c, x)[1]) for c, xs in GROUPS for x in xs)
    assert _head_rows(model, gpt2_tokenizer, True) == _head_rows(model, gpt2_tokenizer, False) == answer_tokens


def test_a_choice_that_needs_truncating_falls_back_to_its_own_requests(gpt2_tokenizer):
    model = tiny_model("llama", num_layers=2, vocab_size=len(gpt2_tokenizer))
    groups = [(" ".join(["word"] * 40), [" a", " b c"]), ("Short:", [" yes", " no"])]
    flat = choice_loglikelihoods(model, gpt2_tokenizer, groups, max_length=24, pack=False)
    packed = choice_loglikelihoods(model, gpt2_tokenizer, groups, max_length=24, pack=True)
    assert torch.allclose(torch.tensor(sum(packed, [])), torch.tensor(sum(flat, [])), atol=1e-5, rtol=0)


def test_packing_is_chosen_only_where_it_saves_tokens():
    long_context = PackedItem(list(range(60)), [[1] * 12] * 4)  # HellaSwag-like: 104 vs 284 tokens
    short_context = PackedItem(list(range(14)), [[1] * 24] * 2)  # PIQA-like: 60 vs 74 tokens
    assert long_context.length == 60 + 4 * 11 and long_context.unpacked_length == 4 * 71
    assert worth_packing([long_context]) and not worth_packing([short_context])
