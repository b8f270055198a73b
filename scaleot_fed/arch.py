"""Model surgery for any decoder family, read off the model's own structure.

ScaleOT needs four facts about a ``*ForCausalLM``, and each is found, not listed:

* the decoder blocks: the ``nn.ModuleList`` with one entry per ``config.num_hidden_layers``;
* the attention projections SRC compresses: the linear maps (``nn.Linear`` or GPT-2's
  ``Conv1D``) inside the block's child named like ``attn`` / ``attention``;
* the MLP's last projection (bottleneck adapters read its output): the last linear map of the
  block's ``mlp`` child, or of the block itself outside attention (OPT's ``fc2``);
* fused q/k/v projections (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``, GPT-NeoX ``query_key_value``):
  a projection whose output has ``q + 2 kv`` rows; ``QKV_LAYOUTS`` says how each family orders
  them.

Discovery runs on a weightless skeleton built from the config (``meta`` device), so a model that
already carries LoRA or bottleneck adapters is read as its family, not as what was added. A new
family needs no entry unless it fuses q/k/v. Per-layer config lists (``layer_types``,
``no_rope_layers``, ...) follow the blocks when blocks are removed (:func:`set_layers`). Families are
tested end to end in ``tests/test_families.py`` (``TESTED_FAMILIES``); anything else that has the
four facts is accepted too, and a model that lacks one gets one line naming what was not found.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "opt",
                   "gpt_neox")
"""``model_type`` values that go through build -> finetune -> plug-in -> evaluate in the tests."""

QKV_LAYOUTS = {"gpt2": "stacked", "phi3": "stacked", "gpt_neox": "per-head", "bloom": "per-head"}
"""How a family's fused q/k/v rows are laid out: ``stacked`` (all q, then k, then v) or
``per-head`` (``(head, q|k|v, head_dim)``). A fused projection of a family not listed here is
refused: its groups cannot be told apart by shape."""

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
FUSED_NAMES = ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "W_pack")
"""Names of fused q/k/v projections: one that is not recognised by its shape is refused."""
MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class Architecture:
    """How one model's blocks are laid out (found by :func:`architecture_of`).

    Attributes
    ----------
    name:
        The config's ``model_type`` (recorded in manifests).
    layers_path:
        Dotted path from the ``*ForCausalLM`` module to the ``nn.ModuleList`` of decoder blocks.
    attention_projections:
        Dotted paths, inside one block, of the attention projections that Selective Rank
        Compression factorises. MLPs are deliberately absent.
    mlp_output:
        Dotted path, inside one block, of the MLP's last projection.
    conv1d_projections:
        True when the projections are GPT-2 ``Conv1D`` (weight stored as ``(in, out)``).
    fused_qkv:
        The projections among ``attention_projections`` that hold q, k and v stacked.
    qkv_sizes:
        Rows of q, k and v in a fused projection: ``(heads x head_dim, kv_heads x head_dim, ...)``.
    per_head_qkv:
        Fused rows are interleaved head by head (GPT-NeoX, Bloom) rather than q, then k, then v.
    head_dim:
        Width of one attention head.
    """

    name: str
    layers_path: str
    attention_projections: tuple[str, ...]
    mlp_output: str
    conv1d_projections: bool = False
    fused_qkv: tuple[str, ...] = ()
    qkv_sizes: tuple[int, int, int] = (0, 0, 0)
    per_head_qkv: bool = False
    head_dim: int = 0

    def qkv_rows(self) -> list[torch.Tensor]:
        """Row indices of q, k and v in a fused projection's ``(out, in)`` weight."""
        q, k, v = self.qkv_sizes
        if not self.per_head_qkv:
            return [torch.arange(a, b, device="cpu") for a, b in ((0, q), (q, q + k), (q + k, q + k + v))]
        d = self.head_dim  # (head, 3, head_dim): q of head h at rows h*3d .. h*3d+d-1, then k, then v
        base = torch.arange(q // d, device="cpu")[:, None] * 3 * d + torch.arange(d, device="cpu")[None, :]
        return [(base + g * d).reshape(-1) for g in range(3)]  # each (heads * d,)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _out_in(module: nn.Module) -> tuple[int, int]:
    weight = module.weight
    return (weight.shape[1], weight.shape[0]) if type(module).__name__ == "Conv1D" else tuple(weight.shape)


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _layers_path(model: nn.Module, depth: int) -> str | None:
    found = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == depth and name]
    return min(found, key=lambda n: n.count(".")) if found else None


