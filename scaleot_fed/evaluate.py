"""Zero-shot evaluation the way lm-evaluation-harness does it (its scoring rules, as this module
follows them, are below; ``tests/test_real_smollm2.py`` checks the numbers against lm-eval itself).

Each choice is the continuation ``" " + choice`` after the context; its score is the sum of the
log-probabilities of its tokens. ``acc`` takes the best score, ``acc_norm`` the best score divided
by the choice's length in characters.

Truncation rule (lm-eval's): the model sees the last ``max_length`` tokens of
context + continuation, i.e. a context too long for the window loses tokens on the left; a
continuation that alone exceeds the window is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .errors import ConfigError
from .heads import lm_loss, target_logprobs
from .packing import PackedItem, can_pack, packed_scores, worth_packing
from .score_state import ScoreLog
from .tasks import MCItem
from .train_state import Checkpoint

TARGET_DELIMITER = " "


def model_max_length(model: nn.Module, default: int = 2048) -> int:
    """The context window of a model (``max_position_embeddings`` / ``n_positions``)."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation; the
    continuation's tokens are those of ``context + continuation`` after the context's length."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"] if context else []
    if not ctx:  # an empty context is conditioned on the end-of-text token, as lm-eval does
        ctx = [tokenizer.eos_token_id]
        return ctx, whole
    return ctx, whole[len(ctx):]


@dataclass(frozen=True)
class Request:
    """One (context, continuation) log-likelihood request, already tokenised and truncated."""

    input_ids: list[int]  # model input: (ctx + cont)[-(max_len + 1):][:-1]
    cont_len: int


