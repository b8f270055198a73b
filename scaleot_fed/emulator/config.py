"""What emulator to build: the method by name and ``(N_a, alpha, rank_keep_ratio)``.

The key was called ``strategy`` until 2026-12-06, a word the run files also use for aggregation
(``[strategy]``); a config or saved snapshot that still says ``strategy`` is read as ``method``
(a config with a one-line warning naming the new key)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..devices import resolve_dtype
from ..errors import ConfigError
from ..layer_replace import check_num_adapter_layers
from .registry import get_strategy
from .strategy import EmulatorStrategy


@dataclass
class EmulatorConfig:
    """What emulator to build.

    Attributes
    ----------
    method:
        The emulator strategy, by name (:mod:`scaleot_fed.emulator.registry`): ``scaleot``,
        ``importance-drop``, ``uniform-drop``, ``crash`` or one a user registered.
    num_adapter_layers:
        ``N_a``: trainable blocks, half at the bottom and half at the top; even, >= 2.
    alpha:
        Share of the middle blocks replaced (by harmonizers) or dropped, in [0, 1]; 0 only with
        ``rank_keep_ratio < 1`` (an SRC-only emulator: with both at their identity the emulator
        would be the full model).
    rank_keep_ratio:
        Selective Rank Compression of the kept middle blocks' attention projections: the share of
        each matrix's rank kept, in (0, 1] (1 = no compression; the kept rank is at least 1).
    dtype:
        Precision the emulator is stored and shipped in: ``auto`` (the full model's),
        ``float32``, ``bfloat16`` or ``float16`` (half the bytes to download). The manifest says
        which; data owners train in their own ``[finetune] dtype`` whatever it is.
    """

    method: str = "scaleot"
    num_adapter_layers: int = 4
    alpha: float = 0.5
    rank_keep_ratio: float = 1.0
    dtype: str = "auto"

    def __post_init__(self) -> None:
        get_strategy(self.method)  # an unknown name is an error here, naming the known ones
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 < float(self.rank_keep_ratio) <= 1.0:
            raise ConfigError(f"rank_keep_ratio must be in (0, 1] (1 = no compression), got {self.rank_keep_ratio}")
        if float(self.alpha) == 0.0 and float(self.rank_keep_ratio) == 1.0:
            raise ConfigError(
                "alpha = 0 with rank_keep_ratio = 1 replaces and compresses nothing: that emulator would be the "
                "full model; alpha = 0 is only meaningful with rank_keep_ratio < 1 (an SRC-only emulator)")
        check_num_adapter_layers(self.num_adapter_layers)
        if self.dtype != "auto":
            resolve_dtype(self.dtype)

    RENAMED: ClassVar[dict[str, str]] = {"strategy": "method"}
    """Old key -> new key: read, with a warning (:func:`scaleot_fed.config.from_dict`)."""

    @property
    def emulator_strategy(self) -> EmulatorStrategy:
        """The strategy object :attr:`method` names."""
        return get_strategy(self.method)

    @property
    def needs_importance(self) -> bool:
        return self.emulator_strategy.needs_importance


def upgrade_saved(snapshot: Any) -> Any:
    """A saved config snapshot (a run folder's ``config.json``) in today's keys: every emulator
    section (a table with ``num_adapter_layers``) that says ``strategy`` says ``method``."""
    if isinstance(snapshot, list):
        return [upgrade_saved(v) for v in snapshot]
    if not isinstance(snapshot, dict):
        return snapshot
    out = {k: upgrade_saved(v) for k, v in snapshot.items()}
    if "num_adapter_layers" in out and isinstance(out.get("strategy"), str) and "method" not in out:
        out["method"] = out.pop("strategy")
    return out
