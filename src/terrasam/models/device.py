"""Device, precision and torch.compile choices for a model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from terrasam.errors import TerrasamError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" picks CUDA, then MPS, then CPU; an explicit device must be available."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise TerrasamError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise TerrasamError("--device cuda was asked for but PyTorch sees no CUDA GPU here")
    if kind == "mps" and not _mps_available():
        raise TerrasamError("--device mps was asked for but the Apple MPS backend is not available")
    return torch.device(name)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None
                  ) -> torch.dtype:
    """"auto" is bfloat16 on a CUDA GPU that supports it, float32 everywhere else."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower()
    device = device or torch.device("cpu")
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise TerrasamError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TerrasamError("this GPU does not support bfloat16; use --dtype float16 or float32")
    return DTYPES[name]


def compile_cache_dir() -> Path:
    """Where torch.compile keeps its compiled kernels between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "terrasam" / "torch_compile"


def compile_modules(*modules: torch.nn.Module, cache_dir: str | Path | None = None) -> None:
    """torch.compile the given modules in place, with an on-disk kernel cache."""
    cache = Path(cache_dir) if cache_dir else compile_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    for module in modules:
        module.compile()


# Decoder memory per prompt: the two-way transformer and the mask upscaling run once per prompt
# on its own copy of the image embedding (measured: +1.0 GB for 64 prompts, SAM 2.1 Hiera-Tiny,
# float32, 1024 px). On a CPU, 16 prompts a call peak at a quarter of that and ran faster than
# 64 (SAM 2.1 tiny 2.35 s against 2.64 s per 64 prompts, SAM ViT-B 2.65 s against 3.79 s).
_DECODE_BYTES_PER_PROMPT = 16 << 20
_CPU_DECODE_BATCH = 16


def decode_batch_for(device: torch.device, requested: int, share: float = 0.5,
                     most: int = 1024) -> int:
    """Prompts per decoder call when none is set: on CUDA as many as fit in ``share`` of the
    GPU memory free now (between min(16, requested) and ``most``); elsewhere at most 16."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return min(requested, _CPU_DECODE_BATCH)
    free, _total = torch.cuda.mem_get_info(device)
    fit = int(free * share) // _DECODE_BYTES_PER_PROMPT
    return int(max(min(16, requested), min(most, fit)))
