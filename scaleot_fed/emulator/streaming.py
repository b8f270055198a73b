"""Big checkpoints without the full model in memory: safetensors read tensor by tensor.

:func:`build_emulator_streaming` materialises only what the emulator keeps (embeddings, head,
adapter and kept blocks), one block at a time, compressing each kept middle block as soon as it is
read; replaced and dropped blocks are never read. It writes the same files as
:func:`~scaleot_fed.emulator_build.build_emulator` on the loaded model, byte for byte.

:func:`plug_in_streaming` writes the plugged-in model one block at a time as sharded safetensors
with an index (``from_pretrained`` loads it): each block of the checkpoint is read, an adapter
block gets the trained state (tensors replaced, or LoRA merged as peft merges it), and the block
is written before the next one is read.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..arch import architecture_of, block_index_of_key, get_layers, set_layers
from ..artifact import LayerReplaceArtifact
from ..errors import ConfigError, IntegrityError
from ..files import save_tensors, write_atomic
from ..models import fingerprint_of
from .config import EmulatorConfig
from .io import Emulator, save_emulator

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SIDE_FILES = (".json", ".txt", ".model", ".jinja")
"""What a plugged-in model folder takes from the checkpoint besides weights (config, tokenizer)."""


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class TensorFiles:
    """The tensors of a safetensors checkpoint folder (one file, or shards with an index), read
    one at a time, by the model's state-dict key (the files may drop the base-model prefix).

    Tensors are read with plain file reads into fresh tensors, not through a memory map: the
    pages of a mapped checkpoint count in the reader's resident memory for as long as the map
    lives, which would bring the whole checkpoint back into the process."""

    def __init__(self, folder: str | Path, base_model_prefix: str = "", renames: list[tuple[str, str]] = ()) -> None:
        self.folder = Path(folder)
        self._headers: dict[str, tuple[dict, int]] = {}
        if (self.folder / INDEX).is_file():
            self.shard_of: dict[str, str] = json.loads((self.folder / INDEX).read_text())["weight_map"]
        elif (self.folder / SINGLE).is_file():
            self.shard_of = dict.fromkeys(self._header(SINGLE)[0], SINGLE)
        else:
            raise ConfigError(f"{self.folder} holds no {SINGLE} or {INDEX}: streaming reads safetensors "
                              "checkpoints; run without --stream")
        self.file_key = {k: k for k in self.shard_of}  # model key -> key in the files
        for pattern, replacement in renames:  # transformers' renames of older checkpoint keys
            for key in self.shard_of:
                renamed = re.sub(pattern, replacement, key)
                if renamed != key:
                    self.file_key.setdefault(renamed, key)
        if base_model_prefix:
            for key in self.shard_of:
                if not key.startswith(base_model_prefix + "."):
                    self.file_key.setdefault(f"{base_model_prefix}.{key}", key)  # GPT-2's hub files

    def _header(self, shard: str) -> tuple[dict, int]:
        """A shard's tensor table (minus ``__metadata__``) and where its data starts."""
        if shard not in self._headers:
            with open(self.folder / shard, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            header.pop("__metadata__", None)
            self._headers[shard] = (header, 8 + size)
        return self._headers[shard]

    def __contains__(self, key: str) -> bool:
        return key in self.file_key

    def dtype_name(self, key: str) -> str:
        """The safetensors dtype of model key ``key`` (``F32``, ``BF16``, ...), from the header."""
        file_key = self.file_key[key]
        return self._header(self.shard_of[file_key])[0][file_key]["dtype"]

    def get(self, key: str) -> torch.Tensor:
        """The tensor of model key ``key``, read from its shard."""
        file_key = self.file_key[key]
        shard = self.shard_of[file_key]
        header, base = self._header(shard)
        info = header[file_key]
        start, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
        raw = tensor.reshape(-1).view(torch.uint8).numpy()  # (bytes,) view of the tensor's storage
        with open(self.folder / shard, "rb") as handle:
            handle.seek(base + start)
            if handle.readinto(raw) != end - start or raw.nbytes != end - start:
                raise IntegrityError(f"{self.folder / shard}: tensor {file_key} is truncated")
        return tensor


def local_folder(spec: str) -> Path:
    """``--model`` as a local folder of safetensors: a folder, an alias, a GGUF (converted once), or
    a hub id (its safetensors, config and tokenizer files downloaded once, not loaded)."""
    from ..models import resolve_model_path

    path = Path(resolve_model_path(spec))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(spec, allow_patterns=["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja"]))


