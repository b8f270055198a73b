"""The one-data-owner offsite-tuning pipeline and its five-row table.

For one task and one or more emulators of the same full model:

=====================  =====================================================
Full zero-shot         the full model, untouched
Emulator zero-shot     the emulator, untouched
Full fine-tuning       the full model, all blocks trained with the same method
Emulator fine-tuned    the emulator after training its adapter blocks
Plug-in                the full model with those trained adapter blocks
=====================  =====================================================

and the privacy gap = Plug-in - Emulator fine-tuned (Offsite-Tuning's tables). Each row is
written to ``rows/`` as soon as it is known, so a stopped run continues where it was.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .attack import AttackConfig, attack_emulator
from .config import as_dict, from_dict, load_toml
from .distill import DistillConfig
from .emulator import EmulatorConfig, build_emulator, load_emulator, save_emulator
from .errors import ConfigError, ScaleOTError
from .evaluate import evaluate_multiple_choice
from .finetune import FinetuneConfig, finetune, make_trainable
from .layer_replace import LayerReplaceConfig, load_artifact, run_layer_replace, save_artifact
from .models import load_model
from .plugin import export_trained, plug_in_path
from .tasks import TASKS, load_task

ROWS = ("full_zero_shot", "emulator_zero_shot", "full_finetune", "emulator_finetune", "plug_in", "emulator_attack")
ROW_TITLES = {
    "full_zero_shot": "Full zero-shot",
    "emulator_zero_shot": "Emulator zero-shot",
    "full_finetune": "Full fine-tuning",
    "emulator_finetune": "Emulator fine-tuned",
    "plug_in": "Plug-in",
    "emulator_attack": "Attack (all emulator weights FT)",
}


@dataclass
class RunSection:
    """``[run]``: what to run on."""

    out: str = "runs/offsite"
    model: str = "smollm2-135m"
    task: str = "piqa"
    eval_task: str | None = None
    """Evaluation items from another task or file (required when ``task`` is a user file, which
    has a single split); default: the validation split of ``task``."""
    train_limit: int | None = 2000
    """Training items (first N of the train split)."""
    dev_items: int = 64
    """Items cut from the end of the training items to pick the best checkpoint (the evaluation
    split is never used for selection)."""
    eval_limit: int | None = 200
    """Evaluation items (first N of the validation split, lm-eval's --limit)."""
    eval_batch_size: int = 8
    full_finetune: bool = True
    """Compute the Full fine-tuning row (the most expensive one)."""
    attack: bool = False
    """Also the model-privacy row: a data owner fine-tunes every emulator weight (``[attack]``)."""

    def __post_init__(self) -> None:
        if self.dev_items < 1:
            raise ValueError(f"dev_items must be >= 1, got {self.dev_items}")
        for name in ("train_limit", "eval_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass
class EmulatorSection(EmulatorConfig):
    """One ``[[emulator]]``: an :class:`EmulatorConfig` plus a label and where its stage 1 is."""

    name: str = ""
    importance: str | None = None
    """Stage-1 artifact folder; when absent and needed, stage 1 runs with ``[layer_replace]``."""
    path: str | None = None
    """A ready emulator folder to use instead of building one (its manifest decides the rest)."""
    distill: bool = False
    """Offsite-Tuning's baseline: train the kept middle blocks by distillation (uniform-drop only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.distill and self.strategy != "uniform-drop":
            raise ConfigError("distill = true is Offsite-Tuning's emulator: it needs strategy = \"uniform-drop\"")
        if not self.name:
            self.name = f"{self.strategy}-a{self.alpha}-r{self.rank_keep_ratio}"


@dataclass
class OffsiteConfig:
    run: RunSection = field(default_factory=RunSection)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    layer_replace: LayerReplaceConfig = field(default_factory=LayerReplaceConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    emulators: list[EmulatorSection] = field(default_factory=lambda: [EmulatorSection()])
    attack: AttackConfig = field(default_factory=AttackConfig)


def read_pipeline_toml(path: str | Path, head: str, head_cls, overrides: dict | None = None,
                       default_emulator: bool = True) -> dict:
    """The tables shared by ``offsite`` and ``study`` files: ``[<head>]``, ``[finetune]``,
    ``[layer_replace]``, ``[distill]`` and ``[[emulator]]``, as keyword arguments of the config."""
    data = load_toml(path)
    known = {head, "finetune", "layer_replace", "distill", "emulator", "attack"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    emulators = data.get("emulator", [{}] if default_emulator else [])
    if not isinstance(emulators, list) or not emulators:
        raise ConfigError(f"{path}: give at least one [[emulator]] table")
    values = {
        head: from_dict(head_cls, dict(data.get(head, {})) | (overrides or {}), head),
        "finetune": from_dict(FinetuneConfig, data.get("finetune", {}), "finetune"),
        "layer_replace": from_dict(LayerReplaceConfig, data.get("layer_replace", {}), "layer_replace"),
        "distill": from_dict(DistillConfig, data.get("distill", {}), "distill"),
        "attack": from_dict(AttackConfig, data.get("attack", {}), "attack"),
        "emulators": [from_dict(EmulatorSection, e, f"emulator {i}") for i, e in enumerate(emulators)],
    }
    names = [e.name for e in values["emulators"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: emulator names must be unique, got {names}")
    return values


def load_offsite_config(path: str | Path, overrides: dict | None = None) -> OffsiteConfig:
    """Read an offsite TOML file: ``[run]``, ``[finetune]``, ``[layer_replace]``, ``[distill]``,
    ``[[emulator]]`` (``overrides`` replace ``[run]`` values)."""
    return OffsiteConfig(**read_pipeline_toml(path, "run", RunSection, overrides))


class _Rows:
    """Row results on disk, one JSON file each: written once, reused on resume."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "rows"
        self.dir.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict | None:
        path = self.dir / f"{key.replace('/', '__')}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: str, value: dict) -> dict:
        path = self.dir / f"{key.replace('/', '__')}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=1))
        tmp.replace(path)
        return value


def run_offsite(config: OffsiteConfig, progress: bool = True, log=print) -> dict:
    """Run (or resume) the pipeline; returns the results dict also written to ``results.json``."""
    run = config.run
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(as_dict(config), indent=1))
    rows = _Rows(out)

    # Data first: a bad task name fails before anything is loaded.
    train_all = load_task(run.task, "train", run.train_limit)
    if len(train_all) <= run.dev_items:
        raise ScaleOTError(f"{run.task}: {len(train_all)} training items, need more than dev_items={run.dev_items}")
    train, dev = train_all[: -run.dev_items], train_all[-run.dev_items :]
    if run.eval_task is None and run.task not in TASKS:
        raise ConfigError(f"[run] task {run.task!r} is a user file with a single split: set eval_task to the evaluation file")
    evaluation = load_task(run.eval_task or run.task, "validation", run.eval_limit)
    ft = dataclasses.replace(config.finetune, eval_items=len(dev))
    log(f"offsite: {run.model} on {run.task}: {len(train)} train, {len(dev)} dev, {len(evaluation)} eval items")

    loaded = load_model(run.model)
    full, tokenizer = loaded.model, loaded.tokenizer

    def evaluate(model) -> dict:
        return evaluate_multiple_choice(model, tokenizer, evaluation, batch_size=run.eval_batch_size)

    def cached(key: str, compute) -> dict:
        found = rows.get(key)
        if found is None:
            log(f"  computing {key} ...")
            found = rows.put(key, compute())
        log(f"  {key}: acc {found['acc']:.4f} acc_norm {found['acc_norm']:.4f}")
        return found

    shared = {"full_zero_shot": cached("full_zero_shot", lambda: evaluate(full))}
    if run.full_finetune:
        def full_ft() -> dict:
            model = copy.deepcopy(full)
            n = model.config.num_hidden_layers
            trained = make_trainable(model, list(range(n)), ft)
            result = finetune(trained, tokenizer, train, dev, ft, progress=progress)
            return evaluate(trained) | _ft_stats(result)

        shared["full_finetune"] = cached("full_finetune", full_ft)

    per_emulator = {}
    for section in config.emulators:
        edir = out / section.name
        emulator = prepare_emulator(section, full, loaded.tokenizer, config.layer_replace, run.model, out, log,
                                    config.distill)
        rows_e = {"emulator_zero_shot": cached(f"{section.name}/emulator_zero_shot", lambda: evaluate(emulator.model))}
        trained_path = edir / ("trained_lora" if ft.mode == "lora" else "trained.safetensors")

        def emu_ft() -> dict:
            trained = make_trainable(emulator.model, list(emulator.adapter_positions()), ft)
            result = finetune(trained, tokenizer, train, dev, ft, progress=progress)
            export_trained(trained, emulator, trained_path)
            return evaluate(trained) | _ft_stats(result) | {"trained": str(trained_path)}

        rows_e["emulator_finetune"] = cached(f"{section.name}/emulator_finetune", emu_ft)

        def plug() -> dict:
            if not trained_path.exists():
                raise ScaleOTError(f"{trained_path} is missing; delete {rows.dir} entries of {section.name} and rerun")
            plugged = plug_in_path(copy.deepcopy(full), emulator.manifest, trained_path)
            return evaluate(plugged)

        rows_e["plug_in"] = cached(f"{section.name}/plug_in", plug)
        extra = {}
        if run.attack:
            def attack() -> dict:
                attack_ft = dataclasses.replace(config.attack, eval_items=len(dev))
                model, result = attack_emulator(section.path or out / section.name / "emulator", train, dev, attack_ft,
                                                progress=progress)
                return evaluate(model) | _ft_stats(result)

            rows_e["emulator_attack"] = cached(f"{section.name}/emulator_attack", attack)
            extra["attack_gap"] = rows_e["plug_in"]["acc"] - rows_e["emulator_attack"]["acc"]
        per_emulator[section.name] = extra | {
            "config": as_dict(section),
            "rows": shared | rows_e,
            "gap": rows_e["plug_in"]["acc"] - rows_e["emulator_finetune"]["acc"],
            "gap_acc_norm": rows_e["plug_in"]["acc_norm"] - rows_e["emulator_finetune"]["acc_norm"],
            "num_params": emulator.manifest["num_params"],
            "source_num_params": emulator.manifest["source_num_params"],
            "build_cost": emulator.manifest.get("build_cost"),
        }

    results = {
        "model": run.model,
        "task": run.task,
        "n_train": len(train),
        "n_eval": len(evaluation),
        "finetune": as_dict(ft),
        "emulators": per_emulator,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown_table(results))
    plot_results(results, out / "results.png")
    return results


def _ft_stats(result) -> dict:
    return {
        "initial_dev_loss": result.initial_val_loss,
        "best_dev_loss": result.best_val_loss,
        "best_step": result.best_step,
        "trainable_params": result.trainable_params,
        "train_tokens_per_s": result.tokens_per_second,
        "train_seconds": result.seconds,
    }


def prepare_emulator(section: EmulatorSection, full, tokenizer, layer_replace: LayerReplaceConfig,
                     model_name: str, out: Path, log=print, distill: DistillConfig | None = None):
    """The emulator of ``section`` in ``out/<name>/emulator``: loaded if already built, else built
    (running stage 1 into ``out/importance`` when it needs one and names no artifact, and the
    distillation when the section asks for it). What building cost goes into the manifest."""
    if section.path:
        if not (Path(section.path) / "manifest.json").is_file():
            raise ConfigError(f"emulator path {section.path} is not an emulator folder (no manifest.json)")
        return load_emulator(section.path)
    edir = out / section.name / "emulator"
    if (edir / "manifest.json").exists():
        return load_emulator(edir)
    importance = None
    if section.needs_importance:
        if section.importance:
            importance = load_artifact(section.importance)
        else:
            path = out / "importance"
            if not (path / "layer_replace.json").exists():
                lr = dataclasses.replace(layer_replace, num_adapter_layers=section.num_adapter_layers)
                log(f"  stage 1 (layer-replace, {lr.steps} steps) for {section.name} ...")
                from .text import lambada_passages, token_blocks

                ids = token_blocks(tokenizer, lambada_passages(), lr.block_size, max_blocks=lr.blocks_needed())
                save_artifact(run_layer_replace(full, ids, lr, model_name, progress=False), path)
            importance = load_artifact(path)
    base = EmulatorConfig(section.strategy, section.num_adapter_layers, section.alpha, section.rank_keep_ratio)
    emulator = build_emulator(full, base, importance, source_model=model_name)
    if importance is not None:
        emulator.manifest["build_cost"] = {"kind": "layer-replace"} | importance.meta["cost"]
    if section.distill:
        from .distill import distill_emulator
        from .text import lambada_passages, token_blocks

        distill = distill or DistillConfig()
        log(f"  distillation ({distill.steps} steps) for {section.name} ...")
        ids = token_blocks(tokenizer, lambada_passages(), distill.block_size,
                           max_blocks=distill.steps * distill.batch_size + distill.batch_size)
        record = distill_emulator(full, emulator, ids, distill)
        emulator.manifest["build_cost"] = {"kind": "distillation"} | {k: v for k, v in record.items() if k != "history"}
        emulator.manifest["distillation"] = {"config": as_dict(distill), "kd_loss_first_last": [
            record["history"]["kd_loss"][0], record["history"]["kd_loss"][-1]]}
    save_emulator(emulator, edir, tokenizer=tokenizer)
    return load_emulator(edir)  # the saved artifact is what gets evaluated and trained


def markdown_table(results: dict) -> str:
    """The five rows (acc, with acc_norm in brackets) per emulator, plus the gap."""
    names = list(results["emulators"])
    lines = [
        f"# Offsite-tuning: {results['model']} on {results['task']}",
        "",
        f"{results['n_train']} training items, {results['n_eval']} evaluation items, "
        f"fine-tuning mode {results['finetune']['mode']}, {results['finetune']['steps']} steps. "
        "Accuracy in % (acc_norm in brackets).",
        "",
        "| row | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for row in ROWS:
        if row == "emulator_attack" and not any(row in results["emulators"][n]["rows"] for n in names):
            continue
        cells = []
        for name in names:
            r = results["emulators"][name]["rows"].get(row)
            cells.append("n/a" if r is None else f"{100 * r['acc']:.1f} ({100 * r['acc_norm']:.1f})")
        lines.append(f"| {ROW_TITLES[row]} | " + " | ".join(cells) + " |")
    gaps = [f"{100 * results['emulators'][n]['gap']:+.1f} ({100 * results['emulators'][n]['gap_acc_norm']:+.1f})" for n in names]
    lines.append("| **Gap** (plug-in - emulator FT) | " + " | ".join(gaps) + " |")
    if any("attack_gap" in results["emulators"][n] for n in names):
        attack = [f"{100 * results['emulators'][n]['attack_gap']:+.1f}" if "attack_gap" in results["emulators"][n]
                  else "n/a" for n in names]
        lines.append("| **Attack gap** (plug-in - attack) | " + " | ".join(attack) + " |")
    sizes = [f"{results['emulators'][n]['num_params'] / results['emulators'][n]['source_num_params']:.0%}" for n in names]
    lines.append("| emulator size / full | " + " | ".join(sizes) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: Path) -> None:
    """Grouped bar chart: the five rows for every emulator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["emulators"])
    rows = [r for r in ROWS if any(r in results["emulators"][n]["rows"] for n in names)]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(names), 4))
    for k, row in enumerate(rows):
        values = [100 * results["emulators"][n]["rows"].get(row, {}).get("acc", float("nan")) for n in names]
        ax.bar([i + (k - (len(rows) - 1) / 2) * width for i in range(len(names))], values, width, label=ROW_TITLES[row])
    ax.set_xticks(range(len(names)), [f"{n}\ngap {100 * results['emulators'][n]['gap']:+.1f}" for n in names])
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{results['model']} on {results['task']} (n={results['n_eval']})")
    ax.legend(fontsize=7, loc="lower right")
    low = min(100 * r["acc"] for e in results["emulators"].values() for r in e["rows"].values())
    ax.set_ylim(max(0, low - 10), None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
