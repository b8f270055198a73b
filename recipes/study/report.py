"""The study's report, made from the run folder's rows and the ledger alone: ``summary.json``,
``REPORT.md``, ``rows.png`` (every row per task, mean over seeds with its 95 % interval),
``claims.png`` and the per-item files ``items/<task>/<row>.loglik.json.gz``
(:mod:`recipes.study.ledger`). Rewritten after every unit, so a stopped study has a true report
of what it has so far."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from scaleot_fed.config import as_dict
from scaleot_fed.files import write_atomic
from scaleot_fed.rundir import write_json
from scaleot_fed.stats import Comparison, correct_from_scores, paired_bootstrap, spearman

from . import ledger
from .config import (
    METRICS,
    OWNER_ROWS,
    StudyConfig,
    chosen_rate,
    lowest_dev_loss,
    mode_sweep_rows,
    seeded,
    task_folder,
    zero_shot_key,
)
from .federation_report import federation_table, owner_comparison, owner_entry

FAMILY_ORDER = ("full_zero_shot", "full_finetune")
POOLED = "all (mean over tasks)"
"""The line of a claim over every task (each task weighing the same)."""


def load_rows(out: Path, task: str, results: Path | None = None) -> dict[str, dict]:
    """Every finished row of ``task``, by key: the run folder's, and the ledger's in ``results``
    that the run folder lacks (a fresh checkout has only those)."""
    folder = out / task_folder(task) / "rows"
    found = {p.stem.replace("__", "/"): json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} \
        if folder.is_dir() else {}
    return (ledger.ledger_rows(results, task) if results else {}) | found


class _Resolver:
    """Row families (a row over its seeds, as claims name them) resolved to rows of one task."""

    def __init__(self, config: StudyConfig, rows: dict[str, dict], metric: str) -> None:
        self.config, self.rows, self.metric = config, rows, metric
        self.seeds = config.study.seeds

    def keys(self, family: str) -> list[str]:
        """The family's row keys that exist, one per seed (in seed order)."""
        return [k for _, k in self.seeded_keys(family)]

    def seeded_keys(self, family: str) -> list[tuple[int | None, str]]:
        """``(seed, key)`` of the family's rows that exist (seed ``None``: a row no seed changes)."""
        return [(s, k) for s, k in self.planned_keys(family) if k in self.rows]

    def expected_seeds(self, family: str) -> int:
        """How many seeds the family has once the grid is done (1: a row no seed changes)."""
        return len(self.planned_keys(family)) or len(self.seeds)  # (a sweep not yet decided: every seed)

    def planned_keys(self, family: str) -> list[tuple[int | None, str]]:
        """``(seed, key)`` of every row of the family the grid makes (none for a sweep not yet decided)."""
        study = self.config.study
        if family == "full_zero_shot":
            keys = [(None, "full_zero_shot")]
        elif family == "full_finetune":
            rate = chosen_rate(_Cache(self.rows), "full_finetune", study.full_finetune_lrs, self.seeds[0], False)
            keys = [] if rate is None else [(s, f"full_finetune/lr{rate:g}/seed{s}/row") for s in self.seeds]
        else:
            cell, row = family.rsplit("/", 1)
            name = cell.split(":")[0]
            if row == "emulator_attack":
                rate = chosen_rate(_Cache(self.rows), f"{name}/attack", study.attack_lrs, self.seeds[0], True)
                keys = [] if rate is None else [(s, f"{name}/attack/lr{rate:g}/seed{s}/emulator_attack")
                                                for s in self.seeds]
            elif row == "emulator_zero_shot":
                section = next(e for e in self.config.emulators if e.name == name)
                keys = ([(s, zero_shot_key(section, s)) for s in self.seeds] if seeded(section)
                        else [(None, zero_shot_key(section, self.seeds[0]))])
            elif row in OWNER_ROWS:  # from the plug-in rows' per-owner items
                keys = [(s, f"{cell}/seed{s}/plug_in") for s in self.seeds]
            else:
                keys = [(s, f"{cell}/seed{s}/{row}") for s in self.seeds]
        return keys

    def groups(self, family: str) -> tuple[list[list[np.ndarray]], list, list] | None:
        """An owner row's per-item scores in the task's metric, per seed and owner (each owner's
        held-out items), its seeds, and per seed the owners' gold answers (two sides compared on the
        same owners' items must have the same); ``None`` while no seed has them."""
        found = {s: self.rows[k]["owners"] for s, k in self.seeded_keys(family) if self.rows[k].get("owners")}
        if not found:
            return None
        owners = {s: sorted(o, key=int) for s, o in found.items()}
        return ([[self._scores(found[s][o]) for o in owners[s]] for s in found], list(found),
                [[found[s][o]["gold"] for o in owners[s]] for s in found])

    def matrix(self, family: str) -> tuple[np.ndarray, list] | None:
        """``(seeds, items)`` per-item scores of the family in the task's metric (``gap``: plug-in
        minus emulator fine-tuned, seed by seed) and the seeds of its rows; ``None`` while it has
        no finished seed."""
        if family.endswith("/gap"):
            cell = family.rsplit("/", 1)[0]
            found = {s: (self._correct(f"{cell}/seed{s}/plug_in"), self._correct(f"{cell}/seed{s}/emulator_finetune"))
                     for s in self.seeds}
            found = {s: p - e for s, (p, e) in found.items() if p is not None and e is not None}
        else:
            found = {s: self._correct(k) for s, k in self.seeded_keys(family)}
        return (np.stack(list(found.values())), list(found)) if found else None

    def _correct(self, key: str) -> np.ndarray | None:
        row = self.rows.get(key)
        return None if row is None or "items" not in row else self._scores(row["items"])

    def _scores(self, items: dict) -> np.ndarray:
        """Per item, 1.0 where right in the task's metric (an item record: ``loglik``, ``gold``, ...)."""
        lengths = items["choice_chars"] if self.metric == "acc_norm" else None
        return correct_from_scores(items["loglik"], items["gold"], lengths)

    def sources(self, family: str, seeds: list) -> list[str]:
        """The row keys the family's scores at ``seeds`` come from (a gap: both rows per seed)."""
        if family.endswith("/gap"):
            cell = family.rsplit("/", 1)[0]
            return [f"{cell}/seed{s}/{row}" for s in seeds for row in ("plug_in", "emulator_finetune")]
        return [k for s, k in self.seeded_keys(family) if s in seeds or s is None]

    def other(self, family: str) -> float | None:
        """The family's mean over seeds in the other metric."""
        other = next(m for m in METRICS if m != self.metric)
        values = [self.rows[k][other] for k in self.keys(family) if other in self.rows[k]]
        return float(np.mean(values)) if values and not family.endswith("/gap") else None