def meta_model(folder: str | Path) -> tuple[nn.Module, TensorFiles]:
    """The model of ``folder`` on the meta device (no memory) in the precision ``from_pretrained``
    would pick (the config's dtype, else the files'), and its tensor files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    files = TensorFiles(folder)
    dtype = getattr(config, "dtype", None)
    if dtype is None:
        # the first floating tensor's dtype, from the headers alone (no tensor is read)
        kinds = [files.dtype_name(k) for k in files.file_key]
        dtype = next((DTYPES[n] for n in kinds if DTYPES[n].is_floating_point), torch.float32)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), TensorFiles(folder, model.base_model_prefix, checkpoint_renames(model))


def checkpoint_renames(model: nn.Module) -> list[tuple[str, str]]:
    """The key renames ``from_pretrained`` applies to this model's checkpoints (GPT-NeoX files
    name the head ``embed_out``, the model ``lm_head``), as ``(pattern, replacement)``. Only
    plain renames: conversions that merge tensors are not streamed (the key is reported missing)."""
    try:
        from transformers.conversion_mapping import extract_weight_conversions_for_model
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # a transformers without conversion mappings renames nothing
        return []
    return [(t.source_patterns[0], t.target_patterns[0]) for t in extract_weight_conversions_for_model(model) or []
            if type(t) is WeightRenaming and len(t.source_patterns) == len(t.target_patterns) == 1]


def _tied(model: nn.Module) -> dict[str, str]:
    """State-dict keys that are the same tensor as an earlier key (tied embeddings)."""
    first: dict[int, str] = {}
    tied = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        tied.update({name: first[id(tensor)]} if id(tensor) in first else {})
        first.setdefault(id(tensor), name)
    return tied


def lazy_state(model: nn.Module, files: TensorFiles) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.state_dict()`` items sorted by key, each read from ``files`` when reached, in the
    model's precision (as ``from_pretrained`` casts them: the fingerprint of the loaded model)."""
    tied, state = _tied(model), model.state_dict(keep_vars=True)
    for name in sorted(state):
        source = name if name in files else tied.get(name, name)
        if source not in files:
            raise ConfigError(f"{files.folder}: no tensor for {name} (the files' keys differ from the model's); "
                              "run without --stream")
        tensor = files.get(source)
        yield name, tensor.to(state[name].dtype) if tensor.is_floating_point() else tensor


def _materialise(model: nn.Module, named: list[tuple[str, nn.Module]], files: TensorFiles, recurse: bool,
                 skip: set[str] = frozenset()) -> None:
    """Give each ``(prefix, module)`` real CPU tensors: from ``files``, and non-persistent
    buffers (rotary frequencies, embedding scales) computed as ``from_pretrained`` does."""
    init = getattr(model, "_init_weights", None)
    for _, module in named:
        module.to_empty(device="cpu", recurse=recurse)
        for sub in module.modules() if recurse else [module]:
            if init is not None and sub._non_persistent_buffers_set:
                init(sub)
    with torch.no_grad():
        for prefix, module in named:
            for name, tensor in module.state_dict(keep_vars=True).items():
                key = f"{prefix}.{name}" if prefix else name
                if (recurse or "." not in name) and key not in skip:
                    if key not in files:
                        raise ConfigError(f"{files.folder}: no tensor for {key}; run without --stream")
                    tensor.copy_(files.get(key))


def load_outside_blocks(model: nn.Module, files: TensorFiles) -> None:
    """Everything of ``model`` but its decoder blocks (embeddings, final norm, head), tied again."""
    blocks = {id(m) for m in get_layers(model).modules()}
    tied = set(_tied(model))
    named = [(n, m) for n, m in model.named_modules() if id(m) not in blocks
             and (m._parameters or m._buffers)]
    _materialise(model, named, files, recurse=False, skip=tied)
    if tied:
        model.tie_weights()


def load_block(model: nn.Module, index: int, files: TensorFiles) -> nn.Module:
    """Decoder block ``index`` of ``model``, read from ``files`` (in place)."""
    arch = architecture_of(model)
    block = get_layers(model, arch)[index]
    _materialise(model, [(f"{arch.layers_path}.{index}", block)], files, recurse=True)
    return block


