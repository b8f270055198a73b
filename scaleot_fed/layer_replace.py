"""Stage 1 of ScaleOT: Dynamic LayerReplace.

The model owner learns, on its own general text, (a) an importance score per middle block and
(b) one harmonizer per middle block that can stand in for it. Training alternates:

* a gradient step on the harmonizers: LM loss of one sampled candidate network, original weights
  frozen, so each harmonizer learns to replace its block in many contexts;
* an RL step on the scores: ``N_c`` candidates on a held-out batch, reward ``exp(-loss)``,
  advantage = reward minus the mean (standardised), ``s_i += lr * A * p_i (1 - p_i)`` for the
  blocks each candidate kept.

A candidate draws ``u_i ~ U(0, p_i)`` with ``p_i = sigmoid(s_i)``, splits the middle blocks in
consecutive groups and, in each group, keeps the blocks at or above the group median and replaces
the others by their harmonizers (about half per group).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .arch import architecture_of, get_layers
from .config import as_dict
from .errors import ConfigError, IntegrityError, ScaleOTError
from .harmonizer import Harmonizer
from .models import model_fingerprint

ARTIFACT_FORMAT = "scaleot-fed/layer-replace"
ARTIFACT_JSON = "layer_replace.json"
ARTIFACT_WEIGHTS = "harmonizers.safetensors"


@dataclass
class LayerReplaceConfig:
    """Knobs of Dynamic LayerReplace (defaults: checked on SmolLM2-135M, see DESIGN.md)."""

    num_adapter_layers: int = 4
    """Blocks kept as adapters (half bottom, half top); they get no score and no harmonizer."""
    steps: int = 150
    batch_size: int = 8
    block_size: int = 128
    """Tokens per training sequence."""
    group_size: int = 4
    num_candidates: int = 3
    rl_lr: float = 0.5
    harmonizer_rank: int = 64
    harmonizer_lr: float = 1e-3
    weight_decay: float = 0.0
    standardize_advantages: bool = True
    """At LM losses of 4-6 raw ``exp(-loss)`` advantages are ~1e-3 and scores barely move."""
    init_score: float = 0.0
    heldout_fraction: float = 0.1
    """Share of the token blocks held out for RL rewards and the final evaluation."""
    eval_batches: int = 4
    max_train_blocks: int | None = None
    """Cap on token blocks read from the corpus (None: as many as the steps need, at most all)."""
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "group_size", "num_candidates", "harmonizer_rank", "eval_batches")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_candidates < 2:
            raise ConfigError(f"num_candidates must be >= 2 (advantages compare candidates), got {self.num_candidates}")
        if self.block_size < 2:
            raise ConfigError(f"block_size must be >= 2 tokens, got {self.block_size}")
        if self.num_adapter_layers < 2 or self.num_adapter_layers % 2:
            raise ConfigError(f"num_adapter_layers must be a positive even number, got {self.num_adapter_layers}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.rl_lr < 0 or self.harmonizer_lr <= 0:
            raise ConfigError("rl_lr must be >= 0 and harmonizer_lr > 0")

    def blocks_needed(self) -> int:
        """Token blocks to read from the corpus: enough that training batches rarely repeat, plus
        the held-out share and the final evaluation."""
        if self.max_train_blocks:
            return self.max_train_blocks
        return int(self.steps * self.batch_size / (1 - self.heldout_fraction)) + self.batch_size * (self.eval_batches + 1)


def middle_layers(num_layers: int, num_adapter_layers: int) -> list[int]:
    """Indices of the non-adapter blocks for ``num_adapter_layers`` split bottom/top."""
    if num_adapter_layers % 2 or num_adapter_layers < 2:
        raise ConfigError(f"the number of adapter blocks must be a positive even number, got {num_adapter_layers}")
    if num_adapter_layers >= num_layers:
        raise ConfigError(
            f"the number of adapter blocks ({num_adapter_layers}) must be smaller than the model's "
            f"{num_layers} blocks"
        )
    half = num_adapter_layers // 2
    return list(range(half, num_layers - half))


def sample_candidate(
    scores: torch.Tensor, group_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Draw one candidate: a boolean keep-mask over the middle blocks.

    Parameters
    ----------
    scores:
        ``(n_middle,)`` importance scores ``s_i``.
    group_size:
        Blocks per consecutive group; each group keeps those at or above its median draw.
    """
    p = torch.sigmoid(scores)
    u = torch.rand(scores.shape, generator=generator) * p  # u_i ~ U(0, p_i)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for start in range(0, len(scores), group_size):
        group = u[start : start + group_size]
        keep[start : start + group_size] = group >= group.quantile(0.5)
    return keep


@contextlib.contextmanager
def swapped_blocks(model: nn.Module, replacements: dict[int, nn.Module]):
    """Temporarily put ``replacements[i]`` at block position ``i`` (no re-numbering needed:
    positions are unchanged and stand-ins use no KV cache)."""
    layers = get_layers(model)
    originals = {i: layers[i] for i in replacements}
    try:
        for i, module in replacements.items():
            layers[i] = module
        yield model
    finally:
        for i, module in originals.items():
            layers[i] = module