class _Cache:
    """The ``get`` of a row cache over an in-memory dict (what :func:`chosen_rate` reads)."""

    def __init__(self, rows: dict[str, dict]) -> None:
        self.rows = rows

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)


def families(config: StudyConfig) -> list[str]:
    """Every row family of the grid, in report order."""
    from .config import row_families

    known = row_families(config)
    return [f for f in FAMILY_ORDER if f in known] + sorted(known - set(FAMILY_ORDER))


def write_report(config: StudyConfig, out: Path, results: Path, facts: dict | None = None,
                 merge_ledger: bool = True) -> dict:
    """Build the summary from ``out``'s rows and write it with ``REPORT.md``, the plots, the
    per-item files and the ledger to ``results``. ``merge_ledger``: add the ledger's rows that
    ``out`` lacks (a running study has restored them into ``out`` already). Returns the summary."""
    study = config.study
    records = ledger.record(out, results, as_dict(config))
    rows_by_task = {t: load_rows(out, t, results if merge_ledger else None) for t in study.tasks}
    table, claims, n_eval, items_files = {}, [], {}, {}
    resolvers = {t: _Resolver(config, rows_by_task[t], study.metric_of(t)) for t in study.tasks}
    for task, resolver in resolvers.items():
        n_eval[task] = next((r["n"] for r in rows_by_task[task].values() if "n" in r), 0)
        items_files[task] = ledger.write_items(rows_by_task[task], results / "items" / task_folder(task))
        for family in families(config):
            if family.rsplit("/", 1)[-1] in OWNER_ROWS:
                if (entry := owner_entry(family, resolver, study.resamples)) is not None:
                    table.setdefault(family, {})[task] = entry | {"metric": study.metric_of(task)}
                continue
            found = resolver.matrix(family)
            if found is None:
                continue
            m = found[0]
            c = bootstrap(m, np.zeros(m.shape[1]), study.resamples)
            table.setdefault(family, {})[task] = {
                "metric": study.metric_of(task), "mean": c.difference, "ci95": list(c.ci95), "seeds": int(m.shape[0]),
                "per_seed": [float(v) for v in m.mean(axis=1)], "per_seed_seeds": found[1],
                "other_metric_mean": resolver.other(family), "rows": resolver.sources(family, found[1])}
    for claim in config.claims:
        claims += _claim(claim, resolvers, study)
    # the sensitivity table: every claim decided again in the other metric (not the verdicts')
    others = {t: _Resolver(config, rows_by_task[t], next(m for m in METRICS if m != study.metric_of(t)))
              for t in study.tasks}
    sensitivity = [c for claim in config.claims for c in _claim(claim, others, study)]
    pending = [_label(c) for c in config.claims
               if not any(d["claim"] == c.claim and d.get("mode") == c.mode for d in claims)]
    summary = {
        "model": study.model, "tasks": study.tasks, "seeds": study.seeds, "n_eval": n_eval,
        "random_subsets": study.random_subsets,
        "metric": {t: study.metric_of(t) for t in study.tasks}, "finetune": _plain(config.finetune),
        "eval_split": {t: study.eval_split_of(t) for t in study.tasks}, "modes": study.modes,
        **({"mode_tasks": study.mode_tasks} if study.mode_tasks else {}),
        "mode_lrs": {m: study.mode_lrs.get(m, config.finetune.lr) for m in study.modes + study.variant_modes},
        "rows": table, "claims": claims, "claims_other_metric": sensitivity, "pending_claims": pending,
        **({"federations": federation_table(config, resolvers)} if config.federations else {}),
        "sweeps": _sweeps(config, rows_by_task),
        **({"stage1_stability": stage1_stability(records)} if any(e.needs_importance for e in config.emulators) else {}),
        "budgets": budgets(records, facts or {}),
        **({"earlier_builds": found} if (found := ledger.earlier_builds(records)) else {}),
        "compute_seconds": ledger.compute_seconds(results), "items_files": items_files, "resamples": study.resamples,
    }
    from .federation_report import plot_convergence
    from .markdown import plot_claims, plot_rows, report_markdown

    write_json(results / "summary.json", summary)
    write_atomic(results / "REPORT.md", report_markdown(summary))
    plot_rows(summary, results / "rows.png")
    plot_claims(summary, results / "claims.png")
    if config.federations:
        plot_convergence(summary, results / "federations.png")
    return summary


