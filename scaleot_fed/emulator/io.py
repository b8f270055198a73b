"""Saving and loading an emulator folder: ``config.json``, the tokenizer, ``model.safetensors``
and ``manifest.json`` (what each block became and where it came from). The saved folder is
self-sufficient for a data owner and holds no full-rank copy of any replaced or compressed block.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..arch import Architecture, architecture_of, get_layers, set_layers
from ..devices import place, resolve_dtype
from ..errors import IntegrityError
from ..files import save_tensors, write_atomic
from ..harmonizer import Harmonizer
from ..manifest import manifest_summary
from ..src import FusedLowRankLinear, LowRankLinear
from .crash import shared_copy

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
MANIFEST_FORMAT = "scaleot-fed/emulator"
MANIFEST_KEYS = (
    "source_model", "source_fingerprint", "architecture", "num_layers", "strategy", "alpha", "rank_keep_ratio",
    "adapter_layers", "kept_layers", "compressed_layers", "replaced_layers", "harmonizer_layers", "layout",
    "num_params", "source_num_params", "weights_sha256",
)
"""What :func:`read_manifest` requires (what loading, plugging in and ``info`` read)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


@dataclass
class Emulator:
    """An emulator model with its manifest (and tokenizer when loaded from disk)."""

    model: nn.Module
    manifest: dict
    tokenizer: object = None

    @property
    def arch(self) -> Architecture:
        return architecture_of(self.model)

    def adapter_positions(self) -> dict[int, int]:
        """Emulator position -> source block index, for the adapter blocks."""
        return {p: e["source"] for p, e in enumerate(self.manifest["layout"]) if e["kind"] == "adapter"}

    def to_source_key(self, key: str) -> str:
        """Rename an emulator state-dict key of an adapter block to the full model's numbering."""
        prefix = self.arch.layers_path + "."
        if not key.startswith(prefix):
            raise IntegrityError(f"{key} is not a decoder-block parameter")
        head, _, rest = key[len(prefix):].partition(".")
        positions = self.adapter_positions()
        if int(head) not in positions:
            raise IntegrityError(f"{key} is not in an adapter block")
        return f"{prefix}{positions[int(head)]}.{rest}"

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """All adapter-block weights, keyed in the full model's numbering (the exchange format)."""
        prefix = self.arch.layers_path + "."
        positions = self.adapter_positions()
        state = {}
        for key, tensor in self.model.state_dict().items():
            if key.startswith(prefix) and int(key[len(prefix):].split(".", 1)[0]) in positions:
                state[self.to_source_key(key)] = tensor.detach().clone()
        return state

    def summary(self) -> str:
        """Human-readable description (what ``scaleot-fed info`` prints)."""
        return manifest_summary(self.manifest)


