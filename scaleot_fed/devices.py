"""Where a model runs and in which precision.

``device``: ``auto`` (CUDA when present, else Apple's MPS, else the CPU), ``cpu``, ``cuda``,
``cuda:N`` or ``mps``. ``dtype``: ``float32``, ``bfloat16`` or ``float16``. Frozen weights are
stored in the run's dtype (half the memory in bf16); trained parameters, and so the optimizer's
state, stay in float32; the forward runs under autocast in the run's dtype. In a Ray simulation a
client actor given ``num_gpus`` sees only its GPU(s) (``CUDA_VISIBLE_DEVICES``), so ``auto`` and
``cuda`` pick the one Ray assigned.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(spec: str) -> None:
    """The spelling of a device (whether it exists is :func:`resolve_device`'s business)."""
    if not isinstance(spec, str) or not DEVICE_PATTERN.match(spec):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps; got {spec!r}")


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def resolve_device(spec: str = "auto") -> torch.device:
    """The device ``spec`` names, checked to exist here (one line saying what there is if not)."""
    check_device(spec)
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"device {spec!r}: this machine has {count} CUDA device(s); use device = \"auto\" "
                              "or \"cpu\"")
    if device.type == "mps" and not has_mps:
        raise ConfigError("device 'mps': Apple's Metal backend is not available here; use \"auto\" or \"cpu\"")
    return device


CPU_UNITS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
"""The x86 instructions that multiply a half-precision dtype natively (without them it is emulated)."""


def cpu_multiplies_natively(dtype: torch.dtype) -> bool | None:
    """Whether this CPU has matrix instructions for ``dtype`` (:data:`CPU_UNITS`); None where torch
    cannot tell (an older torch, a non-x86 CPU). float32 is always native."""
    if dtype == torch.float32:
        return True
    get = getattr(torch.cpu, "get_capabilities", None)
    capabilities = get() if get is not None else {}
    if capabilities.get("architecture") != "x86_64" or dtype not in CPU_UNITS:
        return None
    return any(capabilities.get(unit) for unit in CPU_UNITS[dtype])


def place(model: nn.Module, device: torch.device, dtype: torch.dtype, training: bool = True) -> nn.Module:
    """Move ``model`` to ``device``; frozen parameters in ``dtype``, parameters that train in
    float32 (with ``training=False``, for scoring: every parameter in ``dtype``)."""
    model.to(device)
    for param in model.parameters():
        wanted = torch.float32 if param.requires_grad and training else dtype
        if param.is_floating_point() and param.dtype != wanted:
            param.data = param.data.to(wanted)
    return model


@functools.cache
def _warn_emulated(name: str) -> None:
    warnings.warn(f"dtype {name} on this CPU, which has no {' or '.join(CPU_UNITS[DTYPES[name]])} instructions: its matmuls "
                  "are emulated, about 12x slower than float32 (benchmarks/precision.py); use dtype = \"float32\" here",
                  RuntimeWarning, stacklevel=3)


@dataclass
class Placement:
    """Where a config's model runs and in which precision: the base of every config section
    that runs a model (fine-tuning, stage 1, distillation)."""

    device: str = "auto"
    """``auto`` (CUDA if present, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    dtype: str = "float32"
    """Frozen weights in ``float32``, ``bfloat16`` or ``float16`` (trained parameters and the
    optimizer state stay float32; the forward runs under autocast)."""

    def __post_init__(self) -> None:
        check_device(self.device)
        resolve_dtype(self.dtype)

    def apply(self, model: nn.Module, training: bool = True) -> nn.Module:
        """:func:`place` ``model`` on this device, frozen weights (with ``training=False``: all
        weights) in this dtype, to run there.

        Warns (once per process and dtype) where that is half precision on a CPU with no
        instructions for it: its matmuls are emulated, measured 12x slower than float32
        (``benchmarks/precision.py``), where a CPU with AVX512-BF16 trained bf16 LoRA 2x faster.
        (Not in :func:`place`, which also only stores weights in a dtype.)"""
        device, dtype = resolve_device(self.device), resolve_dtype(self.dtype)
        if device.type == "cpu" and cpu_multiplies_natively(dtype) is False:
            _warn_emulated(self.dtype)
        return place(model, device, dtype, training)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The lowest floating precision among the model's parameters (what its forward runs in)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    for dtype in (torch.float16, torch.bfloat16):
        if dtype in dtypes:
            return dtype
    return torch.float32


@contextlib.contextmanager
def autocast_for(model: nn.Module) -> Iterator[None]:
    """Autocast in the model's precision when it holds low-precision weights (float32: nothing),
    so float32 trained parameters and bf16/fp16 frozen ones meet in one forward."""
    dtype = model_dtype(model)
    if dtype == torch.float32:
        yield
        return
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global random state (dropout masks, new parameters' initialisation) drawn from ``seed``
    inside, and restored after: what runs inside computes the same whatever ran before it in the
    process. Forks ``device``'s CUDA state too, and never initialises CUDA for a CPU model."""
    gpus = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.random.default_generator.manual_seed(seed)
        if gpus:
            torch.cuda.manual_seed(seed)
        yield