def _plain(section) -> dict:
    from scaleot_fed.config import as_dict

    return as_dict(section)


def _label(claim) -> str:
    return claim.claim + (f" [{claim.mode}]" if claim.mode else "")


def _claim(claim, resolvers: dict[str, _Resolver], study) -> list[dict]:
    """The claim per task with both sides scored, and over all tasks (the mean of the tasks'
    differences, items drawn within each task) once every task has both sides from the same seeds.
    Sides made at the same seeds are paired by seed in the bootstrap (:func:`paired_bootstrap`)."""
    found, sides = [], {}
    modes = {claim.mode} | {side.rsplit("/", 1)[0].partition(":")[2] for side in (claim.a, claim.b)} - {None, ""}
    resolvers = {t: r for t, r in resolvers.items() if all(t in study.tasks_of(m) for m in modes)}  # (its modes' tasks)
    if claim.a.rsplit("/", 1)[-1] in OWNER_ROWS:  # per owner: on the same owners' items
        return _owner_claim(claim, resolvers, study)
    for task, resolver in resolvers.items():
        a, b = resolver.matrix(claim.a), resolver.matrix(claim.b)
        if a is None or b is None:
            continue
        sides[task] = (a, b)
        expected = [resolver.expected_seeds(claim.a), resolver.expected_seeds(claim.b)]
        found.append(_decide(claim, task, a[0], b[0], study.resamples, pair=_paired(a[1], b[1]))
                     | {"seeds_expected": expected})
    seeds = {(tuple(a[1]), tuple(b[1])) for a, b in sides.values()}
    if len(sides) == len(resolvers) > 1 and len(seeds) == 1:
        (sa, sb), = seeds
        for name, tasks in _pools(list(sides), study).items():
            a = np.concatenate([sides[t][0][0] for t in tasks], axis=1)
            b = np.concatenate([sides[t][1][0] for t in tasks], axis=1)
            strata = [sides[t][0][0].shape[1] for t in tasks]
            found.append(_decide(claim, name, a, b, study.resamples, strata, _paired(list(sa), list(sb)))
                         | {"seeds_expected": found[-1]["seeds_expected"], "tasks": tasks})
    return found


