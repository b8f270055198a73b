"""What the study's units cost, for its ETA and its budgets.

Costs are estimated block-token passes (a token through one decoder block, forward or backward),
counted with the model's tokenizer on each task's own items: tasks differ about six times in
tokens per choice (OpenBookQA ~7, HellaSwag ~40), so a count per item would misjudge every task
but the one it was fitted on. The ETA multiplies them by the rate the finished units measured.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from scaleot_fed.evaluate import TARGET_DELIMITER
from scaleot_fed.finetune import FinetuneConfig
from scaleot_fed.single_owner import NamedEmulatorConfig
from scaleot_fed.tasks import MCItem


@dataclass(frozen=True)
class TaskTokens:
    """Tokens a task's units push through the model (the ETA's weights, not a measurement)."""

    scoring: int
    """One scoring of the evaluation items: each context once, then its choices (the packed path)."""
    training: float
    """One fine-tuning run: its steps' batches, each padded to its longest example."""


def task_tokens(tokenizer, train: list[MCItem], evaluation: list[MCItem], finetune: FinetuneConfig) -> TaskTokens:
    """What a task's units push through the model: ``train`` and ``evaluation`` from :func:`task_items`."""
    contexts = tokenizer([i.context for i in evaluation])["input_ids"]
    choices = tokenizer([TARGET_DELIMITER + c for i in evaluation for c in i.choices])["input_ids"]
    examples = tokenizer([i.context + TARGET_DELIMITER + i.choices[i.gold] for i in train])["input_ids"]
    lengths = [min(len(ids), finetune.max_length) for ids in examples]
    random.Random(0).shuffle(lengths)  # batches of random examples, as training draws them
    size = finetune.batch_size
    padded = [max(lengths[i : i + size]) * len(lengths[i : i + size]) for i in range(0, len(lengths), size)]
    return TaskTokens(scoring=sum(map(len, contexts)) + sum(map(len, choices)),
                      training=finetune.steps * size * sum(padded) / len(lengths))


def emulator_blocks(layers: int, section: NamedEmulatorConfig) -> float:
    """Block-equivalents a token passes through in the emulator (for the ETA)."""
    middle = layers - section.num_adapter_layers
    return section.num_adapter_layers + middle * section.emulator_strategy.middle_runs(section.alpha) * (
        0.5 + 0.5 * section.rank_keep_ratio)


def unit_rate(log: list[dict], finished: float) -> tuple[float, str]:
    """Seconds per estimated block-token pass, as the compute ``log`` measured it, and where it
    comes from. The rate is the cost-weighted median of the units that logged their cost: a unit
    slowed by other work beside it (a CI run) moves it little. Before any unit did, it is the
    log's total seconds over ``finished`` (the cost of the units done), which errs long; 0.0
    before any unit has run."""
    timed = sorted((e["seconds"] / e["cost"], e["cost"]) for e in log if e.get("cost") and e["seconds"] > 0)
    if timed:
        half, seen = sum(c for _, c in timed) / 2, 0.0
        return next(r for r, c in timed if (seen := seen + c) >= half), f"{len(timed)} timed units (median)"
    seconds = sum(e["seconds"] for e in log)
    return (seconds / finished if finished > 0 and seconds > 0 else 0.0), "the compute log's total"


def eta_line(log: list[dict], finished: float, pending: list[tuple[str, float]]) -> str | None:
    """What is left, per task, at :func:`unit_rate` times each pending ``(label, cost)``;
    ``None`` before any unit has run."""
    rate, source = unit_rate(log, finished)
    if rate <= 0 or not pending:
        return None
    hours: dict[str, float] = {}
    for label, c in pending:  # "<task>: ..." or "stage 1 ..."
        group = label.split(":")[0] if ":" in label else "stage 1"
        hours[group] = hours.get(group, 0.0) + c * rate / 3600
    return (f"study: left at the rate of {source} ({rate * 1e6:.1f} s per M block-tokens): "
            + ", ".join(f"{k} {v:.1f} h" for k, v in hours.items()) + f"; {sum(hours.values()):.1f} h in all")


def model_facts(model) -> dict:
    """Parameters per block and in the LM head, and the block count (for the FLOP budgets)."""
    from scaleot_fed.arch import get_layers

    layers = get_layers(model)
    return {"block_params": sum(p.numel() for p in layers[0].parameters()), "layers": len(layers),
            "head_params": int(model.config.vocab_size) * int(model.config.hidden_size)}
