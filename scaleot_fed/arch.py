"""Per-architecture model surgery: where the decoder blocks live and what to compress.

Each supported family is one :class:`Architecture` entry in ``ARCHITECTURES``, found by the HF
``config.model_type``. The rest of the package only talks to blocks through this module, so a new
family is one more entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    """How one model family is laid out.

    Attributes
    ----------
    name:
        Family name used in manifests (``llama``, ``gpt2``, ``opt``).
    model_types:
        HF ``config.model_type`` values that belong to the family.
    layers_path:
        Dotted path from the ``*ForCausalLM`` module to the ``nn.ModuleList`` of decoder blocks.
    attention_projections:
        Dotted paths, inside one block, of the attention projections that Selective Rank
        Compression factorises. MLPs are deliberately absent.
    mlp_output:
        Dotted path, inside one block, of the MLP's last projection (bottleneck adapters read
        its output).
    conv1d_projections:
        True when the projections are GPT-2 ``Conv1D`` (weight stored as ``(in, out)``).
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str
    attention_projections: tuple[str, ...]
    mlp_output: str
    conv1d_projections: bool = False


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "smollm", "smollm3"),
        layers_path="model.layers",
        attention_projections=(
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
        ),
        mlp_output="mlp.down_proj",
    ),
    Architecture(
        name="gpt2",
        model_types=("gpt2",),
        layers_path="transformer.h",
        attention_projections=("attn.c_attn", "attn.c_proj"),
        mlp_output="mlp.c_proj",
        conv1d_projections=True,
    ),
    Architecture(
        name="opt",
        model_types=("opt",),
        layers_path="model.decoder.layers",
        attention_projections=(
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
        ),
        mlp_output="fc2",
    ),
)


def supported_families() -> str:
    """One line naming the supported families and their ``model_type`` values."""
    return "; ".join(f"{a.name} ({', '.join(a.model_types)})" for a in ARCHITECTURES)


def architecture_by_name(name: str) -> Architecture:
    """Look up a family by its manifest name."""
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    raise ConfigError(f"unknown architecture family {name!r}; supported: {supported_families()}")


def architecture_of(model_or_config) -> Architecture:
    """The family of a model (or config), or a clear error naming the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            if arch.name == "gpt2" and getattr(config, "scale_attn_by_inverse_layer_idx", False):
                # The attention scale depends on the block's position, which surgery changes.
                raise ConfigError(
                    "GPT-2 models with scale_attn_by_inverse_layer_idx=True are not supported: "
                    "their attention scale depends on the block position"
                )
            return arch
    raise ConfigError(
        f"unsupported architecture model_type={model_type!r}; supported families: "
        f"{supported_families()}"
    )


def get_layers(model: nn.Module, arch: Architecture | None = None) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks."""
    arch = arch or architecture_of(model)
    return model.get_submodule(arch.layers_path)


def set_layers(model: nn.Module, blocks: list[nn.Module], layer_types: list[str] | None = None) -> None:
    """Replace the decoder block list and keep the config and cache indices consistent.

    Every attention module's ``layer_idx`` becomes its new position so that the KV cache (sized
    from ``num_hidden_layers``) has one slot per position; ``config.layer_types`` (used by some
    families to pick the attention mask per block) is trimmed to the same positions.

    Parameters
    ----------
    model:
        A ``*ForCausalLM`` of a supported family; modified in place.
    blocks:
        The new blocks, in order (decoder blocks or stand-ins such as harmonizers).
    layer_types:
        The ``config.layer_types`` entries of the new positions, when the config has that field.
    """
    arch = architecture_of(model)
    parent_path, _, attr = arch.layers_path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, nn.ModuleList(blocks))
    for position, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    model.config.num_hidden_layers = len(blocks)
    if getattr(model.config, "layer_types", None) is not None:
        if layer_types is None or len(layer_types) != len(blocks):
            raise ValueError("layer_types must list one entry per new block")
        model.config.layer_types = list(layer_types)


def block_index_of_key(arch: Architecture, key: str) -> int | None:
    """The block index a state-dict key belongs to, or None for non-block parameters."""
    prefix = arch.layers_path + "."
    if not key.startswith(prefix):
        return None
    head = key[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def projection_weight(module: nn.Module, arch: Architecture) -> torch.Tensor:
    """A projection's weight in ``nn.Linear`` convention ``(out_features, in_features)``."""
    weight = module.weight.detach()
    return weight.t() if arch.conv1d_projections else weight
