"""The LM head runs on scored positions only, and gives what the full forward gives."""

import torch

from scaleot_fed.finetune import IGNORE
from scaleot_fed.heads import answer_token_loss, lm_loss, scored_positions, target_logprobs

from .conftest import VOCAB, tiny_model


class RowCounter:
    """A forward hook on the LM head recording how many rows (positions) it saw."""

    def __init__(self, model):
        self.rows = []
        self.handle = model.get_output_embeddings().register_forward_hook(
            lambda module, args, out: self.rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # a right-padded row
    labels = torch.full_like(ids, IGNORE)
    labels[0, 6:] = ids[0, 6:]
    labels[1, 8:] = ids[1, 8:]
    labels[2, 5:7] = ids[2, 5:7]
    return ids, mask, labels


def test_answer_loss_equals_the_full_forward_and_the_head_sees_only_answer_rows(family):
    model = tiny_model(family)
    ids, mask, labels = _batch()
    expected = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    counter = RowCounter(model)
    loss, n = answer_token_loss(model, ids, mask, labels)
    scored = int((labels[:, 1:] != IGNORE).sum())
    assert n == scored and counter.rows == [scored] and scored < ids.numel() // 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()  # gradients flow through the gathered rows
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)


def test_target_logprobs_match_log_softmax_of_the_full_logits(family):
    model = tiny_model(family)
    ids, mask, labels = _batch(1)
    where, targets = scored_positions(labels)
    counter = RowCounter(model)
    got = target_logprobs(model, ids, mask, where, targets)
    assert counter.rows == [targets.numel()]
    full = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    torch.testing.assert_close(got, full[where[0], where[1]].gather(1, targets[:, None]).squeeze(1),
                               rtol=0, atol=1e-5)


def test_chunked_lm_loss_equals_the_full_loss_and_its_gradient(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(2))
    expected = model(input_ids=ids, labels=ids, use_cache=False).loss
    expected.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    counter = RowCounter(model)
    loss = lm_loss(model, ids, chunk_rows=10)
    assert max(counter.rows) <= 10 and sum(counter.rows) == 4 * 11  # never the whole (batch, length) at once
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    for name, grad in reference.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_length_buckets_cover_every_item_once_per_epoch_and_pad_less():
    import random

    from scaleot_fed.batching import LengthBatches

    lengths = [random.Random(i).randint(5, 200) for i in range(96)]
    batches = LengthBatches(lengths, 8, random.Random(0))
    epoch = [next(batches) for _ in range(12)]  # 96 items / 8 = one epoch exactly
    assert sorted(i for b in epoch for i in b) == list(range(96)) and all(len(b) == 8 for b in epoch)
    shuffled = random.Random(0).sample(range(96), 96)
    unbucketed = [shuffled[k : k + 8] for k in range(0, 96, 8)]
    assert batches.padding_ratio(epoch) < 0.5 * batches.padding_ratio(unbucketed)
    # the batch order is not sorted by length (buckets are shuffled with the seed)
    longest = [max(lengths[i] for i in b) for b in epoch]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    again = LengthBatches(lengths, 8, random.Random(0))
    assert [next(again) for _ in range(12)] == epoch  # the seed decides everything


def test_finetune_and_scoring_never_send_unscored_positions_to_the_head(gpt2_tokenizer):
    from scaleot_fed.evaluate import TARGET_DELIMITER, encode_pair, evaluate_multiple_choice
    from scaleot_fed.finetune import FinetuneConfig, encode_example, finetune, make_trainable
    from scaleot_fed.tasks import MCItem

    model = tiny_model("gpt2", num_layers=2, vocab_size=len(gpt2_tokenizer))
    items = [MCItem(f"Question: which colour is the {w} thing here?\nAnswer:", ("red", f"blue {w}"), 1)
             for w in ("sky", "sea", "car", "cup")]
    counter = RowCounter(model)
    evaluate_multiple_choice(model, gpt2_tokenizer, items, batch_size=3)
    answer_tokens = sum(len(encode_pair(gpt2_tokenizer, i.context, TARGET_DELIMITER + c)[1])
                        for i in items for c in i.choices)
    assert sum(counter.rows) == answer_tokens  # one head row per continuation token, nothing else

    config = FinetuneConfig(mode="lora", steps=2, batch_size=2, eval_items=2, eval_every=2, select_best=False)
    trained = make_trainable(model, [0, 1], config)
    counter.rows.clear()
    finetune(trained, gpt2_tokenizer, items, items[:2], config, progress=False)
    answers = [sum(label != IGNORE for label in encode_example(gpt2_tokenizer, i, 256)[1]) for i in items]
    # forwards: validation (start), 2 training steps of 2 items, validation (end): answer rows only
    pairs = {answers[i] + answers[j] for i in range(4) for j in range(4) if i != j}
    assert len(counter.rows) == 4 and counter.rows[0] == counter.rows[-1] == answers[0] + answers[1]
    assert counter.rows[1] in pairs and counter.rows[2] in pairs
