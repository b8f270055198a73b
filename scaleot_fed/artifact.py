"""The stage-1 artifact on disk: importance scores, harmonizer weights and the run's record.

``harmonizers.safetensors`` holds one harmonizer per middle block (``<block>.<param>``);
``layer_replace.json`` the scores, the ranking, the config, the held-out evaluation, the cost and
the training history. The artifact names the model it was trained on (a fingerprint of its
weights), so it cannot be applied to another model by mistake.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from . import __version__
from .config import as_dict
from .errors import IntegrityError
from .files import save_tensors, write_atomic
from .harmonizer import Harmonizer
from .layer_replace import LayerReplaceResult
from .models import model_fingerprint

ARTIFACT_FORMAT = "scaleot-fed/layer-replace"
ARTIFACT_JSON = "layer_replace.json"
ARTIFACT_WEIGHTS = "harmonizers.safetensors"


def save_artifact(result: LayerReplaceResult, out_dir: str | Path, data: str = "lambada") -> Path:
    """Write the artifact folder: ``harmonizers.safetensors`` + ``layer_replace.json`` (``data``
    names the text stage 1 was trained on)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{i}.{name}": t.detach().contiguous() for i, h in result.harmonizers.items() for name, t in h.state_dict().items()
    }
    save_tensors(tensors, str(out / ARTIFACT_WEIGHTS), metadata={"format": ARTIFACT_FORMAT})
    meta = {
        "format": ARTIFACT_FORMAT,
        "scaleot_fed_version": __version__,
        "source_model": result.source_model,
        "source_fingerprint": result.source_fingerprint,
        "data": data,
        "architecture": result.architecture,
        "num_layers": result.num_layers,
        "hidden_size": result.hidden_size,
        "num_adapter_layers": result.config.num_adapter_layers,
        "middle_layers": sorted(result.scores),
        "scores": {str(i): s for i, s in result.scores.items()},
        "rl_scores": {str(i): s for i, s in result.rl_scores.items()},
        "keep_probabilities": {str(i): 1 / (1 + math.exp(-s)) for i, s in result.rl_scores.items()},
        "ranking_fit": result.fit,
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
    write_atomic(out / ARTIFACT_JSON, json.dumps(meta, indent=1))
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
        self.check_fingerprint(model_fingerprint(model))

    def check_fingerprint(self, fp: str) -> None:
        """Refuse an artifact made from a model with another fingerprint."""
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
