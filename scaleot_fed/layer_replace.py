"""Stage 1 of ScaleOT: Dynamic LayerReplace.

The model owner learns, on its own general text, (a) an importance score per middle block and
(b) one harmonizer per middle block that can stand in for it. Training alternates:

* a gradient step on the harmonizers: LM loss of one sampled candidate network, original weights
  frozen, so each harmonizer learns to replace its block in many contexts;
* an RL step on the scores: ``N_c`` candidates on a held-out batch, reward ``exp(-loss)``,
  advantage = reward minus the mean (standardised), ``s_i += lr * A * p_i (1 - p_i)`` for the
  blocks each candidate kept.

A candidate draws ``u_i ~ U(0, p_i)`` with ``p_i = sigmoid(s_i)`` and replaces the blocks with the
lowest draws by their harmonizers.

Where we differ from the paper, and why (issue 15: with the paper's choices the replaced set of
two seeds shared half its blocks):

* ``selection = "global"`` (default): a candidate replaces ``round(alpha * n_middle)`` blocks, the
  lowest draws over all middle blocks: the same share and the same global cut the emulator is
  built with, so the scores are estimated under the comparison they are used for. The paper's
  ``"group"`` selection (consecutive groups, the lower half of each replaced) is kept as an
  option; there a group's replaced count is ``alpha * size`` rounded at random, so a group of one
  block is replaced with probability ``alpha`` instead of never.
* ``ranking = "regression"`` (default): the RL scores only steer the harmonizers' training (the
  blocks likely to be replaced get the most practice). The ranking the emulator is built from is
  then measured with the trained harmonizers: ``ranking_candidates`` candidates drawn uniformly at
  ``alpha``, all scored on the same reward texts, and a least-squares fit of their losses on
  which blocks each replaced; a block's score is the loss its replacement adds. The RL scores lock
  in early (a block rarely kept is rarely updated), so two seeds ended in different sets;
  the regression sees every block replaced about ``alpha * ranking_candidates`` times.
  The fit's candidates come from a generator of their own, so a saved artifact can be re-ranked
  with more candidates without training again (:mod:`scaleot_fed.rerank`).
  ``ranking = "rl"`` ranks by the RL scores, as the paper does.
* The held-out texts are split in two: the RL rewards and the ranking fit use the first half, the
  reported held-out loss the second, so the reported loss is not the one the ranking optimised.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import architecture_of, get_layers
from .candidates import heldout_losses, ranking_generator, regression_scores, sample_candidate, swapped_blocks
from .devices import Placement
from .errors import ConfigError
from .harmonizer import Harmonizer
from .heads import lm_loss
from .models import model_fingerprint


@dataclass
class LayerReplaceConfig(Placement):
    """Knobs of Dynamic LayerReplace (defaults: checked on SmolLM2-135M: 150 steps give harmonizers that beat plain layer drop on held-out LM loss)."""

    num_adapter_layers: int = 4
    """Blocks kept as adapters (half bottom, half top); they get no score and no harmonizer."""
    steps: int = 150
    batch_size: int = 8
    block_size: int = 128
    """Tokens per training sequence."""
    alpha: float = 0.5
    """Share of the middle blocks a candidate replaces: the deployed emulator's alpha."""
    selection: str = "global"
    """``global``: the ``alpha`` share with the lowest draws; ``group``: per consecutive group (the paper)."""
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
    """Share of the token blocks held out: half for the RL rewards and the ranking fit, half for
    the reported held-out loss."""
    ranking: str = "regression"
    """What the emulator is built from: ``regression`` (loss each block's replacement adds,
    fitted at the end) or ``rl`` (the paper's scores)."""
    ranking_candidates: int = 96
    """Candidates scored for the regression ranking (each on every reward batch)."""
    ranking_batches: int = 2
    """Reward batches each ranking candidate is scored on."""
    eval_batches: int = 4
    max_train_blocks: int | None = None
    """Cap on token blocks read from the corpus (None: as many as the steps need, at most all)."""
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = ("steps", "batch_size", "group_size", "num_candidates", "harmonizer_rank", "eval_batches")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_candidates < 2:
            raise ConfigError(f"num_candidates must be >= 2 (advantages compare candidates), got {self.num_candidates}")
        if self.block_size < 2:
            raise ConfigError(f"block_size must be >= 2 tokens, got {self.block_size}")
        check_num_adapter_layers(self.num_adapter_layers)
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"alpha (the share of middle blocks a candidate replaces) must be in (0, 1), got {self.alpha}")
        if self.selection not in SELECTIONS or self.ranking not in RANKINGS:
            raise ConfigError(f"selection must be one of {', '.join(SELECTIONS)} and ranking one of "
                              f"{', '.join(RANKINGS)}; got {self.selection!r}, {self.ranking!r}")
        if self.ranking_candidates < 2 or self.ranking_batches < 1:
            raise ConfigError("ranking_candidates must be >= 2 and ranking_batches >= 1")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.rl_lr < 0 or self.harmonizer_lr <= 0:
            raise ConfigError("rl_lr must be >= 0 and harmonizer_lr > 0")
        if self.weight_decay < 0 or (self.max_train_blocks is not None and self.max_train_blocks < 1):
            raise ConfigError("weight_decay must be >= 0 and max_train_blocks >= 1 (or unset)")

    def blocks_needed(self) -> int:
        """Token blocks to read from the corpus: enough that training batches rarely repeat, plus
        the held-out share and the final evaluation."""
        if self.max_train_blocks:
            return self.max_train_blocks
        heldout = self.batch_size * (self.eval_batches + max(self.ranking_batches, 1) + 1)
        # each held-out half must hold its batches whatever the step count
        halves = math.ceil(2 * self.batch_size * max(self.eval_batches, self.ranking_batches) / self.heldout_fraction)
        return max(int(self.steps * self.batch_size / (1 - self.heldout_fraction)) + heldout, halves)


