"""Uniform drop: evenly spaced middle blocks are kept, the rest dropped (Offsite-Tuning's
emulator before its distillation). Needs nothing but the depth."""

from __future__ import annotations

import numpy as np

from .strategy import EmulatorStrategy, PlanInputs


class UniformDrop(EmulatorStrategy):
    """Evenly spaced middle blocks kept, the others dropped."""

    name = "uniform-drop"

    def replace(self, middle: list[int], n_replace: int, inputs: PlanInputs) -> dict[int, dict | None]:
        n_keep = len(middle) - n_replace
        keep = set(np.linspace(0, len(middle) - 1, n_keep).round().astype(int).tolist()) if n_keep else set()
        return {m: None for j, m in enumerate(middle) if j not in keep}
