"""Stage 2: the emulator = (N_a, alpha, rank_keep_ratio), built from the full model by a strategy.

Layout of an emulator built from an ``L``-block model with ``N_a`` adapter blocks::

    [adapter 0 .. N_a/2-1] [middle: original | compressed | a stand-in, or dropped] [adapter top]

One module per concept: :mod:`.config` (what to build), :mod:`.strategy` (the interface a
strategy implements) and :mod:`.registry` (strategies by name), one module per built-in strategy
(:mod:`.uniform_drop`, :mod:`.importance_drop`, :mod:`.scaleot`, :mod:`.crash`), :mod:`.build`
(plan, assemble, compress, manifest), :mod:`.io` (save, load, check a folder) and
:mod:`.streaming` (build and plug in block by block, for checkpoints bigger than memory).
"""

from .build import build_emulator, plan_layout
from .config import EmulatorConfig
from .io import (
    MANIFEST,
    WEIGHTS,
    Emulator,
    check_emulator_folder,
    load_emulator,
    looks_like_emulator,
    read_manifest,
    save_emulator,
    sha256_file,
)
from .registry import get_strategy, register_strategy, strategy_names
from .strategy import EmulatorStrategy, PlanInputs

__all__ = [
    "MANIFEST", "WEIGHTS", "Emulator", "EmulatorConfig", "EmulatorStrategy", "PlanInputs", "build_emulator",
    "check_emulator_folder", "get_strategy", "load_emulator", "looks_like_emulator", "plan_layout", "read_manifest",
    "register_strategy", "save_emulator", "sha256_file", "strategy_names",
]
