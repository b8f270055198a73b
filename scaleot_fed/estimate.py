"""What a federation will cost, from the model's config alone (no weights are read).

The full model and its emulator are built as weightless skeletons on PyTorch's ``meta``
device, with the emulator's exact structure (adapter blocks, kept blocks, SRC factors,
harmonizers); the trainable state comes from the same ``make_trainable`` a data owner runs,
and the activations autograd keeps are counted by running one training step of the requested
batch shape on the skeleton (``saved_tensors_hooks``: shapes, no arithmetic).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .arch import architecture_of, get_layers, set_layers
from .devices import resolve_dtype
from .emulator import EmulatorConfig
from .emulator.build import plan_layout
from .emulator.crash import shared_copy
from .errors import ConfigError
from .finetune import FinetuneConfig, make_trainable
from .harmonizer import Harmonizer
from .layer_replace import middle_layers
from .src import FusedLowRankLinear, LowRankLinear, rank_for_ratio

PROCESS_BASELINE = {"cpu": 0.55e9, "cuda": 0.5e9}
"""Bytes a client process holds before any model. CPU: 0.39 GB measured with torch,
transformers and peft imported (benchmarks/finetune_cost.py), plus an allowance for the Flower
and Ray a client actor also imports; GPU: the CUDA context and allocator reserve."""


@dataclass
class Estimate:
    """Sizes in parameters and bytes (see :func:`estimate`)."""

    full_params: int
    emulator_params: int
    trainable_params: int
    frozen_params: int
    """Weights that do not train while an owner trains (the emulator's, less what ``full`` or
    ``bitfit`` opens; LoRA and adapters add trained weights instead)."""
    dtype_bytes: int
    """Bytes per frozen weight while training (``[finetune] dtype``)."""
    activation_bytes: int
    batch_size: int
    seq_len: int
    transient_bytes: int = 0
    """Temporaries at the step's peak beside what autograd keeps: the head's ``(answer rows,
    vocab)`` float32 logits and, in the backward pass, their gradient (two such tensors)."""
    checkpoint_bytes: int = 4
    """Bytes per weight of the full model as stored (and loaded)."""
    shipped_bytes: int = 4
    """Bytes per weight of the emulator as stored and sent (``[[emulator]] dtype``)."""

    @property
    def emulator_bytes(self) -> int:
        return self.emulator_params * self.shipped_bytes

    @property
    def full_bytes(self) -> int:
        return self.full_params * self.checkpoint_bytes

    def client_bytes(self, device: str = "cpu") -> dict[str, int]:
        """One data owner's training memory: frozen emulator, trained weights, their gradients
        and AdamW state (float32), saved activations, the head's temporaries, process baseline."""
        frozen = self.frozen_params * self.dtype_bytes
        parts = {"weights": frozen + 4 * self.trainable_params, "gradients": 4 * self.trainable_params,
                 "optimizer": 8 * self.trainable_params, "activations": self.activation_bytes,
                 "transient": self.transient_bytes, "baseline": int(PROCESS_BASELINE[device])}
        return parts | {"total": sum(parts.values())}

    @property
    def round_bytes(self) -> dict[str, int]:
        """Per client per round: the trained state down (server -> owner) and up, float32."""
        return {"down": 4 * self.trainable_params, "up": 4 * self.trainable_params}


def _meta_model(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)


def _meta_emulator(full: nn.Module, config: EmulatorConfig, harmonizer_rank: int) -> tuple[nn.Module, list[dict]]:
    """The emulator's structure on the meta device (what :func:`build_emulator` would make) and
    its layout."""
    arch = architecture_of(full)
    blocks = get_layers(full, arch)
    middle = middle_layers(len(blocks), config.num_adapter_layers)
    layout = plan_layout(len(blocks), config, config.emulator_strategy.sizing_inputs(middle, config.alpha))
    model = copy.deepcopy(full)
    source = get_layers(model, arch)
    new = []
    with torch.device("meta"):
        for entry in layout:
            if entry["kind"] == "harmonizer":
                new.append(Harmonizer(int(full.config.hidden_size), harmonizer_rank))
                continue
            if entry["kind"] == "shared":  # the first kept block comes first: copy it as built
                new.append(shared_copy(new[[e["source"] for e in layout].index(entry["of"])]))
                continue
            block = source[entry["source"]]
            if entry["kind"] == "compressed":
                for path in arch.attention_projections:
                    parent_path, _, attr = path.rpartition(".")
                    parent = block.get_submodule(parent_path)
                    old = getattr(parent, attr)
                    bias = getattr(old, "bias", None) is not None
                    out_f, in_f = (old.weight.shape[1], old.weight.shape[0]) if arch.conv1d_projections else old.weight.shape
                    if path in arch.fused_qkv:
                        rows = arch.qkv_rows()
                        low = FusedLowRankLinear(in_f, rows, [rank_for_ratio(len(r), in_f, config.rank_keep_ratio)
                                                              for r in rows], bias=bias)
                    else:
                        low = LowRankLinear(in_f, out_f, rank_for_ratio(out_f, in_f, config.rank_keep_ratio), bias=bias)
                    setattr(parent, attr, low)
            new.append(block)
    set_layers(model, new, [e.get("of", e["source"]) for e in layout])
    return model, layout


