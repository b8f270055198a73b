"""CRaSh's emulator: Clustering, Removing and Sharing middle blocks (Zhang et al., EMNLP 2023).

A training-free baseline between uniform drop and ScaleOT. The middle blocks' outputs on a
calibration text are compared by linear CKA; adjacent blocks are clustered (the paper finds
clusters of similar representations in the layer stack); each cluster keeps one block, its most
central member, and the cluster's other positions *share* it: they run the kept block's weights
again, so the emulator keeps the full model's depth while it holds only the kept blocks'
parameters.

Where this differs from the paper, and why:

* The clustering runs on the model owner's general calibration text (the corpus stage 1 uses),
  not on the data owner's task: in offsite-tuning the owner builds the emulator without the
  private data. The paper clusters per task.
* Adapters stay ``N_a/2`` bottom and top blocks, like every emulator here (the paper also picks
  the trained blocks from the clusters), so the plug-in differs from ScaleOT's only in the middle.
* A shared position repeats its own cluster's kept block (the paper repeats the nearest kept
  block by index, which can cross a cluster boundary).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..arch import get_layers
from ..errors import ConfigError
from ..heads import hidden_states
from ..text import token_blocks
from .strategy import EmulatorStrategy, PlanInputs

CALIBRATION_SEQUENCES = 32
CALIBRATION_LENGTH = 128
"""What the blocks are compared on: 32 x 128 = 4,096 token representations per block."""


def calibration_tokens(tokenizer, texts: list[str]) -> torch.Tensor:
    """The ``(32, 128)`` token blocks of ``texts`` (joined by EOS) the blocks are clustered on."""
    return token_blocks(tokenizer, texts, CALIBRATION_LENGTH, max_blocks=CALIBRATION_SEQUENCES)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment of two ``(n, features)`` representations of the same ``n``
    inputs: 1 for representations equal up to rotation and scale, near 0 for unrelated ones."""
    return float(_cka_matrix([x, y])[0, 1])


def _cka_matrix(reps: list[torch.Tensor]) -> np.ndarray:
    """Pairwise linear CKA, in feature space: ``||Xc^T Yc||_F^2`` per pair, a ``(d, d)`` product
    rather than an ``(n, n)`` kernel; each representation centred and normed once."""
    centred = [r.float() - r.float().mean(0) for r in reps]  # (n, d) each
    norms = [(c.T @ c).square().sum().sqrt() for c in centred]
    n = len(reps)
    out = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = float((centred[i].T @ centred[j]).square().sum() / (norms[i] * norms[j]))
    return out


