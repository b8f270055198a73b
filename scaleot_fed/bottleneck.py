"""Bottleneck adapters (Houlsby/Pfeiffer style) on the MLP output of chosen blocks.

peft has no bottleneck adapter and AdapterHub's package pins an older transformers, so this is
our own small module. The adapted projection keeps its class's state-dict keys (``...weight``,
``...bias``) and gains ``...bottleneck.{down,up}.*``, so base weights stay addressable by their
usual names and a model with adapters still loads plain checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .arch import architecture_of, get_layers
from .errors import ConfigError, IntegrityError

BOTTLENECK_FILE = "bottleneck_adapters.json"


class BottleneckAdapter(nn.Module):
    """``y + W_up · gelu(W_down · y)`` with ``W_up`` zero-initialised (starts as the identity)."""

    def __init__(self, features: int, size: int) -> None:
        super().__init__()
        self.down = nn.Linear(features, size)
        self.up = nn.Linear(size, features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(nn.functional.gelu(self.down(y)))


class _AdaptedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(super().forward(x))


class _AdaptedConv1D(Conv1D):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(super().forward(x))


_ADAPTED = {nn.Linear: _AdaptedLinear, Conv1D: _AdaptedConv1D}


def add_bottleneck_adapters(model: nn.Module, positions: list[int], size: int) -> list[str]:
    """Put a bottleneck adapter after the MLP output of each block in ``positions`` (in place).

    Returns
    -------
    list of str
        State-dict prefixes of the new adapters.
    """
    if size < 1:
        raise ConfigError(f"adapter size must be >= 1, got {size}")
    arch = architecture_of(model)
    layers = get_layers(model, arch)
    prefixes = []
    for p in positions:
        target = layers[p].get_submodule(arch.mlp_output)
        if hasattr(target, "bottleneck"):
            continue
        adapted = _ADAPTED.get(type(target))
        if adapted is None:
            raise TypeError(f"cannot adapt {type(target).__name__} at block {p}")
        features = target.nf if isinstance(target, Conv1D) else target.out_features
        target.__class__ = adapted
        target.add_module("bottleneck", BottleneckAdapter(features, size).to(next(target.parameters()).dtype))
        prefixes.append(f"{arch.layers_path}.{p}.{arch.mlp_output}.bottleneck.")
    return prefixes


def bottleneck_blocks(state: dict[str, torch.Tensor], layers_path: str) -> dict[int, int]:
    """Block index -> adapter size for the bottleneck tensors found in ``state``."""
    found = {}
    for key, tensor in state.items():
        if ".bottleneck.down.weight" in key and key.startswith(layers_path + "."):
            found[int(key[len(layers_path) + 1 :].split(".", 1)[0])] = int(tensor.shape[0])
    return found


def save_bottleneck_info(model_dir: str | Path, blocks: dict[int, int]) -> None:
    """Record, beside a saved model, which blocks carry adapters (``from_pretrained`` drops them)."""
    Path(model_dir, BOTTLENECK_FILE).write_text(json.dumps({"blocks": {str(k): v for k, v in blocks.items()}}))


def restore_bottleneck_adapters(model: nn.Module, model_dir: str | Path) -> bool:
    """Re-insert and load the adapters of a model saved with them; False when it has none."""
    info = Path(model_dir, BOTTLENECK_FILE)
    if not info.is_file():
        return False
    from safetensors.torch import load_file

    blocks = {int(k): v for k, v in json.loads(info.read_text())["blocks"].items()}
    for block, size in blocks.items():
        add_bottleneck_adapters(model, [block], size)
    state = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        state.update({k: v for k, v in load_file(str(file)).items() if ".bottleneck." in k})
    missing = [k for k in model.state_dict() if ".bottleneck." in k and k not in state]
    if missing:
        raise IntegrityError(f"adapter weights missing from {model_dir}: {missing[:3]}")
    model.load_state_dict(state, strict=False)
    return True
