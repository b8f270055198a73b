"""The study's ledger: what a study keeps in its results folder (committed) so that a fresh
checkout, with no run folder, continues the grid and rewrites the report without recomputing a
finished row.

The run folder holds the weights (stage 1's harmonizers, the emulators, trained adapters): large,
never committed, and rebuilt from their seed when lost. Everything else the report reads is small
and lives beside the report:

* ``items/<task>/<row>.loglik.json.gz``: a scored row, whole: ``acc``, ``acc_norm``, its other
  fields under ``record`` (dev losses, training stats) and its per-item log-likelihoods
  (``<task>``: :func:`recipes.study.config.task_folder`, the task's name unless given by path);
* ``ledger/config.json``: the config the rows were made with (checked like the run folder's);
* ``ledger/units.jsonl``: the wall seconds and estimated cost of every unit the study ran (the
  compute-used line; the ETA's rate);
* ``ledger/stage1/<setting>/seed<s>.json`` and ``ledger/emulators/<seed>/<name>.json``: stage 1's
  record and each emulator's manifest without their weights (stability, budgets);
* ``ledger/earlier_builds/<the same path>.build<k>.json``: the record of a build that was lost and
  rebuilt differently (``[study] rebuilt_differently = "accept"``), with the rows made from it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from scaleot_fed.config import as_dict
from scaleot_fed.emulator.config import upgrade_saved
from scaleot_fed.errors import ConfigError
from scaleot_fed.files import write_atomic
from scaleot_fed.rundir import RowCache, config_changes, write_json

from .config import StudyConfig, task_folder
from .data import check_task_data

LEDGER = "ledger"
SCORES = ("acc", "acc_norm")


def ledger_dir(results: Path) -> Path:
    return Path(results) / LEDGER


def item_text(key: str, row: dict) -> str:
    """A row's file: every field of the row, the per-item record flattened in as the files have
    always had it (``loglik``, ``gold``, ``choice_chars``). A row judged by dev loss alone (a mode
    sweep's) has no scores nor items: its file holds its record, so a fresh checkout keeps it."""
    record = {k: v for k, v in row.items() if k not in ("items", *SCORES)}
    return json.dumps({"row": key} | {k: row[k] for k in SCORES if k in row} | {"record": record} | row.get("items", {}))


def row_from_items(data: dict) -> dict:
    """The row a per-item file holds (inverse of :func:`item_text`)."""
    items = {k: v for k, v in data.items() if k not in ("row", "record", *SCORES)}
    return {k: data[k] for k in SCORES if k in data} | data.get("record", {}) | ({"items": items} if items else {})


def read_items(path: Path) -> dict | None:
    """A per-item file's content (None if absent or damaged, e.g. cut short by a kill)."""
    text = _stored_text(path)
    try:
        return None if text is None else json.loads(text)
    except json.JSONDecodeError:
        return None


def _stored_text(path: Path) -> str | None:
    try:
        return gzip.decompress(path.read_bytes()).decode()
    except (OSError, EOFError, UnicodeDecodeError):
        return None


ITEMS_SUFFIX = ".loglik.json.gz"


def item_file(key: str) -> str:
    """The per-item file name of row ``key`` (or of a glob over keys): its ``/`` written ``__``."""
    return f"{key.replace('/', '__')}{ITEMS_SUFFIX}"


def write_items(rows: dict[str, dict], folder: Path) -> dict[str, str]:
    """Each row as ``<row>.loglik.json.gz`` in ``folder`` (a scored row with its per-item
    log-likelihoods, a sweep's dev-loss row with its record), rewritten (atomically, with no
    timestamp in the gzip header, so an unchanged row gives the same bytes) when the row changed.
    Returns ``{row key: path relative to the results folder}``."""
    written = {}
    for key, row in rows.items():
        path = folder / item_file(key)
        text = item_text(key, row)
        if _stored_text(path) != text:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(path, gzip.compress(text.encode(), mtime=0))
        written[key] = str(Path("items") / folder.name / path.name)
    return written


def saved_config(out: Path, results: Path) -> dict | None:
    """The config a study's results were made with: the run folder's, else the ledger's."""
    for path in (Path(out) / "config.json", ledger_dir(results) / "config.json"):
        if path.is_file():
            return upgrade_saved(json.loads(path.read_text()))  # (in today's keys)
    return None


def check_config(results: Path, config: dict, may_change: tuple[str, ...]) -> bool:
    """Whether ``results`` holds a ledger; refused (one line) if it was made with another config
    than ``config``, up to the keys in ``may_change``."""
    saved = ledger_dir(results) / "config.json"
    if not saved.is_file():
        return False
    changed = config_changes(json.loads(saved.read_text()), config, may_change)
    if changed:
        raise ConfigError(f"{results} holds a study made with another config (changed: {', '.join(changed[:8])}); "
                          "restore that config, use --overwrite to start over, or set another [study] results")
    return True


def check_resume(out: Path, results: Path, config: StudyConfig) -> None:
    """Emulators may be added to a study, not changed under a name its cached rows (in the run
    folder or the ledger) already use; a task's items may change only while it has no results
    (:func:`recipes.study.data.check_task_data`)."""
    saved = saved_config(out, results)
    if saved is None:
        return
    check_task_data([out, Path(results) / "items"], saved.get("study", {}), config.study)
    before = {e["name"]: e for e in saved.get("emulators", [])}
    changed = [e.name for e in config.emulators if e.name in before and before[e.name] != json.loads(json.dumps(as_dict(e)))]
    if changed:
        raise ConfigError(f"{out}: [[emulator]] {changed} changed under the same name, but its rows are cached; "
                          "give the changed emulator a new name, or use --overwrite to start over")


def ledger_rows(results: Path, task: str, log=None) -> dict[str, dict]:
    """The rows of ``task`` the ledger holds, by key (a damaged file is left out, and said)."""
    rows = {}
    for path in sorted((Path(results) / "items" / task_folder(task)).glob(f"*{ITEMS_SUFFIX}")):
        key = path.name.removesuffix(ITEMS_SUFFIX).replace("__", "/")
        if (data := read_items(path)) is not None:
            rows[key] = row_from_items(data)
        elif log:
            log(f"study: {path} is damaged; its row will be computed again")
    return rows


def restore(out: Path, results: Path, config: dict, tasks: list[str], may_change: tuple[str, ...], log) -> int:
    """Put the ledger's rows that the run folder ``out`` lacks back into its row caches (a fresh
    checkout, a deleted run folder), after :func:`check_config`. An emulator's fine-tuned row comes
    back only with its plug-in row: the plug-in needs the trained adapters, which are gone with the
    run folder, so the unit reruns both. Returns how many rows came back."""
    if Path(results).resolve() == Path(out).resolve() or not check_config(results, config, may_change):
        return 0
    restored = 0
    for task in tasks:
        cache, found = RowCache(Path(out) / task_folder(task)), ledger_rows(results, task, log)
        for key, row in found.items():
            sibling = key.removesuffix("/emulator_finetune") + "/plug_in"
            if cache.get(key) is None and not (key.endswith("/emulator_finetune") and sibling not in found):
                cache.put(key, row)
                restored += 1
    if restored:
        log(f"study: restored {restored} finished rows from {results}/items (the run folder did not have them); "
            "to compute a row again, delete its file there too")
    return restored


def record(out: Path, results: Path, config: dict) -> Path:
    """Copy the run folder's small records into the ledger: the config, stage 1's records and the
    emulators' manifests (a record the run folder has lost is kept). Returns the ledger folder."""
    ledger = ledger_dir(results)
    ledger.mkdir(parents=True, exist_ok=True)
    write_json(ledger / "config.json", config)
    for path in sorted(Path(out).glob("stage1/*/seed*/layer_replace.json")):
        _keep(path, stage1_record(ledger, path), _reranked)
    for path in sorted(Path(out).glob("emulators/*/*/emulator/manifest.json")):
        _keep(path, emulator_record(ledger, path), lambda old, new: None)  # the first build's, always
    return ledger


def stage1_record(ledger: Path, artifact: Path) -> Path:
    """The ledger's copy of stage 1's ``<out>/stage1/<setting>/seed<s>/layer_replace.json``."""
    return ledger / "stage1" / artifact.parent.parent.name / f"{artifact.parent.name}.json"


def emulator_record(ledger: Path, manifest: Path) -> Path:
    """The ledger's copy of the emulator manifest ``<out>/emulators/<seed>/<name>/emulator/manifest.json``."""
    return ledger / "emulators" / manifest.parent.parent.parent.name / f"{manifest.parent.parent.name}.json"


def same_stage1(a: dict, b: dict) -> bool:
    """One stage-1 run: the same RL trajectory (a re-ranking changes only its ranking)."""
    return (a.get("history"), a.get("rl_scores")) == (b.get("history"), b.get("rl_scores"))


def _reranked(old: dict, new: dict) -> dict | None:
    """A re-ranking of the recorded stage-1 run (the same run, another ranking) replaces its record,
    with the first build's time; a rebuild with the same ranking keeps it."""
    if not same_stage1(old, new) or (old.get("config"), old.get("scores")) == (new.get("config"), new.get("scores")):
        return None
    first = {"seconds": old["cost"]["seconds"]} if "seconds" in old.get("cost", {}) else {}
    return new | {"cost": new.get("cost", {}) | first}


def same_weights(a: dict, b: dict) -> bool:
    return a.get("weights_sha256") == b.get("weights_sha256")


def row_globs(emulator: str, seed: int | None, federated: list[str] = ()) -> list[str]:
    """The per-item files of the rows made from ``emulator`` at ``seed`` (None: a shared emulator,
    every seed), as globs under the results folder: its cells, variant cells, attack, and the rows
    ``federated`` names (the federations trained on it, their twins)."""
    tail = f"*seed{seed}/*" if seed is not None else "*"
    keys = [f"{emulator}/{tail}", f"{emulator}:{tail}"] + [f"{side}{sep}{tail}" for side in federated for sep in "/:"]
    return [f"items/*/{item_file(key)}" for key in keys]


class RebuildDiffers(ConfigError):
    """A lost build, rebuilt from its seed, is not the one the ledger records."""


def check_rebuild(record: Path, current: Path, same: Callable[[dict, dict], bool], made: str) -> bool:
    """Whether the ledger's ``record`` of the build ``current`` (a stage-1 record or an emulator
    manifest) exists (False: nothing to compare); raises :class:`RebuildDiffers` when it records
    another build: the run folder was lost and the rebuild from the same seed differs (another
    torch, CPU or code), so rows made from it would not be those of the recorded rows' build.
    ``made``: what was made from the build (folders, records, row files), named in the error."""
    if not record.is_file():
        return False
    if not same(json.loads(record.read_text()), json.loads(current.read_text())):
        raise RebuildDiffers(f"{current.parent} is not the build the study's rows were made with ({record}): rebuilt "
                             "from its seed, it came out different (another torch, CPU or code); rebuild it where "
                             f"that was built, or delete that record, {current.parent} and what was made from it "
                             f"({made}) to make them all again, or set [study] rebuilt_differently = \"accept\" "
                             "to go on with the new build")
    return True


EARLIER = "earlier_builds"


def set_aside(ledger: Path, record: Path, current: Path, rows: list[Path]) -> Path:
    """Replace the ledger's ``record`` of a build that was lost and rebuilt differently by the new
    build's (``current``, as :func:`record` would copy it), after moving it to
    ``ledger/earlier_builds/<its path>.build<k>.json`` (k: the first free) with the row files made
    from it: of ``rows`` (files under the results folder), those an earlier build of the same
    record does not hold, each with its sha256 (a row computed again later is no longer the old
    build's: :func:`earlier_builds`). Returns the path it was moved to."""
    relative, results = record.relative_to(ledger), ledger.parent
    folder = ledger / EARLIER / relative.parent
    earlier = sorted(folder.glob(f"{record.stem}.build*.json"))
    held = {r for p in earlier for r in json.loads(p.read_text()).get("rows_made", {}).items()}
    made = {str(p.relative_to(results)): _sha256(p) for p in rows}
    old = json.loads(record.read_text())
    target = next((p for p in earlier if {k: v for k, v in json.loads(p.read_text()).items() if k != "rows_made"} == old),
                  folder / f"{record.stem}.build{len(earlier) + 1}.json")  # (set aside before a kill: once)
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(target, json.dumps(old | {"rows_made": dict(sorted(set(made.items()) - held))}, indent=1))
    write_atomic(record, current.read_text())  # (at once: a kill before the next record() loses no record)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def earlier_builds(ledger: Path) -> list[dict]:
    """The builds set aside (:func:`set_aside`): each record's path under the ledger and the rows
    made from it that are still its (the file unchanged since; a row computed again is the new
    build's). A row made from an emulator set aside with the stage 1 it was built from is listed
    once, with the emulator (``listed_with_emulators`` counts it on the stage 1's entry)."""
    results, found, seen = Path(ledger).parent, [], set()
    for p in sorted((Path(ledger) / EARLIER).rglob("*.json")):  # (emulators/ sorts before stage1/)
        rows = json.loads(p.read_text()).get("rows_made", {})
        still = [r for r, sha in rows.items() if (results / r).is_file() and _sha256(results / r) == sha]
        found.append({"record": str(p.relative_to(ledger)), "rows_made": [r for r in still if r not in seen]}
                     | ({"listed_with_emulators": n} if (n := len(set(still) & seen)) else {}))
        seen.update(still)
    return found


def _keep(source: Path, target: Path, merge: Callable[[dict, dict], dict | None]) -> None:
    """Copy ``source`` to ``target`` if there is none yet, else write ``merge(old, new)`` of their
    JSON unless it is None: a rebuild of lost weights keeps the first build's record (its timing,
    and what its rows used)."""
    text = source.read_text()
    if target.is_file():
        if target.read_text() == text or (merged := merge(json.loads(target.read_text()), json.loads(text))) is None:
            return
        text = json.dumps(merged, indent=1)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, text)


