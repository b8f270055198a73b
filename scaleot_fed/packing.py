"""Multiple-choice scoring with each shared context encoded once.

lm-eval scores a k-choice item as k requests ``context + choice_j``, so the context is encoded k
times. Here one item is one sequence::

    context | choice_1[:-1] | choice_2[:-1] | ... | choice_k[:-1]

with a block attention mask (every token sees the context causally, a choice's tokens also see
the earlier tokens of their own choice, never another choice's) and position ids that restart
after the context for each choice, so each choice is computed exactly as in its own request. The
first token of every choice is predicted from the context's last position, which they share.

It pays where contexts are long next to the choices (HellaSwag: 1.6x items/s measured on
SmolLM2-135M) and costs where they are short (PIQA: 0.83x; a custom mask takes SDPA's slower
path), so :func:`worth_packing` decides from the token counts. Only models whose attention takes
a custom 4D mask as given (transformers' eager and SDPA implementations) are packed, and never
past a sliding window, which a custom mask would bypass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .heads import target_logprobs

PACKING_GAIN = 0.7
"""Pack only when the packed tokens are at most this fraction of the per-request tokens: on
SmolLM2-135M (CPU) a masked packed token costs about 1.4x an unpacked one."""


@dataclass(frozen=True)
class PackedItem:
    """One item's context and the target tokens of each of its choices (already truncation-free)."""

    context: list[int]
    choices: list[list[int]]

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.choices)

    @property
    def unpacked_length(self) -> int:
        return sum(len(self.context) + len(c) - 1 for c in self.choices)


def can_pack(model: nn.Module, longest: int) -> bool:
    """Whether ``model`` scores a packed sequence of ``longest`` tokens exactly like its requests."""
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return False  # flash / flex attention build their own masks
    window = getattr(config, "sliding_window", None)
    return not (isinstance(window, int) and window < longest)


def worth_packing(items: list[PackedItem]) -> bool:
    """Whether packing ``items`` saves enough tokens to beat one request per choice."""
    return sum(i.length for i in items) <= PACKING_GAIN * sum(i.unpacked_length for i in items)


def _layout(item: PackedItem) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """Token ids, position ids, segment ids (0 = context, j = choice j) and, per choice, the
    positions whose hidden states predict its tokens."""
    n_ctx = len(item.context)
    ids, positions, segments = list(item.context), list(range(n_ctx)), [0] * n_ctx
    predictors = []
    for j, choice in enumerate(item.choices, start=1):
        start = len(ids)
        ids += choice[:-1]
        positions += range(n_ctx, n_ctx + len(choice) - 1)
        segments += [j] * (len(choice) - 1)
        predictors.append([n_ctx - 1, *range(start, start + len(choice) - 1)])
    return ids, positions, segments, predictors


def _block_mask(segments: list[int], width: int) -> torch.Tensor:
    """``(width, width)`` boolean: query i sees key k if k <= i and k is context or i's own
    choice. Padding rows see only themselves (a row that sees nothing gives NaN in SDPA)."""
    n = len(segments)
    seg = torch.tensor(segments)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = torch.eye(width, dtype=torch.bool)
    mask[:n, :n] = causal & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
    return mask


def _attention_mask(model: nn.Module, masks: list[torch.Tensor]) -> torch.Tensor:
    """``(batch, 1, width, width)``: boolean for SDPA, additive for eager attention."""
    mask = torch.stack(masks)[:, None]
    if model.config._attn_implementation == "sdpa":
        return mask
    dtype = next(model.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)


@torch.no_grad()
def packed_scores(model: nn.Module, batch: list[PackedItem], pad: int) -> list[list[float]]:
    """Log-likelihood of every choice of every item in ``batch``, one forward for all of them."""
    device = next(model.parameters()).device
    width = max(item.length for item in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    masks, rows, cols, targets, owner = [], [], [], [], []
    n_choices = 0
    for b, item in enumerate(batch):
        seq, pos, seg, predictors = _layout(item)
        ids[b, : len(seq)] = torch.tensor(seq)
        positions[b, : len(pos)] = torch.tensor(pos)
        masks.append(_block_mask(seg, width))
        for where, choice in zip(predictors, item.choices):
            rows += [b] * len(choice)
            cols += where
            targets += choice
            owner += [n_choices] * len(choice)
            n_choices += 1
    where = torch.tensor([rows, cols], device=device)  # (2, n_scored)
    logprobs = target_logprobs(model, ids.to(device), _attention_mask(model, masks).to(device),
                               where, torch.tensor(targets, device=device), position_ids=positions.to(device))
    sums = torch.zeros(n_choices, device=device).index_add_(0, torch.tensor(owner, device=device), logprobs)
    flat, out = sums.tolist(), []
    for item in batch:
        out.append(flat[: len(item.choices)])
        flat = flat[len(item.choices):]
    return out
