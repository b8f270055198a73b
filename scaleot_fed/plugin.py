"""Plug-in: put the data owners' trained adapter blocks back into the original full model.

The exchange format for trained state is keyed in the *full model's* block numbering (an
emulator's top adapter blocks sit at other positions than in the full model), so a state can be
plugged without the emulator's weights, and a LoRA folder in that numbering loads on the original
model with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .arch import architecture_of, block_index_of_key, get_layers
from .errors import ConfigError, IntegrityError
from .files import save_tensors, usual_mode
from .models import base_model_reference, model_fingerprint

STATE_FORMAT = "scaleot-fed/adapter-state"


def check_source(model: nn.Module, manifest: dict) -> None:
    """Refuse to plug into a model other than the one the emulator was built from."""
    check_fingerprint(model_fingerprint(model), manifest)


def check_fingerprint(fp: str, manifest: dict) -> None:
    """Refuse a model whose fingerprint is not the one the emulator was built from."""
    if manifest["source_fingerprint"] != fp:
        raise IntegrityError(
            f"the emulator was built from {manifest.get('source_model')!r} (fingerprint "
            f"{manifest['source_fingerprint']}), not from this model (fingerprint {fp}); "
            "plug into the model the emulator came from"
        )


def save_adapter_state(state: dict[str, torch.Tensor], path: str | Path, manifest: dict) -> Path:
    """Write trained adapter-block weights (full-model numbering) as one safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": STATE_FORMAT, "key_space": "source", "source_fingerprint": manifest["source_fingerprint"]}
    save_tensors({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def load_adapter_state(path: str | Path, manifest: dict) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_adapter_state`, checking it belongs to ``manifest``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"trained state {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:
        raise IntegrityError(f"trained state {path} is not a readable safetensors file: {exc}") from exc
    if metadata.get("format") != STATE_FORMAT or metadata.get("key_space") != "source":
        raise IntegrityError(f"{path} is not a scaleot-fed adapter state (missing or wrong metadata)")
    if metadata.get("source_fingerprint") != manifest["source_fingerprint"]:
        raise IntegrityError(f"trained state {path} was trained on an emulator of another model")
    return state


def plug_in(model: nn.Module, manifest: dict, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy adapter-block weights into ``model`` (in place).

    Parameters
    ----------
    model:
        The original full model the emulator was built from.
    manifest:
        The emulator's manifest (says which blocks are adapters).
    state:
        Weights keyed in the full model's numbering; every key must belong to an adapter block.

    Returns
    -------
    list of str
        The keys that were written.
    """
    check_source(model, manifest)
    arch = architecture_of(model)
    adapters = set(manifest["adapter_layers"])
    from .bottleneck import add_bottleneck_adapters, bottleneck_blocks

    for block, size in bottleneck_blocks(state, arch.layers_path).items():
        if block in adapters:  # bottleneck-adapter training: the full model needs the same modules
            add_bottleneck_adapters(model, [block], size)
    target = model.state_dict()
    for key, tensor in state.items():
        block = block_index_of_key(arch, key)
        if block is None or block not in adapters:
            raise IntegrityError(f"trained state key {key} is not in an adapter block {sorted(adapters)}")
        if key not in target:
            raise IntegrityError(f"trained state key {key} does not exist in the model")
        if tuple(target[key].shape) != tuple(tensor.shape):
            raise IntegrityError(f"trained state {key} has shape {tuple(tensor.shape)}, the model {tuple(target[key].shape)}")
        if not torch.isfinite(tensor).all():
            raise IntegrityError(f"trained state {key} contains NaN or Inf")
    with torch.no_grad():
        for key, tensor in state.items():
            target[key].copy_(tensor.to(target[key].dtype))
    return sorted(state)


def plug_in_lora(model: nn.Module, manifest: dict, adapter_dir: str | Path) -> nn.Module:
    """Merge a peft LoRA folder (full-model numbering) into ``model`` and return the merged model.

    Refuses a LoRA that touches anything outside the adapter blocks.
    """
    from peft import PeftModel

    check_source(model, manifest)
    arch = architecture_of(model)
    adapters = set(manifest["adapter_layers"])
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    for name, _ in peft_model.named_modules():
        if name.endswith("lora_A"):
            inner = name.split("base_model.model.", 1)[-1]
            block = block_index_of_key(arch, inner)
            if block is None or block not in adapters:
                raise IntegrityError(f"LoRA in {adapter_dir} touches {inner}, outside the adapter blocks {sorted(adapters)}")
    return peft_model.merge_and_unload()


def check_trained_path(trained: Path) -> bool:
    """Whether ``trained`` is a peft LoRA folder (True) or a safetensors state file (False);
    anything else (another peft type, pickled weights) is refused."""
    if trained.is_dir():
        if not (trained / "adapter_config.json").is_file():
            raise ConfigError(f"{trained} is a folder without adapter_config.json: not a peft adapter folder")
        config = json.loads((trained / "adapter_config.json").read_text())
        if config.get("peft_type") != "LORA":
            raise ConfigError(f"{trained} holds a {config.get('peft_type')} adapter; plug-in merges LoRA adapters")
        if not (trained / "adapter_model.safetensors").is_file():
            # peft would fall back to a pickled adapter_model.bin: weights are taken as safetensors only
            raise IntegrityError(f"{trained} has no adapter_model.safetensors; trained states are accepted as "
                                 "safetensors only (re-export with `scaleot-fed finetune` or save_pretrained)")
        return True
    if trained.suffix != ".safetensors":
        raise IntegrityError(f"{trained}: trained states are accepted as .safetensors files or peft LoRA folders only")
    return False


def plug_in_path(model: nn.Module, manifest: dict, trained: str | Path) -> nn.Module:
    """Plug either a safetensors adapter state or a peft LoRA folder into ``model`` (a checkpoint
    too big for memory: :func:`scaleot_fed.streaming.plug_in_streaming`)."""
    trained = Path(trained)
    if check_trained_path(trained):
        return plug_in_lora(model, manifest, trained)
    plug_in(model, manifest, load_adapter_state(trained, manifest))
    return model


def export_trained(model: nn.Module, emulator, out: str | Path) -> Path:
    """Export what a data owner trained on ``emulator`` in the full model's numbering.

    A LoRA-wrapped model (peft) becomes a peft adapter folder that ``PeftModel.from_pretrained``
    loads on the original model; otherwise the trainable tensors go to one safetensors file.

    Parameters
    ----------
    model:
        The emulator model after training (possibly a ``PeftModel`` around it).
    emulator:
        The :class:`~scaleot_fed.emulator.Emulator` it was trained from (gives the numbering).
    out:
        A folder for LoRA, a ``.safetensors`` path otherwise.
    """
    out = Path(out)
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        prefix = "base_model.model."
        config = copy.deepcopy(model.peft_config["default"])
        state = get_peft_model_state_dict(model)
        renamed = {prefix + emulator.to_source_key(k[len(prefix):]): v for k, v in state.items()}
        config.target_modules = sorted(emulator.to_source_key(t + ".weight")[: -len(".weight")]
                                       for t in config.target_modules)
        manifest = emulator.manifest  # emulators built before "base_model" was recorded: resolved here
        config.base_model_name_or_path = manifest.get("base_model") or base_model_reference(manifest.get("source_model", ""))
        config.task_type = "CAUSAL_LM"  # so AutoPeftModelForCausalLM.from_pretrained(folder) loads it
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(out))
        save_tensors({k: v.detach().contiguous() for k, v in renamed.items()}, str(out / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        return out
    state = {emulator.to_source_key(n): p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    if not state:
        raise ConfigError("the model has no trainable parameters to export")
    return save_adapter_state(state, out, emulator.manifest)


def plug_in_trained(full: nn.Module, model: nn.Module, emulator) -> nn.Module:
    """A copy of ``full`` with what was trained on ``emulator`` (``model``) plugged in, going
    through the same export a data owner sends, so nothing plugs in that could not be shipped."""
    with tempfile.TemporaryDirectory() as tmp:
        name = "lora" if hasattr(model, "peft_config") else "state.safetensors"
        return plug_in_path(copy.deepcopy(full), emulator.manifest, export_trained(model, emulator, Path(tmp) / name))


@contextlib.contextmanager
def plugged_in_place(full: nn.Module, model: nn.Module, emulator) -> Iterator[nn.Module]:
    """``full`` itself with what was trained on ``emulator`` plugged in (the same export as
    :func:`plug_in_trained`), for the duration of the ``with``; its adapter blocks are put back
    afterwards. Copies the adapter blocks (a few percent of the model), not the whole model: a
    server scoring every round does not hold a second full model."""
    blocks = get_layers(full)
    originals = {i: copy.deepcopy(blocks[i]) for i in emulator.manifest["adapter_layers"]}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            name = "lora" if hasattr(model, "peft_config") else "state.safetensors"
            # merge_and_unload hands back ``full`` (LoRA merged into its blocks); a state is copied in
            plugged = plug_in_path(full, emulator.manifest, export_trained(model, emulator, Path(tmp) / name))
        yield plugged
    finally:
        for i, block in originals.items():  # also undoes added bottleneck modules
            blocks[i] = block


@contextlib.contextmanager
def plugged_for_scoring(full: nn.Module, model: nn.Module, emulator, placement) -> Iterator[nn.Module]:
    """The plug-in model placed for scoring (``placement``: a :class:`~scaleot_fed.devices.Placement`):
    ``full`` itself (:func:`plugged_in_place`) when the placement is where ``full`` already is,
    else a placed copy, so ``full`` never changes device or precision."""
    from .devices import resolve_device, resolve_dtype

    here, there = next(full.parameters()), resolve_device(placement.device)
    if (here.device.type, here.device.index or 0) == (there.type, there.index or 0) and \
            here.dtype == resolve_dtype(placement.dtype):
        with plugged_in_place(full, model, emulator) as plugged:
            yield placement.apply(plugged, training=False)
    else:
        yield placement.apply(plug_in_trained(full, model, emulator), training=False)


def save_plugged(model: nn.Module, tokenizer, out: str | Path) -> Path:
    """``save_pretrained`` the plugged-in model (and tokenizer); bottleneck adapters are recorded
    beside it so :func:`scaleot_fed.models.load_model` restores them."""
    from .arch import architecture_of
    from .bottleneck import bottleneck_blocks, save_bottleneck_info

    out = Path(out)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    blocks = bottleneck_blocks(model.state_dict(), architecture_of(model).layers_path)
    if blocks:
        save_bottleneck_info(out, blocks)
    usual_mode(out)
    return out
