"""Everything about aggregation, one module per concern.

* :mod:`.registry`: strategies by name: Flower's built-ins, FFA-LoRA, and a user's own Strategy
  class by ``"module:Class"`` or ``"path/file.py:Class"`` (``docs/strategies.md``);
* :mod:`.requirements`: what a strategy requires of the owners' training, declared on the class;
* :mod:`.lora`: FFA-LoRA (exact LoRA averaging) and mixed-rank padding (HetLoRA);
* :mod:`.privacy`: central differential privacy as a wrapper around the strategy;
* :mod:`.replies`: which owners' replies may be averaged in at all.

Aggregation itself is Flower's (``flwr.serverapp.strategy``); what this package adds is built by
subclassing or wrapping it, never by forking the loop.
"""

from .lora import FFALoRA, pad_rank, rank_axis, slice_rank
from .registry import BUILTIN, build_strategy, check_strategy_name, resolve_strategy
from .requirements import FREEZE_LORA_A, ClientRequirements, check_requirements, requirements_of

__all__ = ["BUILTIN", "FFALoRA", "FREEZE_LORA_A", "ClientRequirements", "build_strategy", "check_requirements",
           "check_strategy_name",
           "pad_rank", "rank_axis", "requirements_of", "resolve_strategy", "slice_rank"]