def _child(block: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((name for name, _ in block.named_children() if name in names), None)


def _linears(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}.{n}" if prefix else n, m) for n, m in module.named_modules() if n and _is_linear(m)]


def _discover(model: nn.Module) -> Architecture:
    config = model.config
    supported = f"tested families: {', '.join(TESTED_FAMILIES)}"
    kind = getattr(config, "model_type", "?")
    depth = getattr(config, "num_hidden_layers", None)
    path = _layers_path(model, depth) if isinstance(depth, int) and depth > 0 else None
    if path is None:
        raise ConfigError(f"unsupported model {kind!r}: no list of {depth} decoder blocks was found "
                          f"(is it a decoder-only *ForCausalLM?); {supported}")
    block = model.get_submodule(path)[0]
    attention = _child(block, ATTENTION_NAMES)
    projections = _linears(block.get_submodule(attention), attention) if attention else []
    if not projections:
        raise ConfigError(f"unsupported model {kind!r}: its blocks have no attention module with linear "
                          f"projections (a child named {' / '.join(ATTENTION_NAMES)}); {supported}")
    flags = [m.is_causal for m in block.get_submodule(attention).modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if flags and not all(flags):
        raise ConfigError(f"unsupported model {kind!r}: its attention is not causal (an encoder); {supported}")
    if any("expert" in name for name, _ in block.named_modules()):
        raise ConfigError(f"unsupported model {kind!r}: mixture-of-experts blocks are not supported; {supported}")
    mlp = _child(block, MLP_NAMES)
    rest = _linears(block.get_submodule(mlp), mlp) if mlp else [
        (n, m) for n, m in _linears(block, "") if not n.startswith(attention + ".")]
    rest = [(n, m) for n, m in rest if _out_in(m)[0] == config.hidden_size]  # the one back to the stream
    if not rest:
        raise ConfigError(f"unsupported model {kind!r}: its blocks have no MLP projection back to the hidden size; "
                          f"{supported}")
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads) * head_dim  # GQA: fewer k/v heads
    fused, sizes = (), (0, 0, 0)
    for candidate in ((heads * head_dim, kv, kv), (heads * head_dim,) * 3):  # a stray kv-heads key: MHA
        fused = tuple(n for n, m in projections if _out_in(m) == (sum(candidate), config.hidden_size))
        if fused:
            sizes = candidate
            break
    unknown = [n for n, m in projections if n.rsplit(".", 1)[-1] in FUSED_NAMES and n not in fused]
    if unknown:  # e.g. multi-query fused projections (Falcon, GPT-BigCode): groups of other sizes
        raise ConfigError(f"unsupported model {kind!r}: {unknown[0]} fuses q, k and v in a shape not known here; "
                          f"{supported}")
    if fused and kind not in QKV_LAYOUTS:
        raise ConfigError(f"unsupported model {kind!r}: {fused[0]} fuses q, k and v in a row order not known here "
                          f"(known: {', '.join(QKV_LAYOUTS)}); {supported}")
    return Architecture(
        name=kind,
        layers_path=path,
        attention_projections=tuple(n for n, _ in projections),
        mlp_output=rest[-1][0],
        conv1d_projections=any(type(m).__name__ == "Conv1D" for _, m in projections),
        fused_qkv=fused,
        qkv_sizes=sizes,
        per_head_qkv=QKV_LAYOUTS.get(kind) == "per-head",
        head_dim=head_dim,
    )


def _check_supported(config) -> None:
    if getattr(config, "model_type", None) == "gpt2" and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        # The attention scale depends on the block's position, which surgery changes.
        raise ConfigError("GPT-2 models with scale_attn_by_inverse_layer_idx=True are not supported: "
                          "their attention scale depends on the block position")
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"unsupported model {config.model_type!r}: encoder-decoder models have no single block "
                          f"stack to compress; tested families: {', '.join(TESTED_FAMILIES)}")


_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BY_CONFIG: dict[str, Architecture] = {}


def architecture_of(model_or_config) -> Architecture:
    """The layout of a model or a config, read off a weightless skeleton of its config (``meta``
    device; what was added to a model, LoRA or adapters, does not change the answer); a clear
    one-line error when a piece is not found."""
    if isinstance(model_or_config, nn.Module):
        model = _causal_lm(model_or_config)
        if model not in _BY_MODEL:
            _BY_MODEL[model] = architecture_of(model.config)
        return _BY_MODEL[model]
    config = model_or_config
    _check_supported(config)
    key = config.to_json_string()
    if key not in _BY_CONFIG:
        from transformers import AutoModelForCausalLM

        try:
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(config))
        except Exception as exc:  # noqa: BLE001 - no class, remote code only, an init that fails on meta
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"unsupported model {getattr(config, 'model_type', '?')!r}: its causal LM could not be "
                              f"built from the config ({first}); tested families: {', '.join(TESTED_FAMILIES)}") from exc
        _BY_CONFIG[key] = _discover(skeleton)
    return _BY_CONFIG[key]


def get_layers(model: nn.Module, arch: Architecture | None = None) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks."""
    arch = arch or architecture_of(model)
    return _causal_lm(model).get_submodule(arch.layers_path)


def set_layers(model: nn.Module, blocks: list[nn.Module], sources: list[int] | None = None) -> None:
    """Replace the decoder block list and keep the config and cache indices consistent.

    Every attention module's ``layer_idx`` becomes its new position so that the KV cache (sized
    from ``num_hidden_layers``) has one slot per position, and every per-layer config list (a
    list with one entry per block: ``layer_types`` for sliding / full attention, SmolLM3's
    ``no_rope_layers``, ...) keeps the entries of the blocks that stay.

    Parameters
    ----------
    model:
        A ``*ForCausalLM``; modified in place.
    blocks:
        The new blocks, in order (decoder blocks or stand-ins such as harmonizers).
    sources:
        The old position of each new block (default: the first ``len(blocks)``, as when a saved
        emulator is rebuilt from its own config).
    """
    model = _causal_lm(model)
    arch = architecture_of(model)
    config = model.config
    old = int(config.num_hidden_layers)
    sources = list(range(len(blocks))) if sources is None else list(sources)
    if len(sources) != len(blocks) or any(not 0 <= i < old for i in sources):
        raise ValueError(f"sources must give each of the {len(blocks)} new blocks an old position below {old}")
    parent_path, _, attr = arch.layers_path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, nn.ModuleList(blocks))
    for position, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    for key, value in list(vars(config).items()):
        if (isinstance(value, (list, tuple)) and len(value) == old and key != "architectures"
                and not key.endswith(("_id", "_ids"))):  # eos_token_id lists are not per layer
            setattr(config, key, type(value)(value[i] for i in sources))
    config.num_hidden_layers = len(blocks)


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