def make_request(tokenizer, context: str, continuation: str, max_length: int) -> tuple[Request, list[int]]:
    """Tokenise one request and apply the truncation rule; returns it with its target tokens."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    if not cont:
        raise ConfigError(f"continuation {continuation!r} produced no tokens")
    if len(cont) > max_length:
        raise ConfigError(
            f"a continuation of {len(cont)} tokens does not fit the model's {max_length}-token window"
        )
    full = (ctx + cont)[-(max_length + 1):]
    return Request(input_ids=full[:-1], cont_len=len(cont)), full[-len(cont):]


def pad_right(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as a right-padded ``(n, longest)`` batch and its attention mask."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.no_grad()
def loglikelihoods(model: nn.Module, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8,
                   max_length: int | None = None, progress: bool = False, log: ScoreLog | None = None) -> list[float]:
    """Sum of continuation log-probabilities for each ``(context, continuation)`` pair.

    Requests are batched longest first (right-padded), so padding is small and results do not
    depend on the batch size beyond float rounding. ``log`` keeps finished batches (resuming).
    """
    max_length = max_length or model_max_length(model)
    built = [make_request(tokenizer, c, x, max_length) for c, x in pairs]
    order = sorted(range(len(built)), key=lambda i: -len(built[i][0].input_ids))
    log = log or ScoreLog()
    scores = [0.0] * len(built)
    was_training = model.training
    model.eval()
    bar = _bar(len(order), progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        sums = log.batch(f"request {start}", partial(_request_batch, model, [built[i] for i in chunk], _pad_id(tokenizer)))
        for i, value in zip(chunk, sums):
            scores[i] = value
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return scores


def _request_batch(model: nn.Module, batch: list[tuple[Request, list[int]]], pad: int) -> list[float]:
    """The scores of one batch of requests with their target tokens."""
    device = next(model.parameters()).device
    ids, mask = pad_right([request.input_ids for request, _ in batch], pad)
    # positions n-cont_len .. n-1 of each row predict its continuation's tokens: only those
    # rows go through the LM head (not (batch, width, vocab))
    batch_idx, pos, targets = [], [], []
    for row, (request, cont) in enumerate(batch):
        n = len(request.input_ids)
        batch_idx += [row] * request.cont_len
        pos += range(n - request.cont_len, n)
        targets += cont
    where = torch.tensor([batch_idx, pos], device=device)  # (2, n_scored)
    logprobs = target_logprobs(model, ids.to(device), mask.to(device), where, torch.tensor(targets, device=device))
    sums = torch.zeros(len(batch), device=device).index_add_(0, where[0], logprobs)  # (len(batch),)
    return sums.tolist()


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _bar(total: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="scoring", unit="req", disable=not progress, dynamic_ncols=True)


def _packable(tokenizer, context: str, continuations: list[str], max_length: int) -> PackedItem | None:
    """The item as one packed sequence, or None where a choice needs truncating (lm-eval then
    cuts the context per choice, so the choices no longer share it) or has no tokens."""
    encoded = [encode_pair(tokenizer, context, x) for x in continuations]
    ctx = encoded[0][0]
    if any(c != ctx or not x or len(c) + len(x) - 1 > max_length for c, x in encoded):
        return None
    return PackedItem(ctx, [x for _, x in encoded])


def packing_plan(model: nn.Module, tokenizer, groups: list[tuple[str, list[str]]], max_length: int,
                 pack: bool | None = None) -> list[PackedItem | None]:
    """Per group, the packed sequence it is scored as, or None where it goes as one request per
    continuation: ``pack`` None decides by :func:`scaleot_fed.packing.worth_packing`, and the
    model must take a custom mask (:func:`scaleot_fed.packing.can_pack`)."""
    packed = [_packable(tokenizer, c, xs, max_length) for c, xs in groups]
    ready = [p for p in packed if p is not None]
    if pack is None:
        pack = bool(ready) and worth_packing(ready)
    if not (pack and ready and can_pack(model, max(p.length for p in ready))):
        return [None] * len(groups)
    return packed


@torch.no_grad()
def choice_loglikelihoods(model: nn.Module, tokenizer, groups: list[tuple[str, list[str]]], batch_size: int = 8,
                          max_length: int | None = None, progress: bool = False,
                          pack: bool | None = None, checkpoint: Checkpoint | None = None) -> list[list[float]]:
    """:func:`loglikelihoods` of ``(context, [continuation, ...])`` groups, one list per group.

    Where :func:`packing_plan` packs a group, its shared context is encoded once and its
    continuations ride on it (:mod:`scaleot_fed.packing`); ``batch_size`` then counts
    continuations, whole groups per batch. Results equal the per-request path up to float rounding.
    With a ``checkpoint``, finished batches are saved as they come and a stopped scoring resumes
    after them, bitwise equal to an unstopped one (:class:`scaleot_fed.score_state.ScoreLog`).
    """
    max_length = max_length or model_max_length(model)
    packed = packing_plan(model, tokenizer, groups, max_length, pack)
    # what shapes the batches and their scores: the token ids (not the texts: a tokenizer may
    # change under the same path), the batch size, the window and which groups are packed
    log = ScoreLog.open(checkpoint, model, lambda: [[encode_pair(tokenizer, c, x) for c, xs in groups for x in xs],
                                                    batch_size, max_length, [p is not None for p in packed]])
    scores: list[list[float]] = [[] for _ in groups]
    rest = [g for g, p in enumerate(packed) if p is None]
    if rest:  # one request per continuation
        pairs = [(groups[g][0], x) for g in rest for x in groups[g][1]]
        flat = iter(loglikelihoods(model, tokenizer, pairs, batch_size, max_length, progress, log))
        for g in rest:
            scores[g] = [next(flat) for _ in groups[g][1]]
    todo = sorted((g for g, p in enumerate(packed) if p is not None), key=lambda g: -packed[g].length)
    was_training = model.training
    model.eval()
    bar = _bar(sum(len(packed[g].choices) for g in todo), progress)
    start = 0
    while start < len(todo):  # longest first; whole groups, at most batch_size continuations (at least one)
        end, width = start + 1, len(packed[todo[start]].choices)
        while end < len(todo) and width + len(packed[todo[end]].choices) <= batch_size:
            width += len(packed[todo[end]].choices)
            end += 1
        batch = todo[start:end]
        flat = iter(log.batch(f"packed {start}", partial(_packed_batch, model, [packed[g] for g in batch],
                                                         _pad_id(tokenizer))))
        for g in batch:
            scores[g] = [next(flat) for _ in packed[g].choices]
        bar.update(width)
        start = end
    bar.close()
    model.train(was_training)
    return scores


def _packed_batch(model: nn.Module, batch: list[PackedItem], pad: int) -> list[float]:
    """:func:`scaleot_fed.packing.packed_scores` flattened (the log keeps a list of floats per batch)."""
    return [score for item in packed_scores(model, batch, pad) for score in item]


def accuracy_from_scores(items: list[MCItem], scores: list[list[float]]) -> dict[str, float]:
    """``acc`` and ``acc_norm`` from per-choice log-likelihoods (lm-eval's definitions)."""
    if not items:
        raise ConfigError("no items to evaluate")
    acc = acc_norm = 0
    for item, item_scores in zip(items, scores):
        acc += int(max(range(len(item_scores)), key=lambda j: item_scores[j]) == item.gold)
        normed = [s / len(c) for s, c in zip(item_scores, item.choices)]
        acc_norm += int(max(range(len(normed)), key=lambda j: normed[j]) == item.gold)
    n = len(items)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


def score_items(model: nn.Module, tokenizer, items: list[MCItem], batch_size: int = 8,
                max_length: int | None = None, progress: bool = False,
                checkpoint: Checkpoint | None = None) -> list[list[float]]:
    """Per item, the log-likelihood of every choice after its context (lm-eval's requests): what
    any multiple-choice metric is computed from (:func:`accuracy_from_scores`). ``checkpoint``:
    where a long scoring saves its finished batches, so that a stopped one resumes."""
    groups = [(item.context, [TARGET_DELIMITER + choice for choice in item.choices]) for item in items]
    return choice_loglikelihoods(model, tokenizer, groups, batch_size, max_length, progress, checkpoint=checkpoint)


def item_record(items: list[MCItem], scores: list[list[float]]) -> dict[str, list]:
    """What recomputes any metric of a scoring: per item its choices' log-likelihoods, the gold
    index and the choices' lengths in characters (``acc_norm``'s divisor)."""
    return {"loglik": [[round(float(s), 6) for s in item_scores] for item_scores in scores],
            "gold": [i.gold for i in items], "choice_chars": [[len(c) for c in i.choices] for i in items]}


def evaluate_multiple_choice(model: nn.Module, tokenizer, items: list[MCItem], batch_size: int = 8,
                             max_length: int | None = None, progress: bool = False,
                             checkpoint: Checkpoint | None = None) -> dict[str, float]:
    """Zero-shot ``acc``, ``acc_norm`` and ``n`` on ``items`` (``progress``: a bar over requests;
    ``checkpoint``: see :func:`score_items`)."""
    return accuracy_from_scores(items, score_items(model, tokenizer, items, batch_size, max_length, progress,
                                                   checkpoint))


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Token-weighted perplexity of ``(num_blocks, block_size)`` token blocks."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, len(token_ids), batch_size):
        x = token_ids[start : start + batch_size].to(next(model.parameters()).device)
        loss = lm_loss(model, x)
        n = x.shape[0] * (x.shape[1] - 1)
        total += float(loss) * n
        count += n
    model.train(was_training)
    return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count}
