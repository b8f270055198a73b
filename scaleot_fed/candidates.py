"""Candidate networks of stage 1: which middle blocks a candidate replaces, the candidate run
in place of the full model, and what the candidates' held-out losses say about each block (the
regression ranking) and about the chosen set (the reported held-out loss). ``config`` is a
:class:`~scaleot_fed.layer_replace.LayerReplaceConfig`."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .arch import get_layers
from .errors import ConfigError
from .heads import lm_loss


def sample_candidate(
    scores: torch.Tensor, alpha: float, generator: torch.Generator, selection: str = "global", group_size: int = 4,
) -> torch.Tensor:
    """Draw one candidate: a boolean keep-mask over the middle blocks.

    Parameters
    ----------
    scores:
        ``(n_middle,)`` importance scores ``s_i``; ``u_i ~ U(0, sigmoid(s_i))``.
    alpha:
        Share of the blocks to replace (the lowest draws).
    selection:
        ``global``: ``round(alpha * n_middle)`` lowest draws overall; ``group``: in each run of
        ``group_size`` consecutive blocks, ``alpha * size`` lowest draws, rounded at random.
    """
    p = torch.sigmoid(scores)
    u = torch.rand(scores.shape, generator=generator) * p  # u_i ~ U(0, p_i)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if selection == "global":
        keep[torch.argsort(u)[: int(round(alpha * len(scores)))]] = False
        return keep
    for start in range(0, len(scores), group_size):
        group = u[start : start + group_size]
        share = alpha * len(group)
        n = int(share) + int(float(torch.rand((), generator=generator)) < share - int(share))  # random rounding
        keep[start + torch.argsort(group)[:n]] = False
    return keep


@contextlib.contextmanager
def swapped_blocks(model: nn.Module, replacements: dict[int, nn.Module]):
    """Temporarily put ``replacements[i]`` at block position ``i`` (no re-numbering needed:
    positions are unchanged and stand-ins use no KV cache)."""
    layers = get_layers(model)
    originals = {i: layers[i] for i in replacements}
    try:
        for i, module in replacements.items():
            layers[i] = module
        yield model
    finally:
        for i, module in originals.items():
            layers[i] = module


class _Identity(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def ranking_generator(config) -> torch.Generator:
    """The ranking fit's own draws, seeded by the config's seed (offset from the RL's stream), so a
    rerank of a saved artifact (:mod:`scaleot_fed.rerank`) draws what a fresh run draws."""
    return torch.Generator().manual_seed(config.seed + 7919)


@torch.no_grad()
def regression_scores(model: nn.Module, reward_ids: torch.Tensor, harmonizers: dict[int, nn.Module],
                      middle: list[int], config, generator: torch.Generator,
                      progress: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Each middle block's score: the held-out loss its replacement by its harmonizer adds.

    ``ranking_candidates`` candidates each replace a uniformly drawn ``alpha`` share of the
    blocks and are scored on the same reward batches (so they differ only in what they replace);
    the candidates' losses are fitted by least squares as a sum of one term per replaced block.
    Every candidate replaces the same number of blocks, so the terms are known up to a common
    shift: they are returned centred (``(n_middle,)``, mean 0), with the fit's R^2.
    """
    from tqdm.auto import tqdm

    n = len(middle)
    k = int(round(config.alpha * n))
    if config.ranking_candidates <= n:
        raise ConfigError(f"ranking_candidates ({config.ranking_candidates}) must exceed the {n} middle blocks for "
                          f"the ranking fit to be determined; use at least {2 * n}")
    rows = min(len(reward_ids), config.ranking_batches * config.batch_size)
    batches = [reward_ids[i : i + config.batch_size] for i in range(0, rows, config.batch_size)]
    design = torch.zeros(config.ranking_candidates, n, dtype=torch.float64)  # (candidates, n_middle)
    losses = torch.zeros(config.ranking_candidates, dtype=torch.float64)  # (candidates,)
    for c in tqdm(range(config.ranking_candidates), desc="ranking fit", disable=not progress):
        replaced = torch.randperm(n, generator=generator)[:k]
        design[c, replaced] = 1.0
        with swapped_blocks(model, {middle[j]: harmonizers[middle[j]] for j in replaced.tolist()}):
            losses[c] = sum(float(lm_loss(model, b)) for b in batches) / len(batches)
    coef = torch.linalg.lstsq(design, losses.unsqueeze(1)).solution.squeeze(1)  # (n_middle,)
    residual = losses - design @ coef
    total = ((losses - losses.mean()) ** 2).sum()
    r2 = float(1 - (residual**2).sum() / total) if total > 0 else 1.0
    fit = {"candidates": config.ranking_candidates, "batches": len(batches), "replaced_per_candidate": k, "r2": r2,
           "tokens": config.ranking_candidates * sum(b.numel() for b in batches)}
    return (coef - coef.mean()).float(), fit


@torch.no_grad()
def heldout_losses(model: nn.Module, report_ids: torch.Tensor, harmonizers: dict[int, nn.Module], scores: torch.Tensor,
                   middle: list[int], config, progress: bool = False) -> dict:
    """Held-out LM loss on the report texts: the full model, and the ``alpha`` share of the middle
    with the lowest scores replaced by harmonizers / dropped."""
    from tqdm.auto import tqdm

    n = min(len(report_ids), config.eval_batches * config.batch_size)
    ids = report_ids[:n]
    # ties broken by block index, as the emulator's layout breaks them
    order = sorted(range(len(middle)), key=lambda j: (float(scores[j]), middle[j]))
    replaced = sorted(middle[j] for j in order[: int(round(config.alpha * len(middle)))])
    bar = tqdm(total=3 * len(range(0, n, config.batch_size)), desc="held-out evaluation", disable=not progress)

    def mean_loss(replacements) -> float:
        losses = []
        with swapped_blocks(model, replacements):
            for i in range(0, n, config.batch_size):
                losses.append(float(lm_loss(model, ids[i : i + config.batch_size])))
                bar.update()
        return sum(losses) / len(losses)

    result = {
        "heldout_loss_full": mean_loss({}),
        "heldout_loss_harmonized": mean_loss({i: harmonizers[i] for i in replaced}),
        "heldout_loss_dropped": mean_loss({i: _Identity() for i in replaced}),
        "heldout_tokens": int(ids.numel()),
        "replaced": replaced,
    }
    bar.close()
    return result
