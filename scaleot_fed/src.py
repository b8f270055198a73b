"""Selective Rank Compression (SRC): truncated SVD of attention projections.

Only the attention projections of kept middle blocks are compressed; MLPs are left as they are
(ScaleOT's observation: attention tolerates rank reduction far better than the MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError


def rank_for_ratio(out_features: int, in_features: int, rank_keep_ratio: float) -> int:
    """Rank kept for a ``out x in`` matrix: ``round(ratio * min(out, in))``, at least 1."""
    if not 0.0 < rank_keep_ratio <= 1.0:  # as EmulatorConfig: 0 would silently mean rank 1
        raise ConfigError(f"rank_keep_ratio must be in (0, 1] (1 = no compression), got {rank_keep_ratio}")
    return max(1, round(rank_keep_ratio * min(out_features, in_features)))


def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of ``weight`` as ``(up, down)`` with ``up @ down``.

    Parameters
    ----------
    weight:
        ``(out, in)`` matrix.
    rank:
        Number of singular values kept.

    Returns
    -------
    up, down:
        ``(out, rank)`` and ``(rank, in)`` factors in ``weight``'s dtype; the singular values are
        split evenly (``sqrt(S)`` on each side) so both factors have similar scale.
    """
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ConfigError(f"rank must be in [1, {min(out_features, in_features)}], got {rank}")
    # float64 so a full-rank reconstruction is exact to float32 precision.
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root  # (out, rank)
    down = root[:, None] * vh[:rank]  # (rank, in)
    return up.to(weight.dtype).contiguous(), down.to(weight.dtype).contiguous()


def factors_save_memory(out_features: int, in_features: int, rank: int) -> bool:
    """True when two rank-k factors hold fewer numbers than the dense matrix."""
    return rank * (out_features + in_features) < out_features * in_features


class LowRankLinear(nn.Module):
    """A linear map of known rank, stored as two factors or, when smaller, as their product.

    Either way only rank-k information is held. Forward matches ``nn.Linear`` (or GPT-2's
    ``Conv1D``, which computes the same ``x W^T + b`` with a transposed weight).

    Parameters
    ----------
    in_features, out_features, rank:
        Shape of the map and its rank.
    bias:
        Whether the map has a bias.
    factored:
        Store ``up (out, rank)`` and ``down (rank, in)``; otherwise ``weight (out, in)``. Defaults
        to whichever is smaller.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        factored: bool | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.factored = factors_save_memory(out_features, in_features, rank) if factored is None else factored
        if self.factored:
            self.up = nn.Parameter(torch.empty(out_features, rank))
            self.down = nn.Parameter(torch.empty(rank, in_features))
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, rank: int
    ) -> LowRankLinear:
        """Compress an ``(out, in)`` weight (``nn.Linear`` convention) to ``rank``."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, rank, bias=bias is not None)
        up, down = low_rank_factors(weight, rank)
        with torch.no_grad():
            if module.factored:
                module.up.copy_(up)
                module.down.copy_(down)
            else:
                module.weight.copy_(up @ down)
            if bias is not None:
                module.bias.copy_(bias.detach())
        return module

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` matrix this module applies."""
        return self.up @ self.down if self.factored else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factored:
            # (..., in) -> (..., rank) -> (..., out): never materialise the dense matrix.
            y = nn.functional.linear(nn.functional.linear(x, self.down), self.up)
            return y if self.bias is None else y + self.bias
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"factored={self.factored}, bias={self.bias is not None}"
        )


class FusedLowRankLinear(nn.Module):
    """A fused q/k/v projection compressed group by group.

    SRC factorises q, k and v separately (as it does where they are separate projections: one
    SVD of the stacked matrix would let the groups share singular vectors and give each a
    different rank than its own). ``rows`` are the output rows of each group in the fused
    weight; outputs are computed per group and put back in the fused order.

    Parameters
    ----------
    in_features:
        Input width.
    rows:
        Output row indices of each group (together a permutation of ``0..out-1``).
    ranks, factored:
        Per group, as :class:`LowRankLinear`.
    bias:
        Whether the fused map has a bias (kept whole).
    """

    def __init__(self, in_features: int, rows: list[torch.Tensor], ranks: list[int], bias: bool = True,
                 factored: list[bool | None] | None = None) -> None:
        super().__init__()
        factored = factored or [None] * len(rows)
        self.in_features = in_features
        self.out_features = sum(len(r) for r in rows)
        self.parts = nn.ModuleList(LowRankLinear(in_features, len(r), k, bias=False, factored=f)
                                   for r, k, f in zip(rows, ranks, factored))
        order = torch.cat([r.cpu() for r in rows])  # fused row of each concatenated output
        self.contiguous = order.tolist() == list(range(self.out_features))
        device = next(self.parts.parameters()).device  # `meta` when built as a skeleton
        self.register_buffer("inverse", torch.argsort(order).to(device), persistent=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, rows: list[torch.Tensor],
                    ratio: float) -> FusedLowRankLinear:
        """Compress each group of an ``(out, in)`` fused weight to ``ratio`` of its own rank."""
        ranks = [rank_for_ratio(len(r), weight.shape[1], ratio) for r in rows]
        module = cls(weight.shape[1], rows, ranks, bias=bias is not None)
        with torch.no_grad():
            for part, r, k in zip(module.parts, rows, ranks):
                part.load_state_dict(LowRankLinear.from_weight(weight[r], None, k).state_dict())
            if bias is not None:
                module.bias.copy_(bias.detach())
        return module

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` matrix this module applies, in the fused row order."""
        return torch.cat([p.dense_weight() for p in self.parts])[self.inverse]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([part(x) for part in self.parts], dim=-1)  # (..., out) in group order
        if not self.contiguous:
            y = y.index_select(-1, self.inverse)  # back to the fused order (GPT-NeoX: per head)
        return y if self.bias is None else y + self.bias


@dataclass(frozen=True)
class CompressionRecord:
    """What SRC did to one projection."""

    block: int
    projection: str
    shape: tuple[int, int]
    rank: int
    factored: bool
    relative_error: float
    groups: tuple[dict, ...] = ()
    """Fused q/k/v projections: ``{"rank", "factored"}`` of q, k and v (empty otherwise)."""


def relative_frobenius_error(original: torch.Tensor, approx: torch.Tensor) -> float:
    """``||W - W_k||_F / ||W||_F``."""
    original = original.detach().double()
    return float(torch.linalg.norm(original - approx.detach().double()) / torch.linalg.norm(original))
