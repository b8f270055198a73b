"""Server-side re-alignment of an emulator between federated rounds (beyond the anchors).

FedBiOT re-aligns a dropped-layer emulator on the server every round; nobody does it for ScaleOT
emulators. Here the model owner updates the emulator's non-adapter parts (harmonizers and
compressed blocks) on its own general text, so that the emulator with the current aggregated
adapters tracks the full model with the same adapters: logit distillation,
``KL(full + adapters || emulator + adapters)`` over next-token distributions. The adapters are
frozen while it runs, the shapes of what changes never do (a compressed block stays low-rank, a
harmonizer stays a harmonizer), and the only data it sees is ``token_ids``, the owner's text:
never a data owner's item.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .arch import get_layers
from .errors import ConfigError

REALIGNED_KINDS = ("harmonizer", "compressed")
"""Emulator positions re-alignment may change, cheapest to ship first."""


@dataclass
class RealignConfig:
    """``[realign]``: every ``every`` rounds (0: never), ``steps`` of distillation at ``lr`` on
    ``batch_size`` blocks of ``block_size`` tokens of ``text`` (the model owner's corpus, as for
    stage 1); what changed is shipped to the owners, at most ``max_bytes`` of it per re-alignment
    (whole positions, harmonizers first)."""

    every: int = 0
    steps: int = 10
    lr: float = 1e-4
    batch_size: int = 4
    block_size: int = 128
    max_bytes: int | None = 8_000_000
    text: str = "lambada"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("every",):
            if getattr(self, name) < 0:
                raise ConfigError(f"realign.{name} must be >= 0 (0: off), got {getattr(self, name)}")
        for name in ("steps", "batch_size", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"realign.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"realign.lr must be > 0, got {self.lr}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ConfigError(f"realign.max_bytes must be >= 1 (or absent: no cap), got {self.max_bytes}")

    @property
    def enabled(self) -> bool:
        return self.every > 0


def realign_parameters(model: nn.Module, manifest: dict, max_bytes: int | None) -> dict[str, nn.Parameter]:
    """The parameters re-alignment changes, by their names in ``model`` (an emulator, possibly
    wrapped by peft): every parameter of the harmonizer positions, then of the compressed ones,
    whole positions in order while their bytes fit in ``max_bytes`` (they are shipped in float32).

    Raises
    ------
    ConfigError
        The emulator has no harmonizer or compressed position, or ``max_bytes`` fits none.
    """
    blocks = get_layers(model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    positions = [p for kind in REALIGNED_KINDS for p, e in enumerate(manifest["layout"]) if e["kind"] == kind]
    if not positions:
        raise ConfigError("[realign] changes harmonizers and compressed blocks: this emulator has neither "
                          "(a uniform-drop emulator); use a ScaleOT emulator or turn re-alignment off")
    chosen: dict[str, nn.Parameter] = {}
    used = 0
    for position in positions:
        params = {name_of[id(p)]: p for p in blocks[position].parameters() if id(p) in name_of}
        size = sum(p.numel() * 4 for p in params.values())
        if max_bytes is not None and used + size > max_bytes:
            continue
        chosen |= params
        used += size
    if not chosen:
        raise ConfigError(f"realign.max_bytes={max_bytes} fits no harmonizer or compressed block; raise it")
    return chosen


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student); logits ``(batch, length, vocab)``."""
    t = F.log_softmax(teacher_logits.float().flatten(0, 1), dim=-1)  # (batch * length, vocab)
    s = F.log_softmax(student_logits.float().flatten(0, 1), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def realign(teacher: nn.Module, student: nn.Module, params: dict[str, nn.Parameter], token_ids: torch.Tensor,
            config: RealignConfig) -> dict:
    """Train ``params`` of ``student`` (only them) to match ``teacher``'s next-token distributions
    on ``token_ids`` ``(num_blocks, block_size)``; both models keep everything else as it was
    (requires_grad flags restored). Returns the KL before and after, per-step losses and seconds."""
    device = next(student.parameters()).device
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    teacher.eval()
    was_training = student.training
    student.eval()  # no dropout: the emulator is matched as owners run it
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    batches = [token_ids[torch.randint(len(token_ids), (min(config.batch_size, len(token_ids)),), generator=generator)]
               for _ in range(config.steps)]
    teacher_device = next(teacher.parameters()).device

    def teacher_logits(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return teacher(input_ids=x.to(teacher_device)).logits.to(device)

    start, history = time.perf_counter(), []
    try:
        with torch.no_grad():
            before = float(_kl(teacher_logits(batches[0]), student(input_ids=batches[0].to(device)).logits))
        for x in batches:
            loss = _kl(teacher_logits(x), student(input_ids=x.to(device)).logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
        with torch.no_grad():
            after = float(_kl(teacher_logits(batches[0]), student(input_ids=batches[0].to(device)).logits))
    finally:
        for n, p in student.named_parameters():
            p.requires_grad_(flags[n])
        student.train(was_training)
    return {"kl_before": before, "kl_after": after, "history": history, "seconds": time.perf_counter() - start,
            "bytes": sum(p.numel() * 4 for p in params.values())}  # as shipped: float32
