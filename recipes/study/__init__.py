"""A study: the offsite pipeline over emulators x tasks x fine-tuning modes x seeds, with the
claims it tests declared up front and decided by paired bootstrap intervals.

One module per concept: :mod:`.config` (``[study]``, the claims, the row families), :mod:`.data`
(each task's items), :mod:`.costs` (what a unit costs, the ETA), :mod:`.grid` (the units and how
each is made), :mod:`.federated` (the federated rows, from :mod:`simulations`), :mod:`.ledger`
(what is committed: records, per-item files, the compute log), :mod:`.run` (run or resume),
:mod:`.plan` (what is left), :mod:`.schedule` (which pending units run first, and before a
deadline), :mod:`.report` and :mod:`.markdown` (summary, REPORT.md, plots) and
:mod:`.verdicts` (the claims across studies).
"""

from .config import GRID_EXTENT, METRICS, ClaimConfig, StudyConfig, StudyGridConfig, load_study_config, task_folder
from .grid import Grid, Unit, open_grid

__all__ = ["GRID_EXTENT", "METRICS", "ClaimConfig", "Grid", "StudyConfig", "StudyGridConfig", "Unit", "load_study_config",
           "open_grid", "task_folder"]
