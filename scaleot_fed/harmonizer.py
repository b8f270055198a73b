"""The harmonizer: a tiny residual MLP standing in for a replaced decoder block."""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError


class Harmonizer(nn.Module):
    """``x + W_up · gelu(W_down · x)``: a drop-in replacement for one decoder block.

    ``W_up`` starts at zero, so a fresh harmonizer is the identity, i.e. exactly a layer drop;
    training then recovers part of what the replaced block did.

    It accepts (and ignores) every argument a decoder block is called with and returns a tensor of
    the input's shape, which is what decoder blocks return in transformers 5.

    Parameters
    ----------
    hidden_size:
        Width of the residual stream.
    rank:
        Bottleneck width.
    """

    def __init__(self, hidden_size: int, rank: int = 64) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"harmonizer rank must be >= 1, got {rank}")
        self.hidden_size = hidden_size
        self.rank = rank
        self.down = nn.Linear(hidden_size, rank)
        self.up = nn.Linear(rank, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # under a device map the block before may sit on another device (a no-op otherwise)
        hidden_states = hidden_states.to(self.down.weight.device)
        return hidden_states + self.up(nn.functional.gelu(self.down(hidden_states)))

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, rank={self.rank}"