SELECTIONS = ("global", "group")
RANKINGS = ("regression", "rl")


def check_num_adapter_layers(num_adapter_layers: int) -> None:
    """``N_a`` must be a positive even integer: half the adapter blocks at the bottom, half on top."""
    if (isinstance(num_adapter_layers, bool) or int(num_adapter_layers) != num_adapter_layers
            or num_adapter_layers < 2 or num_adapter_layers % 2):
        raise ConfigError(
            f"the number of adapter blocks N_a must be a positive even number (half bottom, half top), "
            f"got {num_adapter_layers}"
        )


def middle_layers(num_layers: int, num_adapter_layers: int) -> list[int]:
    """Indices of the non-adapter blocks for ``num_adapter_layers`` split bottom/top."""
    check_num_adapter_layers(num_adapter_layers)
    if num_adapter_layers >= num_layers:
        raise ConfigError(
            f"the number of adapter blocks ({num_adapter_layers}) must be smaller than the model's "
            f"{num_layers} blocks"
        )
    half = num_adapter_layers // 2
    return list(range(half, num_layers - half))


@dataclass
class LayerReplaceResult:
    """Scores, harmonizers and the record of one stage-1 run (what the artifact holds)."""

    scores: dict[int, float]
    """What the emulator is ranked by (``config.ranking``): higher = more important."""
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
    rl_scores: dict[int, float] = field(default_factory=dict)
    """The paper's RL scores (the same as ``scores`` when ``config.ranking == "rl"``)."""
    fit: dict[str, float] = field(default_factory=dict)
    """The regression ranking's fit: candidates, batches, R^2."""

    def ranking(self) -> list[int]:
        """Middle blocks from least to most important (the first are replaced first)."""
        return sorted(self.scores, key=lambda i: (self.scores[i], i))


def _ranking_text(scores: torch.Tensor, middle: list[int], k: int = 4) -> str:
    order = torch.argsort(scores).tolist()
    low = ",".join(str(middle[i]) for i in order[:k])
    return f"low[{low}]"