def _pools(tasks: list[str], study) -> dict[str, list[str]]:
    """The pools of tasks a claim is decided over besides each task: all of them and, where tasks
    were added after the first row, all but those."""
    pools = {POOLED: tasks}
    first = [t for t in tasks if t not in study.added_tasks]
    if study.added_tasks and len(first) > 1:  # a task added after the first row: the verdict without it too
        pools[f"all but {', '.join(study.added_tasks)} (mean over tasks)"] = first
    return pools


def _owner_claim(claim, resolvers: dict[str, _Resolver], study) -> list[dict]:
    """An owner claim per task and, once every task has both sides at the same seeds, over the
    tasks (each weighing the same, :func:`owner_comparison`)."""
    found = []
    for task, resolver in resolvers.items():
        if (c := owner_comparison(claim, [resolver], study.resamples)) is not None:
            found.append(_entry(claim, task, c, True) | {"interval": c.interval, "seeds_expected": [
                resolver.expected_seeds(claim.a), resolver.expected_seeds(claim.b)]})
    pools = _pools(list(resolvers), study) if len(found) == len(resolvers) > 1 else {}
    for name, tasks in pools.items():  # (none unless every task pools: the same seeds on all of them)
        c = owner_comparison(claim, [resolvers[t] for t in tasks], study.resamples)
        if c is None:
            break
        found.append(_entry(claim, name, c, True) | {"interval": c.interval, "tasks": tasks,
                                                     "seeds_expected": found[-1]["seeds_expected"]})
    return found


def _paired(a_seeds: list, b_seeds: list) -> bool:
    """Whether two sides' rows come from the same seeds, in the same order (then paired by seed)."""
    return len(a_seeds) > 1 and list(a_seeds) == list(b_seeds) and None not in a_seeds


def _decide(claim, task: str, a: np.ndarray, b: np.ndarray, resamples: int, strata: list[int] | None = None,
            pair: bool = False) -> dict:
    return _entry(claim, task, bootstrap(a, b, resamples, strata, pair), pair)


def _entry(claim, task: str, c: Comparison, pair: bool) -> dict:
    """A claim's line: its comparison on ``task`` (a task, or a pool of tasks) and the verdict."""
    return {"claim": claim.claim, "mode": claim.mode, "task": task, "a": claim.a, "b": claim.b, "kind": claim.kind,
            "margin": claim.margin, "difference": c.difference, "ci95": list(c.ci95), "n": c.n,
            "seeds": list(c.seeds), "paired_seeds": pair, "verdict": c.verdict(claim.kind, claim.margin)}


