"""The interface every emulator strategy implements.

An emulator keeps the ``N_a`` adapter blocks (half at the bottom, half at the top) and, in the
middle, replaces the ``alpha`` share of blocks (the kept ones may get Selective Rank Compression).
A strategy decides only *which* middle blocks are replaced and *what stands in* for each:

* nothing (the block is dropped),
* its trained harmonizer from stage 1 (``"harmonizer"``), or
* another kept middle block whose weights run again at its position (``"shared"``, with ``"of"``).

Everything else (assembling the model, compression, the manifest, saving, loading, plug-in,
streaming, the size estimate) is the same for every strategy. A new strategy is one module with a
subclass of :class:`EmulatorStrategy` and one line in :data:`scaleot_fed.emulator.registry.REGISTRY`
(or, from a user's own code, :func:`scaleot_fed.emulator.registry.register_strategy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

STAND_INS = ("harmonizer", "shared")
"""What may stand in for a replaced block (a replaced block without a stand-in is dropped)."""


@dataclass(frozen=True)
class PlanInputs:
    """What a strategy may base its choice on."""

    alpha: float
    scores: dict[int, float] | None = None
    """Stage-1 importance per block (strategies with ``needs_importance``; low: least important)."""
    measured: dict | None = None
    """What :meth:`EmulatorStrategy.measure` found on the full model (strategies with ``needs_calibration``)."""


class EmulatorStrategy:
    """One way to choose the replaced middle blocks and their stand-ins.

    Class attributes declare what the strategy needs, so that programs ask the strategy instead of
    checking its name: a stage-1 artifact (``needs_importance``), calibration text and the full
    model in memory (``needs_calibration``; such a strategy cannot be built streamed).
    """

    name: ClassVar[str] = ""
    needs_importance: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False

    @property
    def streamable(self) -> bool:
        """Whether the emulator can be built block by block from a checkpoint on disk."""
        return not self.needs_calibration

    def measure(self, model: nn.Module, calibration: torch.Tensor | None, middle: list[int], alpha: float) -> dict | None:
        """What the strategy measures on the full model before choosing (with ``needs_calibration``);
        recorded in the manifest under the strategy's name. None: nothing to measure."""
        return None

    record_key: ClassVar[str] = "measured"
    """The manifest key :meth:`record` goes under."""

    def record(self, measured: dict) -> dict:
        """What the manifest keeps of :meth:`measure`'s result (for reports)."""
        return measured

    def calibration(self, tokenizer, texts: list[str]) -> torch.Tensor:
        """The ``(sequences, length)`` token ids :meth:`measure` runs the model on, from ``texts``."""
        raise NotImplementedError(f"emulator strategy {self.name!r} takes no calibration text")

    def replace(self, middle: list[int], n_replace: int, inputs: PlanInputs) -> dict[int, dict | None]:
        """The replaced middle blocks: source index -> its stand-in (``{"kind": "harmonizer"}``,
        ``{"kind": "shared", "of": j}``) or None (dropped). ``n_replace``: ``round(alpha * len(middle))``."""
        raise NotImplementedError

    def sizing_inputs(self, middle: list[int], alpha: float) -> PlanInputs:
        """Inputs that give the built emulator's sizes without stage 1 or a measurement (what
        ``estimate`` plans with): which blocks go does not change the sizes, only how many."""
        return PlanInputs(alpha, scores={m: float(m) for m in middle})

    def middle_runs(self, alpha: float) -> float:
        """Block passes a token makes per middle block of the source model (the study's cost units):
        by default the kept share; a stand-in that runs a block (``shared``) counts as one."""
        return 1.0 - alpha

    def describe(self) -> str:
        return (self.__doc__ or self.name).strip().splitlines()[0]
