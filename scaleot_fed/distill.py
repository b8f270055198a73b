"""Offsite-Tuning's distilled emulator: the baseline ScaleOT's cost claim is measured against.

Uniform layer drop, then the kept middle blocks are trained on the owner's text with the LM loss
plus ``kd_weight`` times an RMS-normalised MSE between the emulator's middle-stack output and the
full model's (same input, i.e. the bottom adapters' output), as in Offsite-Tuning (weight 30).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .arch import get_layers
from .devices import Placement, seeded
from .errors import ConfigError
from .heads import hidden_states, lm_loss


@dataclass
class DistillConfig(Placement):
    """Knobs of the distillation (same budget rules as stage 1: steps x batch x block tokens);
    ``device`` and ``dtype`` (:class:`~scaleot_fed.devices.Placement`) hold for teacher and student."""

    steps: int = 150
    batch_size: int = 8
    block_size: int = 128
    lr: float = 1e-4
    kd_weight: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "batch_size", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"distill {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.kd_weight < 0:
            raise ConfigError("distill lr must be > 0 and kd_weight >= 0")


def normalised_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean((s - t)^2) / mean(t^2)``: the MSE in units of the teacher's mean square."""
    return ((student - teacher) ** 2).mean() / (teacher**2).mean().clamp_min(1e-12)


class _Capture:
    """Forward hook keeping a block's output."""

    def __init__(self, module: nn.Module) -> None:
        self.output: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.output = output[0] if isinstance(output, tuple) else output


def _distilled_positions(manifest: dict) -> tuple[list[int], int]:
    """The student's middle block positions, and the teacher block its last one must match: both
    middle stacks end right before the top adapters."""
    layout = manifest["layout"]
    if any(e["kind"] in ("harmonizer", "shared") for e in layout):
        raise ConfigError("distillation is the Offsite-Tuning baseline: build it from a uniform-drop emulator")
    middle_positions = [p for p, e in enumerate(layout) if e["kind"] != "adapter"]
    if not middle_positions:
        raise ConfigError("the emulator keeps no middle block to distil (alpha = 1)")
    adapters = set(manifest["adapter_layers"])
    return middle_positions, max(i for i in range(manifest["num_layers"]) if i not in adapters)


def _only_trainable(model: nn.Module, modules: list[nn.Module]) -> list[nn.Parameter]:
    """Freeze ``model`` except ``modules``; returns their parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def distill_emulator(full: nn.Module, emulator, token_ids: torch.Tensor, config: DistillConfig) -> dict:
    """Train the emulator's kept middle blocks in place; returns the cost and loss record.

    Parameters
    ----------
    full:
        The full model (teacher, frozen).
    emulator:
        An :class:`~scaleot_fed.emulator.Emulator` built with ``uniform-drop`` (no harmonizers).
    token_ids:
        ``(num_blocks, block_size)`` owner text.

    Both go to ``config.device`` (frozen weights in ``config.dtype``, trained blocks in float32);
    the emulator comes back on the CPU."""
    middle_positions, teacher_end = _distilled_positions(emulator.manifest)
    student_model = emulator.model
    blocks = get_layers(student_model)
    params = _only_trainable(student_model, [blocks[pos] for pos in middle_positions])
    config.apply(full.requires_grad_(False))
    config.apply(student_model)  # after _only_trainable: its trained blocks stay float32
    token_ids = token_ids.to(next(full.parameters()).device)
    teacher_hook = _Capture(get_layers(full)[teacher_end])
    student_hook = _Capture(blocks[max(middle_positions)])
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    history = {"lm_loss": [], "kd_loss": []}
    tokens_fb = tokens_f = 0
    start = time.perf_counter()
    student_model.train()  # (dropout, where the family has one, drawn from the seed: not from what ran before)
    full.eval()
    try:
        with seeded(config.seed, token_ids.device):
            for _ in range(config.steps):
                x = token_ids[torch.randint(len(token_ids), (min(config.batch_size, len(token_ids)),), generator=generator)]
                with torch.no_grad():
                    hidden_states(full, x)  # the teacher's block output reaches its hook; no LM head needed
                lm = lm_loss(student_model, x)
                kd = normalised_mse(student_hook.output, teacher_hook.output)
                loss = lm + config.kd_weight * kd
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                tokens_fb += x.numel()
                tokens_f += x.numel()
                history["lm_loss"].append(lm.item())
                history["kd_loss"].append(kd.item())
    finally:
        teacher_hook.handle.remove()
        student_hook.handle.remove()
        for p in params:
            p.requires_grad_(False)
        student_model.eval().to("cpu")
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "seconds_per_step": seconds / config.steps,
        "tokens_forward_backward": tokens_fb,
        "tokens_forward_only": tokens_f,
        "history": history,
        "teacher_block": teacher_end,
    }