_BOOTSTRAPS: dict[str, Comparison] = {}


def bootstrap(a: np.ndarray, b: np.ndarray, resamples: int, strata: list[int] | None = None,
              pair_seeds: bool = False) -> Comparison:
    """:func:`paired_bootstrap`, remembered by its inputs: the study rewrites its report after every
    unit, and a unit changes a few rows of a report whose bootstraps draw ~2e9 items in all."""
    digest = hashlib.sha256(repr((a.shape, b.shape, resamples, strata, pair_seeds)).encode())
    for x in (a, b):
        digest.update(np.ascontiguousarray(x, dtype=float).tobytes())
    key = digest.hexdigest()
    if key not in _BOOTSTRAPS:
        _BOOTSTRAPS[key] = paired_bootstrap(a, b, resamples, strata=strata, pair_seeds=pair_seeds)
    return _BOOTSTRAPS[key]


def _sweeps(config: StudyConfig, rows_by_task: dict[str, dict]) -> dict:
    """Per task, every learning rate of the full fine-tuning and attack sweeps at the first seed."""
    study, seed = config.study, config.study.seeds[0]
    swept = [("full_finetune", study.full_finetune_lrs, "row")]
    if study.attack_emulator:
        swept.append((f"{study.attack_emulator}/attack", study.attack_lrs, "emulator_attack"))
    out: dict = {}
    for task, rows in rows_by_task.items():
        for name, lrs, leaf in swept:
            for lr in lrs:
                row = rows.get(f"{name}/lr{lr:g}/seed{seed}/{leaf}")
                if row:
                    out.setdefault(name, {}).setdefault(task, []).append(
                        {"lr": lr, "acc": row["acc"], "acc_norm": row["acc_norm"], "best_dev_loss": row.get("best_dev_loss")})
            chosen = chosen_rate(_Cache(rows), name, lrs, seed, leaf != "row")
            if chosen is not None:
                out[name][task + " chosen"] = chosen
    task = study.sweep_task or study.tasks[0]
    for mode, lrs in study.mode_sweeps.items():  # dev loss only: no item was scored
        rows = mode_sweep_rows(_Cache(rows_by_task.get(task, {})), mode, lrs, seed)
        found = [{"lr": lr, "best_dev_loss": row["best_dev_loss"], "initial_dev_loss": row.get("initial_dev_loss")}
                 for lr, row in rows.items() if row]
        if found:
            out.setdefault(f"mode {mode}", {})[task] = found
            if (chosen := lowest_dev_loss(rows)) is not None:
                out[f"mode {mode}"][task + " chosen"] = chosen
    return out