class _FusedAttention(torch.autograd.Function):
    """Shapes only: what a fused attention kernel (SDPA's flash / memory-efficient path) keeps
    for its backward: q, k and v (k, v widened to q's heads), the output, the log-sum-exp per
    row and the mask; never the ``(len, len)`` probabilities that the math path on ``meta``
    would count."""

    @staticmethod
    def forward(ctx, query, key, value, mask):  # (batch, heads, len, head_dim); mask may be None
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1])  # (batch, heads, len)
        saved = (query, key, value, out, lse) + (() if mask is None else (mask.to(query.dtype),))
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the estimate never runs a backward
        raise NotImplementedError


def _counting_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """An attention implementation (transformers' interface) for shape-only runs."""
    repeat = query.shape[1] // key.shape[1]  # grouped-query attention: k, v widened as SDPA gets them
    key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    out = _FusedAttention.apply(query, key, value, attention_mask)
    return out.transpose(1, 2).contiguous(), None  # (batch, len, heads, head_dim)


def _saved_bytes(model: nn.Module, batch_size: int, seq_len: int, answer_fraction: float) -> int:
    """Bytes autograd keeps for one training step of ``(batch_size, seq_len)`` tokens with the
    head on the last ``answer_fraction`` of the positions (each saved tensor once, weights not)."""
    seen: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, nn.Parameter) and not isinstance(tensor._base, nn.Parameter):
            seen.setdefault(id(tensor), tensor)  # held in `seen`: an id is never reused meanwhile
        return tensor

    from transformers import AttentionInterface

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    AttentionInterface.register("scaleot_fed_count", _counting_attention)
    lm.config._attn_implementation = "scaleot_fed_count"
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    answers = max(1, math.ceil(seq_len * answer_fraction))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # a ready 4D causal mask: transformers would otherwise inspect a 2D one's values
        mask = torch.ones(batch_size, 1, seq_len, seq_len, dtype=torch.bool, device="meta").tril()
        positions = torch.arange(seq_len, device="meta")[None]  # (1, len); OPT would derive them from a 2D mask
        out = lm.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        hidden = out.last_hidden_state[:, -answers:]  # (batch, answers, hidden)
        logits = lm.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1]))  # (batch*answers, vocab)
        torch.nn.functional.cross_entropy(logits.float(), torch.zeros(logits.shape[0], dtype=torch.long, device="meta"))
    return sum(t.numel() * t.element_size() for t in seen.values())


def estimate(config, emulator: EmulatorConfig, finetune: FinetuneConfig, batch_size: int = 8, seq_len: int = 256,
             harmonizer_rank: int = 64, answer_fraction: float = 0.25) -> Estimate:
    """Sizes of the full model, the emulator, one owner's trainable state and activations.

    Parameters
    ----------
    config:
        The full model's ``PretrainedConfig``.
    emulator, finetune:
        The emulator to build and the owners' training (``mode``, ``lora_r``, ``dtype``, ...).
    batch_size, seq_len:
        One training batch's shape.
    answer_fraction:
        Share of the positions the loss is on (the answer tokens: 0.6 of PIQA's training tokens
        with SmolLM2's tokenizer, less for short answers; ``--answer-fraction`` in the CLI).
    """
    if not 0.0 < answer_fraction <= 1.0:
        raise ConfigError(f"answer_fraction must be in (0, 1], got {answer_fraction}")
    dtype = resolve_dtype(finetune.dtype)
    full = _meta_model(config, dtype)
    model, layout = _meta_emulator(full, emulator, harmonizer_rank)
    adapters = [p for p, e in enumerate(layout) if e["kind"] == "adapter"]
    emulator_params = sum(p.numel() for p in model.parameters())
    with torch.device("meta"):  # LoRA / bottleneck modules are skeletons too
        trained = make_trainable(model, adapters, finetune)
    trainable = [p for p in trained.parameters() if p.requires_grad]
    frozen = sum(p.numel() for p in trained.parameters() if not p.requires_grad)
    for p in trainable:  # one precision on the skeleton (autocast does not run on `meta`)
        p.data = p.data.to(dtype)
    activations = _saved_bytes(trained, batch_size, seq_len, answer_fraction)
    stored = checkpoint_dtype(config)
    shipped = stored if emulator.dtype == "auto" else resolve_dtype(emulator.dtype)
    return Estimate(full_params=sum(p.numel() for p in full.parameters()), emulator_params=emulator_params,
                    trainable_params=sum(p.numel() for p in trainable), frozen_params=frozen, dtype_bytes=_bytes(dtype),
                    activation_bytes=activations, batch_size=batch_size, seq_len=seq_len,
                    transient_bytes=2 * batch_size * max(1, math.ceil(seq_len * answer_fraction)) * config.vocab_size * 4,
                    checkpoint_bytes=_bytes(stored), shipped_bytes=_bytes(shipped))


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def checkpoint_dtype(config) -> torch.dtype:
    """The precision a checkpoint is stored in (its config's ``dtype``; float32 when unsaid)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, value) if isinstance(value, str) else value
