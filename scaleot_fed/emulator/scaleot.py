"""ScaleOT (Yao et al., AAAI 2025): the middle blocks with the lowest stage-1 scores (Dynamic
LayerReplace) are replaced by their trained harmonizers; the kept ones may get Selective Rank
Compression (``rank_keep_ratio``), as in every strategy."""

from __future__ import annotations

from .importance_drop import least_important
from .strategy import EmulatorStrategy, PlanInputs


class ScaleOT(EmulatorStrategy):
    """The lowest-scored middle blocks replaced by their stage-1 harmonizers."""

    name = "scaleot"
    needs_importance = True

    def replace(self, middle: list[int], n_replace: int, inputs: PlanInputs) -> dict[int, dict | None]:
        return {m: {"kind": "harmonizer"} for m in least_important(middle, n_replace, inputs.scores, self.name)}