class _Identity(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of a ``(batch, seq)`` block of token ids."""
    return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


@dataclass
class LayerReplaceResult:
    """Scores, harmonizers and the record of one stage-1 run (what the artifact holds)."""

    scores: dict[int, float]
    harmonizers: dict[int, Harmonizer]
    config: LayerReplaceConfig
    source_model: str
    source_fingerprint: str
    architecture: str
    num_layers: int
    hidden_size: int
    history: dict[str, list] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    tokens_forward_backward: int = 0
    tokens_forward_only: int = 0

    def ranking(self) -> list[int]:
        """Middle blocks from least to most important (the first are replaced first)."""
        return sorted(self.scores, key=lambda i: (self.scores[i], i))


def _ranking_text(scores: torch.Tensor, middle: list[int], k: int = 4) -> str:
    order = torch.argsort(scores).tolist()
    low = ",".join(str(middle[i]) for i in order[:k])
    return f"low[{low}]"


def run_layer_replace(
    model: nn.Module,
    token_ids: torch.Tensor,
    config: LayerReplaceConfig,
    source_model: str = "",
    progress: bool = True,
) -> LayerReplaceResult:
    """Train importance scores and harmonizers on ``token_ids``.

    Parameters
    ----------
    model:
        The full causal LM; its weights are frozen and left unchanged.
    token_ids:
        ``(num_blocks, block_size)`` token ids of the owner's general text.
    config:
        Stage-1 knobs.
    source_model:
        Name recorded in the artifact.
    progress:
        Show a progress bar with the loss and the currently least important blocks.
    """
    from tqdm.auto import tqdm

    arch = architecture_of(model)
    layers = get_layers(model, arch)
    num_layers = len(layers)
    middle = middle_layers(num_layers, config.num_adapter_layers)
    hidden = int(model.config.hidden_size)
    n_heldout = max(1, int(round(len(token_ids) * config.heldout_fraction)))
    if len(token_ids) - n_heldout < 1:
        raise ScaleOTError(f"need at least 2 token blocks of {config.block_size} tokens, got {len(token_ids)}")
    train_ids, heldout_ids = token_ids[:-n_heldout], token_ids[-n_heldout:]

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    fingerprint = model_fingerprint(model)
    for param in model.parameters():
        param.requires_grad_(False)
    was_training = model.training
    model.eval()  # dropout off: rewards must compare candidates, not dropout noise

    harmonizers = {i: Harmonizer(hidden, config.harmonizer_rank) for i in middle}
    params = [p for h in harmonizers.values() for p in h.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.harmonizer_lr, weight_decay=config.weight_decay)
    scores = torch.full((len(middle),), float(config.init_score))
    history: dict[str, list] = {"loss": [], "reward_mean": [], "rewards": [], "scores": []}
    tokens_fb = tokens_f = 0

    def batch(source: torch.Tensor) -> torch.Tensor:
        idx = torch.randint(len(source), (min(config.batch_size, len(source)),), generator=generator)
        return source[idx]

    def candidate_modules(keep: torch.Tensor) -> dict[int, nn.Module]:
        return {middle[j]: harmonizers[middle[j]] for j in range(len(middle)) if not keep[j]}

    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="layer-replace", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        # Harmonizer step: one candidate, gradients reach only the harmonizers it uses.
        keep = sample_candidate(scores, config.group_size, generator)
        x = batch(train_ids)
        with swapped_blocks(model, candidate_modules(keep)):
            for h in harmonizers.values():
                h.train()
            loss = lm_loss(model, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tokens_fb += x.numel()

        # RL step on the scores: compare candidates on one held-out batch.
        y = batch(heldout_ids)
        keeps, losses = [], []
        with torch.no_grad():
            for _c in range(config.num_candidates):
                keep_c = sample_candidate(scores, config.group_size, generator)
                with swapped_blocks(model, candidate_modules(keep_c)):
                    losses.append(float(lm_loss(model, y)))
                keeps.append(keep_c)
                tokens_f += y.numel()
        rewards = torch.tensor([math.exp(-l) for l in losses])
        advantage = rewards - rewards.mean()
        if config.standardize_advantages:
            std = advantage.std(unbiased=False)
            advantage = advantage / std if std > 0 else torch.zeros_like(advantage)
        p = torch.sigmoid(scores)
        for keep_c, a in zip(keeps, advantage):
            scores += config.rl_lr * a * p * (1 - p) * keep_c.float()

        history["loss"].append(loss.item())
        history["reward_mean"].append(float(rewards.mean()))
        history["rewards"].append(rewards.tolist())
        history["scores"].append(scores.tolist())
        bar.set_postfix_str(f"loss={loss.item():.3f} {_ranking_text(scores, middle)}")

    evaluation = _evaluate(model, heldout_ids, harmonizers, scores, middle, config)
    model.train(was_training)
    for h in harmonizers.values():
        h.eval()
    return LayerReplaceResult(
        scores={middle[j]: float(scores[j]) for j in range(len(middle))},
        harmonizers=harmonizers,
        config=config,
        source_model=source_model,
        source_fingerprint=fingerprint,
        architecture=arch.name,
        num_layers=num_layers,
        hidden_size=hidden,
        history=history,
        evaluation=evaluation,
        seconds=time.perf_counter() - start,
        tokens_forward_backward=tokens_fb,
        tokens_forward_only=tokens_f,
    )


@torch.no_grad()
def _evaluate(model, heldout_ids, harmonizers, scores, middle, config) -> dict[str, float]:
    """Held-out LM loss: full model vs half the middle replaced (by harmonizers / dropped)."""
    n = min(len(heldout_ids), config.eval_batches * config.batch_size)
    ids = heldout_ids[:n]
    order = torch.argsort(scores).tolist()
    replaced = [middle[j] for j in order[: len(middle) // 2]]

    def mean_loss(replacements) -> float:
        with swapped_blocks(model, replacements):
            losses = [float(lm_loss(model, ids[i : i + config.batch_size])) for i in range(0, n, config.batch_size)]
        return sum(losses) / len(losses)

    return {
        "heldout_loss_full": mean_loss({}),
        "heldout_loss_half_harmonized": mean_loss({i: harmonizers[i] for i in replaced}),
        "heldout_loss_half_dropped": mean_loss({i: _Identity() for i in replaced}),
        "heldout_tokens": int(ids.numel()),
    }


# ----------------------------------------------------------------------------- artifact on disk


def save_artifact(result: LayerReplaceResult, out_dir: str | Path) -> Path:
    """Write the artifact folder: ``harmonizers.safetensors`` + ``layer_replace.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{i}.{name}": t.detach().contiguous() for i, h in result.harmonizers.items() for name, t in h.state_dict().items()
    }
    save_file(tensors, str(out / ARTIFACT_WEIGHTS), metadata={"format": ARTIFACT_FORMAT})
    meta = {
        "format": ARTIFACT_FORMAT,
        "scaleot_fed_version": __version__,
        "source_model": result.source_model,
        "source_fingerprint": result.source_fingerprint,
        "architecture": result.architecture,
        "num_layers": result.num_layers,
        "hidden_size": result.hidden_size,
        "num_adapter_layers": result.config.num_adapter_layers,
        "middle_layers": sorted(result.scores),
        "scores": {str(i): s for i, s in result.scores.items()},
        "keep_probabilities": {str(i): 1 / (1 + math.exp(-s)) for i, s in result.scores.items()},
        "ranking_least_important_first": result.ranking(),
        "harmonizer_rank": result.config.harmonizer_rank,
        "config": as_dict(result.config),
        "evaluation": result.evaluation,
        "cost": {
            "seconds": result.seconds,
            "seconds_per_step": result.seconds / max(1, result.config.steps),
            "tokens_forward_backward": result.tokens_forward_backward,
            "tokens_forward_only": result.tokens_forward_only,
        },
        "history": result.history,
    }
    (out / ARTIFACT_JSON).write_text(json.dumps(meta, indent=1))
    return out