def stage1_stability(records: Path) -> list[dict]:
    """Per stage-1 setting (N_a, alpha): how much the seeds agree. Spearman correlation of the
    scores of every pair of seeds, and the share of the replaced set (the ``alpha`` share with the
    lowest scores, what the emulator replaces) two seeds have in common; for the ranking the
    emulators were built from and for the RL scores."""
    found = []
    for folder in sorted((records / "stage1").glob("*")):  # the ledger's stage-1 records
        metas = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("seed*.json"))}
        if len(metas) < 2:
            continue
        alpha = next(iter(metas.values()))["config"]["alpha"]
        entry: dict = {"setting": folder.name, "seeds": list(metas), "alpha": alpha}
        for kind in ("scores", "rl_scores"):
            per_seed = {s: {int(k): v for k, v in m[kind].items()} for s, m in metas.items() if m.get(kind)}
            if len(per_seed) < 2:  # (artifacts made before RL scores were kept apart have none)
                continue
            names = list(per_seed)
            blocks = sorted(next(iter(per_seed.values())))
            k = int(round(alpha * len(blocks)))
            replaced = {s: set(sorted(blocks, key=lambda b, s=s: (per_seed[s][b], b))[:k]) for s in names}
            pairs = [(x, y) for i, x in enumerate(names) for y in names[i + 1 :]]
            entry[kind] = {
                "spearman": {f"{x}-{y}": spearman([per_seed[x][b] for b in blocks], [per_seed[y][b] for b in blocks])
                             for x, y in pairs},
                "overlap": {f"{x}-{y}": len(replaced[x] & replaced[y]) / max(1, k) for x, y in pairs},
                "replaced": {s: sorted(r) for s, r in replaced.items()},
                "in_every_seed": sorted(set.intersection(*replaced.values())),
            }
            entry[kind] |= {f"{m}_mean": float(np.mean(list(entry[kind][m].values()))) for m in ("spearman", "overlap")}
        entry["heldout"] = {s: m["evaluation"] for s, m in metas.items()}
        entry["seconds"] = {s: m["cost"]["seconds"] for s, m in metas.items()}
        entry["ranking_fit"] = {s: {k: m["ranking_fit"][k] for k in ("candidates", "batches", "r2")}
                                for s, m in metas.items() if m.get("ranking_fit")}
        found.append(entry)
    return found


def budgets(records: Path, facts: dict) -> dict:
    """Stage 1 vs the distillation, per seed: seconds and FLOPs. FLOPs = 2 x parameters a token
    passes through, per forward token. Stage 1 runs candidates with the ``alpha`` share of the
    middle replaced (harmonizers ~free) and an LM head over every position; its backward pass
    through frozen weights computes activation gradients only (x2 in all). The distillation runs
    the teacher forward (no head) and the student forward and backward with weight gradients (x3),
    head included."""
    if not facts:
        return {}
    block, head, layers = facts["block_params"], facts["head_params"], facts["layers"]
    found: dict = {"stage1": {}, "distillation": {}}
    for path in sorted((records / "stage1").glob("*/seed*.json")):
        m = json.loads(path.read_text())
        kept = layers - m["config"]["alpha"] * len(m["middle_layers"])
        fit = m.get("ranking_fit") or {}
        forward = m["cost"]["tokens_forward_only"] + (0 if "tokens" in fit else  # made before fits were counted
                                                      fit.get("candidates", 0) * fit.get("batches", 0)
                                                      * m["config"]["batch_size"] * m["config"]["block_size"])
        flops = 2 * (kept * block + head) * (forward + 2 * m["cost"]["tokens_forward_backward"])
        found["stage1"][f"{path.parent.name}/{path.stem}"] = {"seconds": m["cost"]["seconds"], "flops": flops}
    for path in sorted((records / "emulators").glob("seed*/*.json")):
        m = json.loads(path.read_text())
        cost = m.get("build_cost") or {}
        if cost.get("kind") != "distillation":
            continue
        student = len(m.get("layout", [])) or layers
        flops = 2 * layers * block * cost["tokens_forward_only"] + 6 * (student * block + head) * cost["tokens_forward_backward"]
        found["distillation"][f"{path.stem}/{path.parent.name}"] = {
            "seconds": cost["seconds"], "flops": flops}
    return found


def report_study(config: StudyConfig) -> dict:
    """Rewrite the report from the rows on disk, running nothing (it only reads the run folder and
    the ledger, so it may run beside the study itself, or in a fresh checkout from the committed
    results alone). Returns the summary."""
    from scaleot_fed.errors import ConfigError
    from scaleot_fed.models import load_model

    from .config import GRID_EXTENT
    from .costs import model_facts
    from .data import TASK_DATA

    out = Path(config.study.out)
    results = Path(config.study.results or out)
    if not (out / "config.json").exists() and not ledger.check_config(results, as_dict(config), GRID_EXTENT + TASK_DATA):
        raise ConfigError(f"{out} holds no study yet; run `scaleot-fed study --config ...` first")
    return write_report(config, out, results, model_facts(load_model(config.study.model).model))
