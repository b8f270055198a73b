"""The model owner's privacy report: how much of the full model can a data owner get back from
the emulator alone?

The attacker is a data owner who ignores the protocol: instead of training only the adapter
blocks it fine-tunes every weight it was given (the compressed middle, the harmonizers, the
embeddings) on its task. Its accuracy, next to the plug-in model's, says how much the model
owner gave away: the emulator is doing its job while the attacker stays clearly below the
plug-in model (ScaleOT's argument for harmonizers + rank compression).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import ConfigError
from .finetune import FinetuneConfig, FinetuneResult, finetune
from .train_state import Checkpoint


@dataclass
class AttackConfig(FinetuneConfig):
    """``[attack]``: the attacker's training (every emulator weight, so a smaller step size)."""

    mode: str = "full"
    lr: float = 5e-5
    steps: int = 150

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode != "full":
            raise ConfigError("attack.mode is always \"full\": the attacker trains every emulator weight")


def open_all_weights(model: nn.Module) -> int:
    """Make every parameter trainable; returns how many there are."""
    for param in model.parameters():
        param.requires_grad_(True)
    return sum(p.numel() for p in model.parameters())


def attack_emulator(emulator_path: str | Path, train_items: list, dev_items: list, config: AttackConfig,
                    progress: bool = False, checkpoint: Checkpoint | None = None) -> tuple[nn.Module, FinetuneResult]:
    """Fine-tune all weights of a freshly loaded emulator (harmonizers and compressed blocks
    included) on ``train_items``; returns the trained model and the training record.
    ``checkpoint``: see :func:`scaleot_fed.finetune.finetune`."""
    from .emulator import load_emulator

    emulator = load_emulator(emulator_path)  # pristine: other rows may have wrapped their copy
    open_all_weights(emulator.model)
    result = finetune(emulator.model, emulator.tokenizer, train_items, dev_items, config, progress=progress,
                      checkpoint=checkpoint)
    return emulator.model, result