def log_unit(results: Path, label: str, seconds: float, cost: float, resumed: float = 0.0) -> None:
    """Append one unit's wall seconds and estimated cost (block-token passes, as it was when the
    unit ran: a build it paid for is in it) to the ledger's compute log. ``resumed``: seconds of
    its training and scoring that earlier processes did before a stop, added to ``seconds`` and
    logged beside it (since 2026-12-01; before, a resumed unit logged only its last process)."""
    path = ledger_dir(results) / "units.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"unit": label, "seconds": seconds + resumed, "cost": cost} | ({"resumed_seconds": resumed} if resumed else {})
    with path.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def federations_record(results: Path) -> dict[str, dict]:
    """The simulation config each federation's rows were made with, by name (``federations.json``)."""
    path = ledger_dir(results) / "federations.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def record_federations(results: Path, configs: dict[str, dict]) -> None:
    """Add the federations not recorded yet (a recorded one is never rewritten: see
    :func:`recipes.study.federated.check_recorded`)."""
    recorded = federations_record(results)
    if new := {k: v for k, v in configs.items() if k not in recorded}:
        ledger_dir(results).mkdir(parents=True, exist_ok=True)
        write_json(ledger_dir(results) / "federations.json", recorded | new)


def compute_log(results: Path) -> list[dict]:
    """The compute log's entries: ``unit``, ``seconds`` and (logged since 2026-11-30) ``cost``."""
    path = ledger_dir(results) / "units.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def compute_seconds(results: Path) -> float:
    """Wall seconds of every unit the study ran, by its compute log."""
    return float(sum(e["seconds"] for e in compute_log(results)))


def clear(results: Path) -> None:
    """Remove the rows and records of the ledger (``--overwrite``: the study starts over)."""
    for folder in (Path(results) / "items", ledger_dir(results)):
        if folder.is_dir():
            shutil.rmtree(folder)
