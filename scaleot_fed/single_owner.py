"""The single-owner recipe: prepare an emulator, fine-tune it, plug it in, score every row.

One piece of code for the rows of Offsite-Tuning's table, used by the offsite pipeline (one data
owner, rows cached in the run folder), the study (a grid of offsite runs) and the federated run's
final table (the federated aggregate, plus the same data trained centrally).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .artifact import LayerReplaceArtifact, load_artifact, save_artifact
from .attack import AttackConfig, attack_emulator
from .config import as_dict
from .devices import Placement
from .distill import DistillConfig, distill_emulator
from .emulator import MANIFEST, Emulator, EmulatorConfig, load_emulator, save_emulator
from .emulator.build import build_emulator
from .errors import ConfigError
from .evaluate import accuracy_from_scores, item_record, score_items
from .finetune import FinetuneConfig, FinetuneResult, finetune, make_trainable
from .layer_replace import LayerReplaceConfig, run_layer_replace
from .plugin import export_trained, plug_in_path
from .tasks import ANCHOR_SPLITS, MCItem, is_builtin, load_task
from .text import lambada_passages, token_blocks
from .train_state import Checkpoint

Log = Callable[[str], None]
Cache = Callable[[str, Callable[[], dict]], dict]
"""``(key, compute) -> row``: returns a stored row or computes and stores it."""


def no_cache(key: str, compute: Callable[[], dict]) -> dict:
    """A :data:`Cache` that computes every row."""
    return compute()


def no_checkpoint(key: str, kind: str = "training") -> None:
    """Rows whose training and scoring are not saved as they go (a stop starts them over)."""
    return None


@dataclass
class TaskRunConfig:
    """What every program's ``[run]`` names: the model, the task, how many items, where to write."""

    out: str = "runs/run"
    model: str = "smollm2-135m"
    task: str = "piqa"
    eval_task: str | None = None
    """Evaluation items from another task or file (required when ``task`` is a user file, which
    has a single split); default: the validation split of ``task``."""
    train_limit: int | None = 2000
    """Training items (first N of the train split)."""
    eval_limit: int | None = 200
    """Evaluation items (first N of the evaluation split, lm-eval's --limit; None: all)."""
    eval_split: str = "validation"
    """The split rows are scored on: ``validation``, ``test`` (ARC's and OpenBookQA's labelled test
    splits) or ``anchor`` (the one lm-eval scores the task on, :data:`scaleot_fed.tasks.ANCHOR_SPLITS`)."""
    eval_batch_size: int = 8
    eval_device: str = "auto"
    """Where the model owner scores models (full, emulator, plug-in): ``auto``, ``cpu``,
    ``cuda[:N]``, ``mps``."""
    eval_dtype: str = "float32"
    """Precision of the weights while scoring (``bfloat16`` halves their memory on a GPU)."""

    def __post_init__(self) -> None:
        self.eval_placement()  # checks both spellings
        for name in ("train_limit", "eval_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.eval_split not in ("validation", "test", "anchor"):
            raise ConfigError(f"eval_split is validation, test or anchor; got {self.eval_split!r}")

    def eval_placement(self) -> Placement:
        return Placement(self.eval_device, self.eval_dtype)

    def evaluation_items(self) -> list[MCItem]:
        """The items every row is scored on."""
        if self.eval_task is None and not is_builtin(self.task):
            raise ConfigError(f"[run] task {self.task!r} is a user file with a single split: "
                              "set eval_task to the evaluation file")
        task = self.eval_task or self.task
        split = ANCHOR_SPLITS.get(task, "validation") if self.eval_split == "anchor" else self.eval_split
        return load_task(task, split, self.eval_limit)


@dataclass
class NamedEmulatorConfig(EmulatorConfig):
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
        if self.distill and self.method != "uniform-drop":
            raise ConfigError("distill = true is Offsite-Tuning's emulator: it needs method = \"uniform-drop\"")
        if not self.name:
            self.name = f"{self.method}-a{self.alpha}-r{self.rank_keep_ratio}"

    def emulator_dir(self, out: Path) -> Path:
        """Where the emulator is: ``path`` if given, else ``out/<name>/emulator``."""
        return Path(self.path) if self.path else out / self.name / "emulator"


def prepare_emulator(section: NamedEmulatorConfig, full: nn.Module, tokenizer, layer_replace: LayerReplaceConfig,
                     model_name: str, out: Path, log: Log = print, distill: DistillConfig | None = None) -> Emulator:
    """The emulator of ``section`` in ``out/<name>/emulator``: loaded if already built, else built
    (running stage 1 into ``out/importance`` when it needs one and names no artifact, and the
    distillation when the section asks for it). What building cost goes into the manifest."""
    if section.path:
        return load_emulator(section.path)  # checked whole: one line naming what is missing
    edir = section.emulator_dir(out)
    if (edir / MANIFEST).exists():
        return load_emulator(edir)
    importance = _importance(section, full, tokenizer, layer_replace, model_name, out, log)
    base = EmulatorConfig(**{f.name: getattr(section, f.name) for f in dataclasses.fields(EmulatorConfig)})
    calibration = base.emulator_strategy.calibration(tokenizer, lambada_passages()) if base.emulator_strategy.needs_calibration else None
    emulator = build_emulator(full, base, importance, source_model=model_name, calibration=calibration)
    if importance is not None:
        emulator.manifest["build_cost"] = {"kind": "layer-replace"} | importance.meta["cost"]
    if section.distill:
        _distill(section, full, emulator, tokenizer, distill or DistillConfig(), log)
    save_emulator(emulator, edir, tokenizer=tokenizer)
    return load_emulator(edir)  # the saved artifact is what gets evaluated and trained


def _importance(section: NamedEmulatorConfig, full: nn.Module, tokenizer, layer_replace: LayerReplaceConfig,
                model_name: str, out: Path, log: Log) -> LayerReplaceArtifact | None:
    """The section's stage-1 artifact: the one it names, or one trained into ``out/importance``."""
    if not section.needs_importance:
        return None
    if section.importance:
        return load_artifact(section.importance)
    path = out / "importance"
    if not (path / "layer_replace.json").exists():
        lr = dataclasses.replace(layer_replace, num_adapter_layers=section.num_adapter_layers)
        log(f"  stage 1 (layer-replace, {lr.steps} steps) for {section.name} ...")
        ids = token_blocks(tokenizer, lambada_passages(), lr.block_size, max_blocks=lr.blocks_needed())
        save_artifact(run_layer_replace(full, ids, lr, model_name, progress=False), path)
    return load_artifact(path)


def _distill(section: NamedEmulatorConfig, full: nn.Module, emulator: Emulator, tokenizer, config: DistillConfig,
             log: Log) -> None:
    """Offsite-Tuning's distilled emulator: train the kept middle blocks to match the full model."""
    log(f"  distillation ({config.steps} steps) for {section.name} ...")
    ids = token_blocks(tokenizer, lambada_passages(), config.block_size,
                       max_blocks=config.steps * config.batch_size + config.batch_size)
    record = distill_emulator(full, emulator, ids, config)
    emulator.manifest["build_cost"] = {"kind": "distillation"} | {k: v for k, v in record.items() if k != "history"}
    emulator.manifest["distillation"] = {"config": as_dict(config), "kd_loss_first_last": [
        record["history"]["kd_loss"][0], record["history"]["kd_loss"][-1]]}


def trained_path(folder: Path, mode: str) -> Path:
    """Where trained adapter state goes: a peft folder for LoRA, one safetensors file otherwise."""
    return folder / ("trained_lora" if mode == "lora" else "trained.safetensors")


def finetune_stats(result: FinetuneResult) -> dict:
    """What a row keeps of its training run."""
    return {
        "initial_dev_loss": result.initial_val_loss,
        "best_dev_loss": result.best_val_loss,
        "best_step": result.best_step,
        "trainable_params": result.trainable_params,
        "train_tokens_per_s": result.tokens_per_second,
        "train_seconds": result.seconds,
    }


@dataclass
class SingleOwner:
    """One data owner's data and the model owner's full model: computes the rows of the table.

    ``cache`` stores finished rows (the offsite pipeline keeps them in its run folder, so a
    stopped run resumes); rows are named ``<row>`` for the full model and ``<emulator>/<row>``.
    ``checkpoint(key, kind)`` gives the training (``kind`` "training") and the scoring ("scoring")
    behind a row a place to save themselves as they go, so that a stop mid-way resumes there
    (:class:`scaleot_fed.rundir.RowCache` keeps them until the row is stored).
    """

    full: nn.Module
    tokenizer: object
    train: list[MCItem]
    dev: list[MCItem]
    evaluation: list[MCItem]
    finetune: FinetuneConfig
    eval_batch_size: int = 8
    progress: bool = False
    cache: Cache = no_cache
    checkpoint: Callable[[str, str], Checkpoint | None] = no_checkpoint
    eval_placement: Placement = dataclasses.field(default_factory=Placement)

    def evaluate(self, model: nn.Module, key: str) -> dict:
        """Row ``key``'s ``acc``, ``acc_norm``, ``n`` and, under ``items``, every item's per-choice
        log-likelihoods with its gold index and choice lengths: any metric can be recomputed from a
        row (:func:`scaleot_fed.report.write_results` moves them to ``items/``)."""
        self.eval_placement.apply(model, training=False)
        scores = score_items(model, self.tokenizer, self.evaluation, batch_size=self.eval_batch_size,
                             checkpoint=self.checkpoint(key, "scoring"))
        return accuracy_from_scores(self.evaluation, scores) | {"items": item_record(self.evaluation, scores)}

    def full_zero_shot(self) -> dict:
        return self.cache("full_zero_shot", lambda: self.evaluate(self.full, "full_zero_shot"))

    def full_finetune(self, key: str = "full_finetune", config: FinetuneConfig | None = None) -> dict:
        """Every block of a copy of the full model trained with the owner's method, or with
        ``config`` (the study's full-parameter sweep), cached as ``key``."""
        config = dataclasses.replace(config or self.finetune, eval_items=len(self.dev))

        def compute() -> dict:
            model = copy.deepcopy(self.full)
            trained = make_trainable(model, list(range(model.config.num_hidden_layers)), config)
            result = finetune(trained, self.tokenizer, self.train, self.dev, config, progress=self.progress,
                              checkpoint=self.checkpoint(key, "training"))
            return self.evaluate(trained, key) | finetune_stats(result) | {"lr": config.lr, "mode": config.mode}

        return self.cache(key, compute)

    def emulator_zero_shot(self, name: str, emulator: Emulator) -> dict:
        key = f"{name}/emulator_zero_shot"
        return self.cache(key, lambda: self.evaluate(emulator.model, key))

    def emulator_finetune_and_plug_in(self, name: str, emulator: Emulator, trained_path: Path) -> dict:
        """Train the emulator's adapter blocks (saved to ``trained_path``), score the emulator and
        the full model with them plugged in: ``{"emulator_finetune": ..., "plug_in": ...}``."""
        tuned, plugged = f"{name}/emulator_finetune", f"{name}/plug_in"

        def train() -> dict:
            trained = make_trainable(emulator.model, list(emulator.adapter_positions()), self.finetune)
            result = finetune(trained, self.tokenizer, self.train, self.dev, self.finetune, progress=self.progress,
                              checkpoint=self.checkpoint(tuned, "training"))
            export_trained(trained, emulator, trained_path)
            return self.evaluate(trained, tuned) | finetune_stats(result) | {
                "trained": str(trained_path), "lr": self.finetune.lr, "mode": self.finetune.mode}

        def plug() -> dict:
            if not trained_path.exists():
                raise ConfigError(f"{trained_path} is missing; delete the cached rows of {name} and rerun")
            return self.evaluate(plug_in_path(copy.deepcopy(self.full), emulator.manifest, trained_path), plugged)

        return {"emulator_finetune": self.cache(tuned, train), "plug_in": self.cache(plugged, plug)}

    def emulator_sweep(self, key: str, emulator: Emulator, config: FinetuneConfig, trained_path: Path) -> dict:
        """One rate of a mode sweep: the emulator's adapter blocks trained with ``config``, judged
        by dev loss alone (no item is scored), cached as ``key``; the trained state is kept at
        ``trained_path`` for a later look."""
        def compute() -> dict:
            trained = make_trainable(emulator.model, list(emulator.adapter_positions()), config)
            result = finetune(trained, self.tokenizer, self.train, self.dev, config, progress=self.progress,
                              checkpoint=self.checkpoint(key, "training"))
            export_trained(trained, emulator, trained_path)
            return finetune_stats(result) | {"lr": config.lr, "mode": config.mode, "history": result.history}

        return self.cache(key, compute)

    def attack(self, name: str, emulator_path: Path, config: AttackConfig) -> dict:
        """The model-privacy row: every weight of a fresh copy of the emulator trained."""
        key = f"{name}/emulator_attack"

        def compute() -> dict:
            attack_ft = dataclasses.replace(config, eval_items=len(self.dev))
            model, result = attack_emulator(emulator_path, self.train, self.dev, attack_ft, progress=self.progress,
                                            checkpoint=self.checkpoint(key, "training"))
            return self.evaluate(model, key) | finetune_stats(result)

        return self.cache(key, compute)