@dataclass
class LayerReplaceArtifact:
    """A stage-1 artifact read back from disk."""

    path: Path
    meta: dict
    scores: dict[int, float]
    harmonizers: dict[int, Harmonizer]

    def check_matches(self, model: nn.Module) -> None:
        """Refuse an artifact that was trained on a different model."""
        fp = model_fingerprint(model)
        if self.meta["source_fingerprint"] != fp:
            raise IntegrityError(
                f"importance artifact {self.path} was made from a different model "
                f"({self.meta.get('source_model')!r}, fingerprint {self.meta['source_fingerprint']}, "
                f"this model: {fp}); rerun layer-replace on this model"
            )


def load_artifact(path: str | Path) -> LayerReplaceArtifact:
    """Read a stage-1 artifact folder written by :func:`save_artifact`."""
    path = Path(path)
    meta_path, weights_path = path / ARTIFACT_JSON, path / ARTIFACT_WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        raise IntegrityError(
            f"{path} is not a layer-replace artifact (needs {ARTIFACT_JSON} and {ARTIFACT_WEIGHTS}); "
            "make one with `scaleot-fed layer-replace`"
        )
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(weights_path))
    except Exception as exc:
        raise IntegrityError(f"layer-replace artifact {path} is unreadable: {exc}") from exc
    if meta.get("format") != ARTIFACT_FORMAT:
        raise IntegrityError(f"{meta_path} is not a {ARTIFACT_FORMAT} file")
    rank, hidden = int(meta["harmonizer_rank"]), int(meta["hidden_size"])
    harmonizers: dict[int, Harmonizer] = {}
    for i in meta["middle_layers"]:
        h = Harmonizer(hidden, rank)
        try:
            h.load_state_dict({k: tensors[f"{i}.{k}"] for k in h.state_dict()})
        except (KeyError, RuntimeError) as exc:
            raise IntegrityError(f"harmonizer weights of block {i} missing or malformed in {weights_path}") from exc
        h.eval()
        harmonizers[int(i)] = h
    scores = {int(k): float(v) for k, v in meta["scores"].items()}
    return LayerReplaceArtifact(path=path, meta=meta, scores=scores, harmonizers=harmonizers)
