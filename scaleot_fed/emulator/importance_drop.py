"""Importance drop: the middle blocks with the lowest stage-1 scores are dropped (ScaleOT's
ranking without its harmonizers: the ablation that shows what the harmonizers add)."""

from __future__ import annotations

from ..errors import ConfigError
from .strategy import EmulatorStrategy, PlanInputs


def least_important(middle: list[int], n_replace: int, scores: dict[int, float] | None, name: str) -> list[int]:
    """The ``n_replace`` middle blocks with the lowest scores (ties: the lower index)."""
    if scores is None:
        raise ConfigError(f"strategy {name!r} needs importance scores (--importance DIR from layer-replace)")
    missing = [m for m in middle if m not in scores]
    if missing:
        raise ConfigError(f"the importance artifact has no score for blocks {missing}: it was made with more adapter "
                          f"blocks; build with a larger N_a or rerun layer-replace with the same --adapters")
    return sorted(middle, key=lambda m: (scores[m], m))[:n_replace]


class ImportanceDrop(EmulatorStrategy):
    """The lowest-scored middle blocks dropped (no harmonizers)."""

    name = "importance-drop"
    needs_importance = True

    def replace(self, middle: list[int], n_replace: int, inputs: PlanInputs) -> dict[int, dict | None]:
        return {m: None for m in least_important(middle, n_replace, inputs.scores, self.name)}
