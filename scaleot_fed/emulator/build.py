"""Stage 2: build an emulator = (N_a, alpha, rank_keep_ratio) from the full model.

Layout of an emulator built from an ``L``-block model with ``N_a`` adapter blocks::

    [adapter 0 .. N_a/2-1] [middle: original | compressed | harmonizer, or dropped] [adapter top]

:func:`plan_layout` decides what each source block becomes (no weights involved), asking the
strategy (:mod:`scaleot_fed.emulator.strategy`) which middle blocks go and what stands in for
them; :func:`build_emulator` carries it out on a copy of the model and writes the manifest.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import __version__
from ..arch import Architecture, architecture_of, get_layers, projection_weight, set_layers
from ..artifact import LayerReplaceArtifact
from ..devices import model_dtype, place, resolve_dtype
from ..errors import ConfigError
from ..layer_replace import middle_layers
from ..models import base_model_reference, count_parameters, model_fingerprint
from ..src import CompressionRecord, FusedLowRankLinear, LowRankLinear, rank_for_ratio, relative_frobenius_error
from .config import EmulatorConfig
from .crash import shared_copy
from .io import MANIFEST_FORMAT, Emulator
from .strategy import STAND_INS, PlanInputs


def plan_layout(num_layers: int, config: EmulatorConfig, inputs: PlanInputs) -> list[dict]:
    """Decide, per source block, what the emulator holds (pure function, no weights).

    Returns
    -------
    list of dict
        One entry per emulator position: ``{"source": i, "kind": k}`` with ``k`` in
        ``adapter``, ``block``, ``compressed``, ``harmonizer``, or ``shared`` (with ``"of": j``,
        the kept block whose weights it runs). Dropped blocks have no entry.
    """
    middle = middle_layers(num_layers, config.num_adapter_layers)
    replaced = config.emulator_strategy.replace(middle, int(round(config.alpha * len(middle))), inputs)
    stray = [i for i in replaced if i not in middle]
    bad = [e for e in replaced.values() if e is not None and (e.get("kind") not in STAND_INS or
                                                             (e["kind"] == "shared") != ("of" in e))]
    kept = set(middle) - set(replaced)
    unkept = [e["of"] for e in replaced.values() if e is not None and "of" in e and e["of"] not in kept]
    if stray or bad or unkept:
        raise ConfigError(f"emulator strategy {config.method!r} planned {'blocks outside the middle ' + str(stray) if stray else ''}"
                          f"{' stand-ins it may not use ' + str(bad) if bad else ''}"
                          f"{' shared blocks that are not kept ' + str(unkept) if unkept else ''}; "
                          f"stand-ins are {', '.join(STAND_INS)} (shared with 'of': a kept middle block)")
    compress = config.rank_keep_ratio < 1.0
    layout = []
    for i in range(num_layers):
        if i not in middle:
            layout.append({"source": i, "kind": "adapter"})
        elif i in replaced:
            if replaced[i] is not None:  # (None: dropped)
                layout.append({"source": i, **replaced[i]})
        else:
            layout.append({"source": i, "kind": "compressed" if compress else "block"})
    return layout


def compress_block(block: nn.Module, arch: Architecture, source: int, ratio: float) -> list[CompressionRecord]:
    """Replace the attention projections of ``block`` (in place) by rank-k LowRankLinear (a
    fused q/k/v projection: one per group, :class:`FusedLowRankLinear`)."""
    records = []
    for path in arch.attention_projections:
        parent_path, _, attr = path.rpartition(".")
        parent = block.get_submodule(parent_path)
        original = getattr(parent, attr)
        weight = projection_weight(original, arch)  # (out, in)
        bias = getattr(original, "bias", None)
        groups: tuple[dict, ...] = ()
        with torch.device(weight.device):  # the factors where the weight is (a model on a GPU)
            if path in arch.fused_qkv:
                rows = arch.qkv_rows()
                low = FusedLowRankLinear.from_weight(weight, bias, rows, ratio)
                groups = tuple({"rank": p.rank, "factored": p.factored, "rows": len(r), "per_head": arch.per_head_qkv}
                               for p, r in zip(low.parts, rows))
                rank, factored = sum(g["rank"] for g in groups), all(g["factored"] for g in groups)
            else:
                low = LowRankLinear.from_weight(weight, bias, rank_for_ratio(weight.shape[0], weight.shape[1], ratio))
                rank, factored = low.rank, low.factored
        records.append(CompressionRecord(
            block=source, projection=path, shape=(int(weight.shape[0]), int(weight.shape[1])), rank=rank,
            factored=factored, relative_error=relative_frobenius_error(weight, low.dense_weight()), groups=groups))
        setattr(parent, attr, low.to(weight.dtype))
    return records


def _record_json(record: CompressionRecord) -> dict:
    entry = record.__dict__ | {"shape": list(record.shape), "groups": list(record.groups)}
    if not record.groups:
        del entry["groups"]  # separate projections: as before fused ones were supported
    return entry


def source_facts(model: nn.Module, fingerprint: str) -> dict:
    """What the manifest records of the source model (its weights may be on the meta device)."""
    return {"num_layers": len(get_layers(model)), "fingerprint": fingerprint, "num_params": count_parameters(model),
            "model_type": model.config.model_type, "dtype": model_dtype(model)}


def check_importance(config: EmulatorConfig, importance: LayerReplaceArtifact | None, facts: dict) -> dict | None:
    """The stage-1 scores the strategy needs (None for uniform drop), from an artifact made on
    this very model; also checks N_a against the depth."""
    middle_layers(facts["num_layers"], config.num_adapter_layers)
    if not config.needs_importance:
        return importance.scores if importance is not None else None
    if importance is None:
        raise ConfigError(
            f"strategy {config.method!r} needs a layer-replace artifact (--importance DIR); "
            "make one with `scaleot-fed layer-replace`"
        )
    importance.check_fingerprint(facts["fingerprint"])
    return importance.scores


def build_emulator(
    model: nn.Module,
    config: EmulatorConfig,
    importance: LayerReplaceArtifact | None = None,
    source_model: str = "",
    calibration: torch.Tensor | None = None,
) -> Emulator:
    """Build an emulator from the full model (which is left unchanged).

    Parameters
    ----------
    model:
        The full causal LM.
    config:
        Strategy and ``(N_a, alpha, rank_keep_ratio)``.
    importance:
        Stage-1 artifact; required by the strategies that need importance scores (``scaleot``,
        ``importance-drop``), checked to come from this very model.
    source_model:
        Name recorded in the manifest.
    calibration:
        ``(sequences, length)`` token ids a strategy that needs calibration text measures the
        full model on (``crash`` clusters the blocks on them; ignored by the others).

    A checkpoint too big for memory: :func:`scaleot_fed.streaming.build_emulator_streaming`.
    """
    arch = architecture_of(model)
    facts = source_facts(model, model_fingerprint(model))
    method = config.emulator_strategy
    middle = middle_layers(facts["num_layers"], config.num_adapter_layers)
    measured = method.measure(model, calibration, middle, config.alpha) if method.needs_calibration else None
    inputs = PlanInputs(config.alpha, check_importance(config, importance, facts), measured)
    layout = plan_layout(facts["num_layers"], config, inputs)
    emulator_model, records = _assemble(model, arch, layout, config, importance)
    emulator = finish_emulator(emulator_model, facts, arch, layout, config, importance, records, source_model)
    if measured is not None:
        emulator.manifest[method.record_key] = method.record(measured)
    return emulator


def finish_emulator(emulator_model: nn.Module, facts: dict, arch: Architecture, layout: list[dict],
                    config: EmulatorConfig, importance: LayerReplaceArtifact | None, records: list[CompressionRecord],
                    source_model: str) -> Emulator:
    """The assembled emulator in the precision it is stored and shipped in, with its manifest."""
    dtype = facts["dtype"] if config.dtype == "auto" else resolve_dtype(config.dtype)
    place(emulator_model, torch.device("cpu"), dtype, training=False)  # what is saved and shipped (buffers
    # such as rotary frequencies keep their float32, as in the full model)
    manifest = _manifest(facts, emulator_model, arch, layout, config, importance, records, source_model)
    manifest["dtype"] = str(dtype).removeprefix("torch.")
    return Emulator(model=emulator_model, manifest=manifest)


def _assemble(model: nn.Module, arch: Architecture, layout: list[dict], config: EmulatorConfig,
              importance: LayerReplaceArtifact | None) -> tuple[nn.Module, list[CompressionRecord]]:
    """A copy of ``model`` whose blocks follow ``layout`` (harmonizers, compressed, kept)."""
    emulator_model = copy.deepcopy(model)
    source_blocks = get_layers(emulator_model, arch)
    blocks: dict[int, nn.Module] = {}
    records: list[CompressionRecord] = []
    for entry in layout:
        src = entry["source"]
        if entry["kind"] == "harmonizer":
            blocks[src] = copy.deepcopy(importance.harmonizers[src])
        elif entry["kind"] != "shared":
            blocks[src] = source_blocks[src]
            if entry["kind"] == "compressed":
                records.extend(compress_block(blocks[src], arch, src, config.rank_keep_ratio))
    for entry in layout:  # after the kept blocks: a shared position runs its kept block as compressed
        if entry["kind"] == "shared":
            blocks[entry["source"]] = shared_copy(blocks[entry["of"]])
    # a shared position takes its kept block's per-layer config (attention type, ...): it runs that block
    set_layers(emulator_model, [blocks[e["source"]] for e in layout], [e.get("of", e["source"]) for e in layout])
    emulator_model.eval()
    return emulator_model, records


def _manifest(facts: dict, emulator_model: nn.Module, arch: Architecture, layout: list[dict],
              config: EmulatorConfig, importance: LayerReplaceArtifact | None, records: list[CompressionRecord],
              source_model: str) -> dict:
    """What the emulator is, block by block, and where it came from (``manifest.json``)."""
    num_layers = facts["num_layers"]
    kinds = {k: [e["source"] for e in layout if e["kind"] == k]
             for k in ("adapter", "block", "compressed", "harmonizer", "shared")}
    present = {e["source"] for e in layout}
    return {
        "format": MANIFEST_FORMAT,
        "scaleot_fed_version": __version__,
        "source_model": source_model,
        "base_model": base_model_reference(source_model),  # for peft's adapter_config, resolved here
        "source_fingerprint": facts["fingerprint"],
        "architecture": arch.name,
        "model_type": facts["model_type"],
        "num_layers": num_layers,
        "emulator_num_layers": len(layout),
        "strategy": config.method,  # (the file format's key: the emulator's method)
        "alpha": config.alpha,
        "rank_keep_ratio": config.rank_keep_ratio,
        "adapter_layers": kinds["adapter"],
        "kept_layers": sorted(kinds["block"] + kinds["compressed"]),
        "compressed_layers": kinds["compressed"],
        "replaced_layers": [i for i in range(num_layers)
                            if i not in present or i in kinds["harmonizer"] or i in kinds["shared"]],
        "harmonizer_layers": kinds["harmonizer"],
        "shared_layers": {str(e["source"]): e["of"] for e in layout if e["kind"] == "shared"},
        "dropped_layers": [i for i in range(num_layers) if i not in present],
        "harmonizer_rank": importance.meta["harmonizer_rank"] if kinds["harmonizer"] else None,
        "importance": (
            {"path": str(importance.path), "ranking_least_important_first": importance.meta["ranking_least_important_first"]}
            if importance is not None and config.needs_importance
            else None
        ),
        "layout": layout,
        "compression": [_record_json(r) for r in records],
        "num_params": count_parameters(emulator_model),
        "source_num_params": facts["num_params"],
    }
