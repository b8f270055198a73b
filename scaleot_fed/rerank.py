"""A saved stage-1 artifact ranked again: its trained harmonizers and RL record kept, the
regression ranking (:func:`scaleot_fed.candidates.regression_scores`) measured anew with other
ranking settings (more candidates, other reward batches), and the held-out losses of the newly
chosen set reported. What a fresh stage-1 run with those settings would rank, without training
the harmonizers again: the ranking draws its candidates from a generator of its own, seeded by
the config's seed, in both paths.
"""

from __future__ import annotations

import json
import time

import torch
from torch import nn

from .artifact import LayerReplaceArtifact
from .candidates import heldout_losses, ranking_generator, regression_scores
from .config import as_dict
from .errors import ConfigError
from .layer_replace import LayerReplaceConfig, LayerReplaceResult, split_heldout

RERANK_KEYS = ("ranking_candidates", "ranking_batches")
"""The config keys a rerank may change (anything else changes what the harmonizers learnt)."""


def rerank_changes(meta: dict, config: LayerReplaceConfig) -> list[str] | None:
    """The ranking keys ``config`` changes against an artifact's recorded config (``meta``, its
    ``layer_replace.json``; ``[]``: none), or None when it changes more than a rerank can (the
    harmonizers must be trained again)."""
    recorded = {k: v for k, v in meta["config"].items() if k != "device"}
    new = {k: v for k, v in json.loads(json.dumps(as_dict(config))).items() if k != "device"}
    changed = sorted(k for k in set(recorded) | set(new) if recorded.get(k) != new.get(k))
    return changed if all(k in RERANK_KEYS for k in changed) and config.ranking == "regression" else None


@torch.no_grad()
def rerank(model: nn.Module, token_ids: torch.Tensor, artifact: LayerReplaceArtifact, config: LayerReplaceConfig,
           progress: bool = False) -> LayerReplaceResult:
    """The artifact's stage 1 ranked with ``config`` (which may differ in :data:`RERANK_KEYS` only).

    Parameters
    ----------
    model:
        The full model the artifact was trained on (checked by fingerprint).
    token_ids:
        The stage-1 token blocks (the same text: the reward and report halves are cut from them).
    """
    if rerank_changes(artifact.meta, config) is None:
        raise ConfigError(f"{artifact.path}: only {', '.join(RERANK_KEYS)} may change in a rerank (with ranking = "
                          "\"regression\"); anything else needs stage 1 run again")
    artifact.check_matches(model)
    meta = artifact.meta
    middle = sorted(artifact.harmonizers)
    _, reward_ids, report_ids = split_heldout(token_ids, config)
    model.requires_grad_(False)
    if not getattr(model, "hf_device_map", None):  # as stage 1 ran: the config's device and dtype
        config.apply(model)
    device = next(model.parameters()).device
    harmonizers = {i: h.to(device) for i, h in artifact.harmonizers.items()}
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    scores, fit = regression_scores(model, reward_ids.to(device), harmonizers, middle, config,
                                    ranking_generator(config), progress)
    evaluation = heldout_losses(model, report_ids.to(device), harmonizers, scores, middle, config, progress)
    model.train(was_training)
    cost = meta["cost"]
    fit = fit | {"rerank_seconds": time.perf_counter() - start, "replaces": meta.get("ranking_fit", {})}
    return LayerReplaceResult(
        scores={middle[j]: float(scores[j]) for j in range(len(middle))},
        rl_scores={int(k): float(v) for k, v in meta["rl_scores"].items()}, fit=fit,
        harmonizers={i: h.to("cpu") for i, h in harmonizers.items()}, config=config,
        source_model=meta["source_model"], source_fingerprint=meta["source_fingerprint"],
        architecture=meta["architecture"], num_layers=meta["num_layers"], hidden_size=meta["hidden_size"],
        history=meta["history"], evaluation=evaluation, seconds=cost["seconds"],
        tokens_forward_backward=cost["tokens_forward_backward"],
        # the budget of a fresh run with this config: the old fit's tokens out, the new one's in
        tokens_forward_only=cost["tokens_forward_only"] - meta.get("ranking_fit", {}).get("tokens", 0) + fit["tokens"],
    )