@torch.no_grad()
def block_similarity(model: nn.Module, calibration: torch.Tensor, blocks: list[int],
                     batch_size: int = 8) -> np.ndarray:
    """Linear CKA between the outputs (residual stream) of ``blocks`` on ``calibration``, every
    token weighted alike (:func:`token_similarity`).

    Parameters
    ----------
    calibration:
        ``(num_sequences, length)`` token ids; every token is one input of the comparison.

    Returns
    -------
    numpy.ndarray
        ``(len(blocks), len(blocks))``, symmetric, ones on the diagonal.
    """
    layers = get_layers(model)
    outputs: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}

    def keep(index: int):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output  # (batch, length, hidden)
            outputs[index].append(out.reshape(-1, out.shape[-1]).float().cpu())
        return hook

    handles = [layers[b].register_forward_hook(keep(b)) for b in blocks]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for start in range(0, len(calibration), batch_size):
            hidden_states(model, calibration[start:start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return token_similarity([torch.cat(outputs[b]) for b in blocks])  # each (tokens, hidden)


def token_similarity(reps: list[torch.Tensor]) -> np.ndarray:
    """Pairwise linear CKA of ``(tokens, hidden)`` representations, each token's vector scaled to
    unit length first. Without that, the few attention-sink tokens carrying massive activations
    decide it alone: in SmolLM2-135M the first token's residual norm is about 23,700 from block 11
    on against a median of 130-530, and every pair of blocks from 11 to 27 scores 1.000."""
    return _cka_matrix([r / r.norm(dim=-1, keepdim=True).clamp_min(1e-12) for r in reps])


def cluster_adjacent(similarity: np.ndarray, n_clusters: int) -> list[list[int]]:
    """Contiguous clusters of ``0..n-1``: start from singletons and merge the neighbouring pair
    with the highest mean pairwise similarity (average linkage) until ``n_clusters`` remain;
    ties go to the lower pair."""
    n = len(similarity)
    if not 1 <= n_clusters <= n:
        raise ConfigError(f"cannot cluster {n} blocks into {n_clusters} groups")
    clusters = [[i] for i in range(n)]
    while len(clusters) > n_clusters:
        links = [similarity[np.ix_(a, b)].mean() for a, b in zip(clusters, clusters[1:])]
        k = int(np.argmax(links))  # first maximum: the lower pair on ties
        clusters[k:k + 2] = [clusters[k] + clusters[k + 1]]
    return clusters


def central_member(cluster: list[int], similarity: np.ndarray) -> int:
    """The member most similar on average to the rest of its cluster (the lower one on ties)."""
    if len(cluster) == 1:
        return cluster[0]
    inner = similarity[np.ix_(cluster, cluster)]
    scores = (inner.sum(1) - 1.0) / (len(cluster) - 1)
    return cluster[int(np.argmax(scores))]


def kept_count(middle: list[int], alpha: float) -> int:
    """Clusters (one kept block each) for the ``alpha`` share of ``middle`` replaced; at least one."""
    n_keep = len(middle) - int(round(alpha * len(middle)))
    if n_keep < 1:
        raise ConfigError(f"the crash strategy keeps one block per cluster: alpha = {alpha} leaves none of the "
                          f"{len(middle)} middle blocks; use alpha < 1")
    return n_keep


def plan_sharing(model: nn.Module, calibration: torch.Tensor | None, middle: list[int], alpha: float) -> dict:
    """Which middle block each middle position runs: ``{"clusters": [[source, ...], ...],
    "kept": [source, ...], "shared_from": {source: kept source}, "similarity": [[...]]}``."""
    n_keep = kept_count(middle, alpha)
    if calibration is None:
        raise ConfigError("the crash strategy clusters blocks on calibration text: pass token blocks "
                          "(build-emulator reads them from --calibration)")
    similarity = block_similarity(model, calibration, middle)
    clusters = [[middle[i] for i in c] for c in cluster_adjacent(similarity, n_keep)]
    position = {m: i for i, m in enumerate(middle)}
    kept = [middle[central_member([position[m] for m in c], similarity)] for c in clusters]
    shared_from = {m: k for c, k in zip(clusters, kept) for m in c if m != k}
    return {"clusters": clusters, "kept": kept, "shared_from": shared_from,
            "similarity": np.round(similarity, 5).tolist()}


def shared_copy(block: nn.Module) -> nn.Module:
    """A structural copy of ``block`` whose parameters *are* ``block``'s (trained together, stored
    once) while its modules are its own (a KV cache slot and ``layer_idx`` per position)."""
    return copy.deepcopy(block, {id(p): p for p in block.parameters()})  # the memo maps each parameter to itself


class CRaSh(EmulatorStrategy):
    """Adjacent middle blocks clustered by representation similarity; each cluster's kept block
    runs again at its other positions."""

    name = "crash"
    needs_calibration = True
    record_key = "sharing"

    def record(self, measured: dict) -> dict:
        return {k: v for k, v in measured.items() if k != "shared_from"}  # (the layout has it)

    def calibration(self, tokenizer, texts: list[str]) -> torch.Tensor:
        return calibration_tokens(tokenizer, texts)

    def measure(self, model: nn.Module, calibration: torch.Tensor | None, middle: list[int], alpha: float) -> dict:
        sharing = plan_sharing(model, calibration, middle, alpha)
        # what the clustering saw, for the report (JSON keys are strings)
        return {"clusters": sharing["clusters"], "kept": sharing["kept"], "block_similarity": sharing["similarity"],
                "calibration_tokens": int(calibration.numel()),
                "shared_from": {str(k): v for k, v in sharing["shared_from"].items()}}

    def replace(self, middle: list[int], n_replace: int, inputs: PlanInputs) -> dict[int, dict | None]:
        if inputs.measured is None:
            raise ConfigError("the crash strategy needs the full model's block similarities on calibration text; "
                              "build it in memory (not --stream) with calibration token blocks")
        return {int(k): {"kind": "shared", "of": v} for k, v in inputs.measured["shared_from"].items()}

    def sizing_inputs(self, middle: list[int], alpha: float) -> PlanInputs:
        # the first kept blocks, the rest shared: the sizes of any clustering with this many clusters
        n_keep = kept_count(middle, alpha)
        return PlanInputs(alpha, measured={"shared_from": {str(m): middle[0] for m in middle[n_keep:]}})

    def middle_runs(self, alpha: float) -> float:
        return 1.0  # every middle position runs a block: the full depth
