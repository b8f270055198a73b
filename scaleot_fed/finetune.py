"""Fine-tuning of adapter blocks on multiple-choice items: the data owner's local training.

Modes (what becomes trainable, always inside the chosen blocks only):

* ``full``: every parameter of the blocks;
* ``lora``: peft LoRA on every linear projection of the blocks;
* ``adapter``: bottleneck adapters after each block's MLP (:mod:`~scaleot_fed.bottleneck`);
* ``bitfit``: biases and normalisation weights of the blocks (Llama blocks have no biases, so
  there it is the norms).

Each training example is context + ``" " + gold choice``, tokenised exactly as in scoring, with
the loss on the answer tokens only.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import Architecture, architecture_of, get_layers
from .batching import LengthBatches
from .devices import Placement, seeded
from .errors import ConfigError
from .evaluate import TARGET_DELIMITER, encode_pair
from .heads import answer_token_loss
from .tasks import MCItem
from .train_state import Checkpoint, Progress, fingerprint, load_trainable_state, resume, snapshot

MODES = ("full", "lora", "adapter", "bitfit")
SCHEDULES = ("cosine", "linear", "constant")
IGNORE = -100


@dataclass
class FinetuneConfig(Placement):
    """Local training knobs (one data owner); ``device`` and ``dtype`` from :class:`Placement`."""

    mode: str = "lora"
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: str = "cosine"
    max_length: int = 256
    """Tokens per example; longer contexts lose tokens on the left (as in scoring)."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    adapter_size: int = 64
    """Bottleneck width in ``adapter`` mode."""
    eval_every: int = 25
    eval_items: int = 64
    """Validation items for the loss that picks the best checkpoint."""
    select_best: bool = True
    """Restore the state with the lowest validation loss at the end (federated clients return
    their last state instead)."""
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ConfigError(f"unknown fine-tuning mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("steps", "batch_size", "grad_accum", "max_length", "lora_r", "adapter_size", "eval_every", "eval_items"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_alpha <= 0 or self.weight_decay < 0:
            raise ConfigError(f"lora_alpha must be > 0 and weight_decay >= 0, got {self.lora_alpha}, {self.weight_decay}")


# ----------------------------------------------------------------------------- data


def encode_example(tokenizer, item: MCItem, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of context + gold answer; labels are IGNORE outside the answer.

    Truncation rule: keep the last ``max_length`` tokens of context + answer (the context loses
    tokens on the left, as in scoring); an answer that alone exceeds ``max_length`` keeps its
    first ``max_length`` tokens and no context.
    """
    ctx, cont = encode_pair(tokenizer, item.context, TARGET_DELIMITER + item.choices[item.gold])
    if len(cont) >= max_length:
        return cont[:max_length], cont[:max_length]
    ids = (ctx + cont)[-max_length:]
    labels = [IGNORE] * (len(ids) - len(cont)) + cont
    return ids, labels


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------- what trains


def _block_linear_names(model: nn.Module, arch: Architecture, positions: list[int]) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    names = []
    for p in positions:
        prefix = f"{arch.layers_path}.{p}."
        for name, module in get_layers(model, arch)[p].named_modules():
            if isinstance(module, (nn.Linear, Conv1D)):
                names.append(prefix + name)
    return names


def make_trainable(model: nn.Module, positions: list[int], config: FinetuneConfig) -> nn.Module:
    """Freeze everything, then open the chosen mode's parameters inside blocks ``positions``.

    New parameters (LoRA's A, bottleneck adapters) are drawn from ``config.seed``, without
    touching the global random state: the same config starts from the same weights.
    Returns the model to train (a ``PeftModel`` for LoRA, else ``model`` itself).
    """
    with seeded(config.seed, next(model.parameters()).device):
        return _open_parameters(model, positions, config)


def _open_parameters(model: nn.Module, positions: list[int], config: FinetuneConfig) -> nn.Module:
    arch = architecture_of(model)
    for param in model.parameters():
        param.requires_grad_(False)
    blocks = get_layers(model, arch)
    if config.mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = _block_linear_names(model, arch, positions)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets, fan_in_fan_out=arch.conv1d_projections)
        return get_peft_model(model, lora)
    if config.mode == "adapter":
        from .bottleneck import add_bottleneck_adapters

        add_bottleneck_adapters(model, positions, config.adapter_size)
        for name, param in model.named_parameters():
            param.requires_grad_(".bottleneck." in name)
        return model
    for p in positions:
        for name, param in blocks[p].named_parameters():
            if config.mode == "full" or name.endswith("bias") or "norm" in name or "ln_" in name:
                param.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"mode {config.mode!r} leaves nothing trainable in blocks {positions}")
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, detached copies (what a data owner sends back)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- loop


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)


@torch.no_grad()
def answer_loss(model: nn.Module, tokenizer, items: list[MCItem], config: FinetuneConfig) -> float:
    """Mean loss per answer token over ``items`` (the validation criterion)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total = count = 0.0
    was_training = model.training
    model.eval()
    for start in range(0, len(items), config.batch_size):
        batch = collate([encode_example(tokenizer, i, config.max_length) for i in items[start : start + config.batch_size]], pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            loss, n = answer_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / count


@dataclass
class FinetuneResult:
    """What a local training run did."""

    initial_val_loss: float
    best_val_loss: float
    best_step: int
    history: list[dict] = field(default_factory=list)
    trainable_params: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _trained_parameters(model: nn.Module, train_items: list[MCItem], val_items: list[MCItem]) -> list[nn.Parameter]:
    """The parameters :func:`finetune` trains; what makes training impossible is an error here."""
    if not train_items:
        raise ConfigError("no training items")
    if not val_items:
        raise ConfigError("no validation items")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: call make_trainable first")
    return params


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's ``mu/2 * sum ||w - w_start||^2`` (its gradient is ``mu * (w - w_start)``)."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))


def _optimizer(params: list[nn.Parameter], config: FinetuneConfig):
    """AdamW and its warmup + decay schedule."""
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.steps, warmup, config.schedule)
    )
    return optimizer, scheduler


class _Loop:
    """One run's moving parts, and its training step."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], config: FinetuneConfig,
                 examples: list[tuple[list[int], list[int]]], pad: int, proximal_mu: float) -> None:
        self.model, self.params, self.config, self.examples, self.pad = model, params, config, examples, pad
        self.device = params[0].device
        self.optimizer, self.scheduler = _optimizer(params, config)
        self.batches = LengthBatches([len(ids) for ids, _ in examples], config.batch_size, random.Random(config.seed))
        # FedProx's anchor is the start of this call: on resume, the weights the caller handed in again
        self.anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
        self.proximal_mu = proximal_mu

    def step(self) -> tuple[float, int]:
        """One optimizer step over ``grad_accum`` batches (answer-token loss, plus FedProx's term):
        its loss and the tokens it read."""
        self.optimizer.zero_grad(set_to_none=True)
        total, tokens = 0.0, 0
        for _ in range(self.config.grad_accum):
            batch = {k: v.to(self.device) for k, v in collate(
                [self.examples[i] for i in next(self.batches)], self.pad).items()}
            loss, _ = answer_token_loss(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            if self.anchor is not None:
                loss = loss + proximal_term(self.params, self.anchor, self.proximal_mu)
            loss = loss / self.config.grad_accum
            loss.backward()
            total, tokens = total + loss.item(), tokens + int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        return total, tokens


def finetune(model: nn.Module, tokenizer, train_items: list[MCItem], val_items: list[MCItem],
             config: FinetuneConfig, progress: bool = True, proximal_mu: float = 0.0,
             checkpoint: Checkpoint | None = None) -> FinetuneResult:
    """Train the parameters that require grad (see :func:`make_trainable`) on ``train_items``.

    AdamW with warmup and schedule, gradient accumulation, length-bucketed batches in a seeded
    random order (:mod:`scaleot_fed.batching`), the LM head on answer positions only
    (:mod:`scaleot_fed.heads`); validation loss on the first ``eval_items`` of ``val_items`` every
    ``eval_every`` steps; the best state (by that loss, the initial one included) is restored at
    the end when ``config.select_best``.

    ``proximal_mu`` > 0 adds FedProx's ``mu/2 * ||w - w_start||^2`` over the trained parameters.
    ``checkpoint`` saves the run as it goes and at its end; called again on a model prepared the
    same way, the run resumes after the last saved step (:mod:`scaleot_fed.train_state`).
    """
    from tqdm.auto import tqdm

    params = _trained_parameters(model, train_items, val_items)
    config.apply(model)  # before the optimizer sees params
    torch.manual_seed(config.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = [encode_example(tokenizer, item, config.max_length) for item in train_items]
    val = val_items[: config.eval_items]
    loop = _Loop(model, params, config, examples, pad, proximal_mu)
    print_ = fingerprint(config, examples, model, proximal_mu) if checkpoint else ""
    saved = checkpoint.load(print_, loop.device) if checkpoint else None
    if saved is not None:
        run = resume(saved, model, loop.optimizer, loop.scheduler, loop.batches)
    else:
        initial = answer_loss(model, tokenizer, val, config)
        run = Progress(0, initial, initial, 0, trainable_state(model), [{"step": 0, "val_loss": initial}])
    model.train()
    start = saved_at = time.perf_counter()
    before = run.seconds
    bar = tqdm(range(run.step + 1, config.steps + 1), initial=run.step, total=config.steps,
               desc=f"finetune[{config.mode}]", disable=not progress, dynamic_ncols=True)
    for step in bar:
        step_loss, tokens = loop.step()
        run.step, run.tokens = step, run.tokens + tokens
        record = {"step": step, "train_loss": step_loss, "lr": loop.scheduler.get_last_lr()[0]}
        if step % config.eval_every == 0 or step == config.steps:
            record["val_loss"] = answer_loss(model, tokenizer, val, config)
            if record["val_loss"] < run.best:
                run.best, run.best_step, run.best_state = record["val_loss"], step, trainable_state(model)
        run.history.append(record)
        bar.set_postfix_str(f"loss={step_loss:.3f} best_val={run.best:.3f}")
        run.seconds = before + time.perf_counter() - start
        if checkpoint is not None and (step == config.steps or time.perf_counter() - saved_at >= checkpoint.every_s):
            checkpoint.save(snapshot(run, print_, model, loop.optimizer, loop.scheduler, loop.batches))
            saved_at = time.perf_counter()
    if config.select_best:
        load_trainable_state(model, run.best_state)
    else:
        run.best, run.best_step = run.history[-1].get("val_loss", run.best), config.steps
    model.eval()
    return FinetuneResult(initial_val_loss=run.initial, best_val_loss=run.best, best_step=run.best_step,
                          history=run.history, trainable_params=sum(p.numel() for p in params), tokens=run.tokens,
                          seconds=run.seconds)