class _Stage1:
    """The state of one stage-1 run: frozen model, harmonizers, scores and the run's RNG.

    Random draws come from one generator in a fixed order (harmonizer step: candidate, batch;
    RL step: batch, candidates), so a seed reproduces the whole run.
    """

    def __init__(self, model: nn.Module, middle: list[int], config: LayerReplaceConfig) -> None:
        self.model, self.middle, self.config = model, middle, config
        torch.manual_seed(config.seed)  # harmonizer initialisation
        self.generator = torch.Generator().manual_seed(config.seed)  # on the CPU: same draws on any device
        hidden = int(model.config.hidden_size)
        blocks = get_layers(model)
        # each harmonizer where its block is (one device, or a device map's), in float32
        self.harmonizers = {i: Harmonizer(hidden, config.harmonizer_rank).to(next(blocks[i].parameters()).device)
                            for i in middle}
        params = [p for h in self.harmonizers.values() for p in h.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=config.harmonizer_lr, weight_decay=config.weight_decay)
        self.scores = torch.full((len(middle),), float(config.init_score))
        self.history: dict[str, list] = {"loss": [], "reward_mean": [], "rewards": [], "scores": []}
        self.tokens_fb = self.tokens_f = 0

    def batch(self, source: torch.Tensor) -> torch.Tensor:
        idx = torch.randint(len(source), (min(self.config.batch_size, len(source)),), generator=self.generator)
        return source[idx]

    def candidate(self) -> tuple[torch.Tensor, dict[int, nn.Module]]:
        """A keep-mask over the middle blocks and the harmonizers standing in for the others."""
        c = self.config
        keep = sample_candidate(self.scores, c.alpha, self.generator, c.selection, c.group_size)
        return keep, {m: self.harmonizers[m] for j, m in enumerate(self.middle) if not keep[j]}

    def harmonizer_step(self, train_ids: torch.Tensor) -> float:
        """One candidate's LM loss; gradients reach only the harmonizers it uses."""
        _, replacements = self.candidate()
        x = self.batch(train_ids)
        with swapped_blocks(self.model, replacements):
            for h in self.harmonizers.values():
                h.train()
            loss = lm_loss(self.model, x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.tokens_fb += x.numel()
        return loss.item()

    @torch.no_grad()
    def rl_step(self, heldout_ids: torch.Tensor) -> torch.Tensor:
        """Compare ``num_candidates`` candidates on one held-out batch; move the kept blocks'
        scores by the (standardised) advantage of ``exp(-loss)``. Returns the rewards."""
        y = self.batch(heldout_ids)
        keeps, losses = [], []
        for _ in range(self.config.num_candidates):
            keep, replacements = self.candidate()
            with swapped_blocks(self.model, replacements):
                losses.append(float(lm_loss(self.model, y)))
            keeps.append(keep)
            self.tokens_f += y.numel()
        rewards = torch.tensor([math.exp(-loss) for loss in losses])
        advantage = rewards - rewards.mean()
        if self.config.standardize_advantages:
            std = advantage.std(unbiased=False)
            advantage = advantage / std if std > 0 else torch.zeros_like(advantage)
        p = torch.sigmoid(self.scores)
        for keep, a in zip(keeps, advantage, strict=True):
            self.scores += self.config.rl_lr * a * p * (1 - p) * keep.float()
        return rewards

    def harmonizers_eval(self) -> None:
        for h in self.harmonizers.values():
            h.eval()

    def record(self, loss: float, rewards: torch.Tensor) -> None:
        self.history["loss"].append(loss)
        self.history["reward_mean"].append(float(rewards.mean()))
        self.history["rewards"].append(rewards.tolist())
        self.history["scores"].append(self.scores.tolist())


def split_heldout(token_ids: torch.Tensor, config: LayerReplaceConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train, reward, report)`` token blocks: the held-out share split in two halves, the
    first for RL rewards and the ranking fit, the second for the reported held-out loss."""
    n_heldout = max(2, int(round(len(token_ids) * config.heldout_fraction)))
    if len(token_ids) - n_heldout < 1:
        raise ConfigError(f"need at least 3 token blocks of {config.block_size} tokens, got {len(token_ids)}")
    heldout = token_ids[-n_heldout:]
    return token_ids[:-n_heldout], heldout[: n_heldout // 2], heldout[n_heldout // 2 :]


def _check_alpha(alpha: float, n_middle: int) -> None:
    replaced = int(round(alpha * n_middle))
    if not 0 < replaced < n_middle:
        raise ConfigError(f"alpha = {alpha} replaces {replaced} of the {n_middle} middle blocks: a candidate must "
                          f"replace at least one and keep at least one; choose alpha between {0.5 / n_middle:.3f} "
                          f"and {1 - 0.5 / n_middle:.3f}")


def run_layer_replace(model: nn.Module, token_ids: torch.Tensor, config: LayerReplaceConfig, source_model: str = "",
                      progress: bool = True) -> LayerReplaceResult:
    """Train importance scores and harmonizers on ``token_ids``.

    Parameters
    ----------
    model:
        The full causal LM; its weights are frozen and left unchanged, but moved to
        ``config.device`` in ``config.dtype``.
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
    num_layers = len(get_layers(model, arch))
    middle = middle_layers(num_layers, config.num_adapter_layers)
    _check_alpha(config.alpha, len(middle))
    train_ids, reward_ids, report_ids = split_heldout(token_ids, config)
    fingerprint = model_fingerprint(model)  # before any cast: the artifact names the weights as given
    model.requires_grad_(False)
    if not getattr(model, "hf_device_map", None):  # a device-mapped model stays where accelerate put it
        config.apply(model)
    device = next(model.parameters()).device
    train_ids, reward_ids, report_ids = train_ids.to(device), reward_ids.to(device), report_ids.to(device)
    was_training = model.training
    model.eval()  # dropout off: rewards must compare candidates, not dropout noise
    run = _Stage1(model, middle, config)

    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="layer-replace", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        loss = run.harmonizer_step(train_ids)
        rewards = run.rl_step(reward_ids)
        run.record(loss, rewards)
        bar.set_postfix_str(f"loss={loss:.3f} {_ranking_text(run.scores, middle)}")

    run.harmonizers_eval()  # (and later on the CPU: the artifact is saved and emulators built from there)
    scores, fit = run.scores, {}
    if config.ranking == "regression":
        scores, fit = regression_scores(model, reward_ids, run.harmonizers, middle, config, ranking_generator(config),
                                        progress)
        run.tokens_f += fit["tokens"]  # the ranking's cost counts in stage 1's budget
    evaluation = heldout_losses(model, report_ids, run.harmonizers, scores, middle, config, progress)
    model.train(was_training)
    return LayerReplaceResult(
        scores={middle[j]: float(scores[j]) for j in range(len(middle))},
        rl_scores={middle[j]: float(run.scores[j]) for j in range(len(middle))}, fit=fit,
        harmonizers={i: h.to("cpu") for i, h in run.harmonizers.items()}, config=config,
        source_model=source_model, source_fingerprint=fingerprint, architecture=arch.name, num_layers=num_layers,
        hidden_size=int(model.config.hidden_size), history=run.history, evaluation=evaluation,
        seconds=time.perf_counter() - start, tokens_forward_backward=run.tokens_fb, tokens_forward_only=run.tokens_f,
    )