def build_emulator_streaming(folder: str | Path, config: EmulatorConfig, out: str | Path,
                             importance: LayerReplaceArtifact | None = None, source_model: str = "",
                             tokenizer=None) -> Path:
    """Write the emulator of the checkpoint in ``folder`` to ``out`` without loading the model:
    the files :func:`~scaleot_fed.emulator.build.build_emulator` + ``save_emulator`` write. A
    strategy that measures the full model first (``crash``) cannot be built this way."""
    from .build import check_importance, compress_block, finish_emulator, plan_layout, source_facts
    from .strategy import PlanInputs

    if not config.emulator_strategy.streamable:
        raise ConfigError(f"the {config.method} strategy measures the full model on calibration text before it "
                          "chooses; build it in memory (without --stream)")
    model, files = meta_model(folder)
    facts = source_facts(model, fingerprint_of(lazy_state(model, files)))
    layout = plan_layout(facts["num_layers"], config, PlanInputs(config.alpha, check_importance(config, importance, facts)))
    load_outside_blocks(model, files)
    arch, blocks, records = architecture_of(model), [], []
    for entry in layout:  # one source block in memory at a time, compressed as soon as it is read
        if entry["kind"] == "harmonizer":
            blocks.append(copy.deepcopy(importance.harmonizers[entry["source"]]))
            continue
        block = load_block(model, entry["source"], files)
        if entry["kind"] == "compressed":
            records.extend(compress_block(block, arch, entry["source"], config.rank_keep_ratio))
        blocks.append(block)
    set_layers(model, blocks, [e["source"] for e in layout])
    emulator = finish_emulator(model.eval(), facts, arch, layout, config, importance, records, source_model)
    return save_emulator(Emulator(model=emulator.model, manifest=emulator.manifest), out, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- plug-in


def _lora_updates(adapter_dir: Path, adapters: set[int], model: nn.Module) -> dict[str, Callable]:
    """model key -> function adding the merged LoRA delta, as peft's ``merge_and_unload`` does:
    ``W += transpose(B @ A, fan_in_fan_out) * scaling`` (in float32 for half weights on a CPU)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        raise ConfigError(f"{adapter_dir}: rank/alpha patterns and DoRA are merged only without --stream")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    arch, updates = architecture_of(model), {}
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        module = key.split("base_model.model.", 1)[-1].split(".lora_A.", 1)[0]
        block = block_index_of_key(arch, module)
        if block is None or block not in adapters:
            raise IntegrityError(f"LoRA in {adapter_dir} touches {module}, outside the adapter blocks {sorted(adapters)}")
        b = state[key.replace(".lora_A.", ".lora_B.")]

        def merge(weight: torch.Tensor, a=a, b=b) -> torch.Tensor:
            half = weight.dtype in (torch.float16, torch.bfloat16)
            delta = b.float() @ a.float() if half else b.to(weight.dtype) @ a.to(weight.dtype)
            delta = (delta.T if config.get("fan_in_fan_out") else delta) * scaling
            return weight + delta.to(weight.dtype)

        updates[f"{module}.weight"] = merge
    return updates


def _state_updates(path: Path, manifest: dict, model: nn.Module) -> dict[str, Callable]:
    """model key -> function returning the trained tensor (a full / BitFit state file)."""
    from ..plugin import load_adapter_state

    arch, adapters, updates = architecture_of(model), set(manifest["adapter_layers"]), {}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    for key, tensor in load_adapter_state(path, manifest).items():
        block = block_index_of_key(arch, key)
        if block is None or block not in adapters:
            raise IntegrityError(f"trained state key {key} is not in an adapter block {sorted(adapters)}")
        if key not in shapes:
            raise ConfigError(f"trained state key {key} is not in the model (bottleneck adapters add modules): "
                              "plug in without --stream")
        if shapes[key] != tuple(tensor.shape) or not torch.isfinite(tensor).all():
            raise IntegrityError(f"trained state {key} has shape {tuple(tensor.shape)} (the model {shapes[key]}) "
                                 "or holds NaN/Inf")
        updates[key] = lambda weight, t=tensor: t.to(weight.dtype)
    return updates


def plug_in_streaming(folder: str | Path, manifest: dict, trained: str | Path, out: str | Path) -> Path:
    """Write ``folder``'s model with ``trained`` (a state file or peft LoRA folder, full-model
    numbering) plugged in, as one safetensors shard per block plus an index, to ``out``."""
    from ..plugin import check_fingerprint, check_trained_path

    folder, trained, out = Path(folder), Path(trained), Path(out)
    model, files = meta_model(folder)
    check_fingerprint(fingerprint_of(lazy_state(model, files)), manifest)
    is_lora = check_trained_path(trained)
    updates = (_lora_updates(trained, set(manifest["adapter_layers"]), model) if is_lora
               else _state_updates(trained, manifest, model))
    arch = architecture_of(model)
    keys = set(model.state_dict(keep_vars=True))
    model_key = {f: m for m, f in files.file_key.items() if m in keys}  # file key -> the model's key
    groups: dict[int | None, list[str]] = {}
    for file_key in files.shard_of:
        groups.setdefault(block_index_of_key(arch, model_key.get(file_key, file_key)), []).append(file_key)
    out.mkdir(parents=True, exist_ok=True)
    order = sorted(groups, key=lambda b: -1 if b is None else b)
    weight_map, total, done = {}, 0, set()
    for n, block in enumerate(order, 1):  # one block's tensors in memory at a time
        tensors = {}
        for file_key in groups[block]:
            key = model_key.get(file_key, file_key)
            tensor = files.get(key)
            if key in updates:
                tensor = updates[key](tensor)
                done.add(key)
            tensors[file_key] = tensor
        name = f"model-{n:05d}-of-{len(order):05d}.safetensors"
        save_tensors({k: v.contiguous() for k, v in tensors.items()}, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(v.numel() * v.element_size() for v in tensors.values())
        del tensors
    missing = sorted(set(updates) - done)
    if missing:
        raise IntegrityError(f"trained tensors {missing[:3]} have no counterpart in {folder}")
    write_atomic(out / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in SIDE_FILES and path.name != INDEX:
            shutil.copy2(path, out / path.name)
    return out
