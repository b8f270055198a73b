"""The study's data: each task's training, dev and evaluation items.

A task's items are its first ``train_limit`` / eval-limit items, or for the tasks in
``[study] random_subsets`` a fixed pseudo-random subset (:func:`scaleot_fed.tasks.sample_items`):
the same in every cell, so rows stay paired item by item. Items may change while a task has no
results, never under finished rows (:func:`check_task_data`).
"""

from __future__ import annotations

from pathlib import Path

from scaleot_fed.errors import ConfigError
from scaleot_fed.tasks import MCItem, load_task

from .config import StudyGridConfig, task_folder

SUBSET_SEED = 0
"""The seed of ``random_subsets``' draw: fixed, not a study seed, so every cell sees the same items."""


def sample_seed(study: StudyGridConfig, task: str) -> int | None:
    return SUBSET_SEED if task in study.random_subsets else None


def task_items(study: StudyGridConfig, task: str) -> tuple[list[MCItem], list[MCItem], list[MCItem]]:
    """``(train, dev, evaluation)`` of a task: the last ``dev_items`` of its training items are the dev set."""
    seed = sample_seed(study, task)
    train_all = load_task(task, "train", study.train_limit, seed)
    if len(train_all) <= study.dev_items:
        raise ConfigError(f"{task}: {len(train_all)} training items, need more than dev_items={study.dev_items}")
    evaluation = load_task(task, study.eval_split_of(task), study.eval_limit_of(task), seed)
    return train_all[: -study.dev_items], train_all[-study.dev_items :], evaluation


ITEM_KEYS = ("train_limit", "dev_items", "eval_limit", "eval_limits", "random_subsets", "eval_split", "eval_splits")
TASK_DATA = tuple(f"study.{key}" for key in ITEM_KEYS)
"""``[study]`` keys that choose a task's items: a resumed study may change them for tasks with no results."""


def check_task_data(folders: list[Path], before: dict, study: StudyGridConfig) -> None:
    """Refuse a change of a task's items (``before``: the run's saved ``[study]``) where the task has
    results in one of ``folders`` (the run folder, the ledger's items): its rows and trained
    adapters were made on the old items."""
    defaults = StudyGridConfig()  # (for keys a run saved before they existed)
    old = {k: before.get(k, getattr(defaults, k)) for k in ITEM_KEYS}
    new = {k: getattr(study, k) for k in ITEM_KEYS}

    def items(s: dict, task: str) -> tuple:
        split = StudyGridConfig(tasks=study.tasks, eval_split=s["eval_split"], eval_splits=s["eval_splits"]).eval_split_of(task)
        return (s["train_limit"], s["dev_items"], s["eval_limits"].get(task, s["eval_limit"]), task in s["random_subsets"],
                split)

    changed = [t for t in study.tasks if items(old, t) != items(new, t)
               and any(p.is_file() for f in folders for p in (f / task_folder(t)).rglob("*"))]
    if changed:
        raise ConfigError(f"{folders[0]}: the items of {changed} changed ({', '.join(TASK_DATA)}), but those tasks have "
                          "results made on the old items; restore the old values, or delete the tasks' folders "
                          "(in the run folder and in the results' items/) to score them again")