def _deduplicated_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with one name per shared tensor (tied embeddings), chosen by name order so
    that the same emulator always serialises to the same bytes (and the same sha256)."""
    state, seen = {}, set()
    for name, tensor in sorted(model.state_dict().items()):
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().contiguous()
    return state


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_emulator(emulator: Emulator, out_dir: str | Path, tokenizer=None) -> Path:
    """Write ``config.json``, tokenizer files, ``model.safetensors`` (every floating tensor in
    the manifest's ``dtype``, whatever trained since) and ``manifest.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    emulator.model.config.save_pretrained(out)
    tokenizer = tokenizer if tokenizer is not None else emulator.tokenizer
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    dtype = stored_dtype(emulator.manifest)
    state = {k: v.to("cpu", dtype) if v.is_floating_point() else v.cpu()
             for k, v in _deduplicated_state(emulator.model).items()}
    save_tensors(state, out / WEIGHTS, metadata={"format": MANIFEST_FORMAT})
    emulator.manifest["weights_sha256"] = sha256_file(out / WEIGHTS)
    write_atomic(out / MANIFEST, json.dumps(emulator.manifest, indent=1))  # last: it marks the folder complete
    return out


def _weights_format(weights: Path) -> str | None:
    """The ``format`` a safetensors file declares in its metadata (None if no file, or unreadable)."""
    from safetensors import safe_open

    if not weights.is_file():
        return None
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return (handle.metadata() or {}).get("format")
    except Exception:  # noqa: BLE001 - a damaged header makes no claim either way
        return None


def looks_like_emulator(path: str | Path) -> bool:
    """Whether ``path`` claims to be an emulator folder: it has a ``manifest.json``, or its
    ``model.safetensors`` declares the emulator format (as :func:`save_emulator` writes it). Such a
    folder is loaded as an emulator or refused, never read as a plain model."""
    path = Path(path)
    return (path / MANIFEST).is_file() or _weights_format(path / WEIGHTS) == MANIFEST_FORMAT


def read_manifest(path: str | Path) -> dict:
    """Read an emulator folder's manifest and check that it has every entry the loaders use."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        if looks_like_emulator(path):
            raise IntegrityError(f"{path} holds emulator weights but its {MANIFEST} is missing; get the emulator "
                                 "again from the model owner (or rebuild it with `scaleot-fed build-emulator`)")
        raise IntegrityError(f"{path} is not an emulator folder ({MANIFEST} is missing); "
                             "build one with `scaleot-fed build-emulator`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path / MANIFEST} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise IntegrityError(f"{path / MANIFEST} is not a {MANIFEST_FORMAT} manifest")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise IntegrityError(f"{path / MANIFEST} is incomplete: {', '.join(missing)} missing; "
                             "get the emulator again from the model owner")
    return manifest


def check_emulator_folder(path: str | Path, tokenizer: bool = True, hasher=sha256_file) -> dict:
    """Check an emulator folder whole, before anything is built from it: the manifest, weights and
    ``config.json`` are there, the weights match the manifest's sha256 (``hasher``: a file's hex
    sha256, which a caller may cache), and with ``tokenizer`` the tokenizer is there. Returns the
    manifest; raises :class:`IntegrityError`, one line naming the first missing or altered piece."""
    path = Path(path)
    manifest = read_manifest(path)
    weights = path / WEIGHTS
    for piece in (weights, path / "config.json"):
        if not piece.is_file():
            raise IntegrityError(f"emulator folder {path} is incomplete: {piece.name} is missing; "
                                 "get the emulator again from the model owner")
    if hasher(weights) != manifest["weights_sha256"]:
        raise IntegrityError(
            f"emulator weights {weights} do not match the sha256 in {path / MANIFEST}: the file was "
            "changed or corrupted; get the emulator again from the model owner"
        )
    if tokenizer and not _has_tokenizer(path):
        raise IntegrityError(f"emulator folder {path} is incomplete: the tokenizer is missing (none of "
                             f"{', '.join(TOKENIZER_FILES)}); get the emulator again from the model owner")
    return manifest


def stored_dtype(manifest: dict) -> torch.dtype:
    """The precision an emulator's weights are stored in (emulators from before it was recorded:
    float32)."""
    return resolve_dtype(manifest.get("dtype", "float32"))


def load_emulator(path: str | Path, tokenizer: bool = True, hasher=sha256_file,
                  dtype: torch.dtype | None = None) -> Emulator:
    """Load an emulator folder, checked whole first (:func:`check_emulator_folder`; with
    ``tokenizer`` its tokenizer is required and loaded); never needs the full model. Its weights
    come in the precision they were stored in (the manifest's ``dtype``) unless ``dtype`` says
    otherwise.

    Raises
    ------
    IntegrityError
        A missing manifest, weights file, ``config.json`` or tokenizer, or altered weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = check_emulator_folder(path, tokenizer, hasher)
    weights = path / WEIGHTS
    config = AutoConfig.from_pretrained(path)
    arch = architecture_of(config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    layers = get_layers(model, arch)
    hidden = int(config.hidden_size)
    by_block: dict[int, list[dict]] = {}
    for record in manifest.get("compression", []):
        by_block.setdefault(record["block"], []).append(record)
    blocks: list[nn.Module] = []
    for position, entry in enumerate(manifest["layout"]):
        if entry["kind"] == "harmonizer":
            blocks.append(Harmonizer(hidden, int(manifest["harmonizer_rank"])))
            continue
        block = layers[position]
        for record in by_block.get(entry["source"], []):
            parent_path, _, attr = record["projection"].rpartition(".")
            parent = block.get_submodule(parent_path)
            setattr(parent, attr, _compressed_projection(record, getattr(parent, attr), arch))
        blocks.append(block)
    at = {e["source"]: p for p, e in enumerate(manifest["layout"]) if e["kind"] != "shared"}
    for position, entry in enumerate(manifest["layout"]):
        if entry["kind"] == "shared":  # its weights are the kept block's (stored once)
            if entry.get("of") not in at:
                raise IntegrityError(f"{path / MANIFEST}: position {position} shares block {entry.get('of')}, "
                                     "which the emulator does not hold; get the emulator again")
            blocks[position] = shared_copy(blocks[at[entry["of"]]])
    set_layers(model, blocks)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_emulator stores one name of tied tensors (input/output embeddings); the other name is
    # reported missing although it shares the loaded storage.
    untied = [k for k in missing if not _aliases(model, k) & state.keys()]
    if untied or unexpected:
        raise IntegrityError(
            f"emulator weights in {weights} do not fit its manifest (missing {sorted(untied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    model.tie_weights()
    place(model, torch.device("cpu"), dtype or stored_dtype(manifest), training=False).eval()
    tok = AutoTokenizer.from_pretrained(path) if tokenizer else None
    return Emulator(model=model, manifest=manifest, tokenizer=tok)


def _compressed_projection(record: dict, original: nn.Module, arch: Architecture) -> nn.Module:
    """The empty low-rank module a manifest's compression ``record`` says replaced ``original``."""
    out_f, in_f = record["shape"]
    has_bias = getattr(original, "bias", None) is not None
    if not record.get("groups"):
        return LowRankLinear(in_f, out_f, record["rank"], bias=has_bias, factored=record["factored"])
    groups = record["groups"]  # a fused q/k/v projection, compressed group by group
    if [g["rows"] for g in groups] != list(arch.qkv_sizes) or groups[0]["per_head"] != arch.per_head_qkv:
        raise IntegrityError(f"{record['projection']} of block {record['block']} was compressed with another q/k/v "
                             "row layout than this version reads; rebuild the emulator")
    return FusedLowRankLinear(in_f, arch.qkv_rows(), [g["rank"] for g in groups], bias=has_bias,
                              factored=[g["factored"] for g in groups])


def _aliases(model: nn.Module, key: str) -> set[str]:
    """Other parameter names sharing the tensor named ``key`` (tied weights)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    target = named.get(key)
    return {name for name, p in named.items() if target is not None and p is target and name != key}


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in TOKENIZER_FILES)
