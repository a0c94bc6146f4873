"""Model speed: image-encoder time per 1024 px tile and decoder time per 64 prompts.

Full-size models with random weights are built in memory (nothing is downloaded), for each
family, in float32, bfloat16 and float32 + torch.compile. Prints a Markdown table of the
median of --runs timed runs (after one untimed warm-up run, which also compiles).

    python benchmarks/model_speed.py                       # all families, 5 runs
    python benchmarks/model_speed.py --models sam-vit-b --runs 1 --modes fp32,bf16
    python benchmarks/model_speed.py --models sam-vit-b,sam2.1-hiera-tiny --modes fp32 \
        --backends torch,onnx,onnx-int8 --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from terrasam.errors import TerrasamError
from terrasam.models import adapter_class, get_spec
from terrasam.models.device import compile_modules, resolve_device
from terrasam.models.registry import family_module
from terrasam.testing import random_model

DEFAULT_MODELS = ("sam-vit-b", "sam-hq-vit-b", "slimsam-50", "slimsam-77", "sam2.1-hiera-tiny",
                  "edgetam", "sam3")
MODES = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False),
         "compile": (torch.float32, True)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed(fn, device, runs: int) -> float:
    fn()  # warm-up (and compilation)
    _sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(model_id: str, mode: str, device: torch.device, runs: int, prompts: int,
          backend: str = "torch"):
    """(encoder seconds per tile, decoder seconds per `prompts` prompts)."""
    spec = get_spec(model_id)
    module = family_module(spec.family)
    dtype, compiled = MODES[mode]
    model = random_model(model_id, size="full", seed=0)
    encoder = None
    if backend != "torch":  # exported from the float32 weights (cached, keyed by their hash)
        from terrasam.models import onnx_backend

        encoder = onnx_backend.load_encoder(model, spec.family, None, backend, device)
    adapter = adapter_class(module, spec.family)(model, spec, device, dtype)
    if encoder is not None:  # and the generator's decodes (float32 only; else torch's)
        adapter.encoder = encoder
        onnx_backend.attach_decoder(adapter, encoder.sha256)
    if compiled:
        compile_modules(*[getattr(adapter.model, n) for n in ("vision_encoder", "mask_decoder")
                          if hasattr(adapter.model, n)])
    size = adapter.image_size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    points = rng.uniform(0, size, (prompts, 1, 2))
    labels = np.ones((prompts, 1), dtype=np.int64)
    embedding = adapter.embed(image)
    enc = _timed(lambda: adapter.embed(image), device, runs)
    dec = _timed(lambda: adapter.decode(embedding, points, labels), device, runs)
    return enc, dec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backends", default="torch",
                        help="comma-separated runtimes: torch, onnx, onnx-int8 (ORT encoder, "
                             "and ORT decoder for single-point float32 prompts as the CLI)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{device.type}, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; median of {args.runs} run(s)\n")
    print(f"| model | mode | backend | encoder s / {1024} px tile | decoder s / {args.prompts} "
          "prompts |")
    print("| --- | --- | --- | ---: | ---: |")
    for model_id in args.models.split(","):
        spec = get_spec(model_id)
        module = family_module(spec.family, required=False)
        try:  # e.g. EdgeTAM without timm
            if module is not None and hasattr(module, "check_available"):
                module.check_available()
        except TerrasamError:
            module = None
        if module is None:
            print(f"| {model_id} | - | - | not available | not available |")
            continue
        for mode in args.modes.split(","):
            for backend in args.backends.split(","):
                try:
                    enc, dec = bench(model_id, mode, device, args.runs, args.prompts, backend)
                    print(f"| {model_id} | {mode} | {backend} | {enc:.3f} | {dec:.3f} |",
                          flush=True)
                except Exception as exc:  # a mode a device cannot run is reported, not fatal
                    print(f"| {model_id} | {mode} | {backend} | failed: {type(exc).__name__} "
                          f"| |", flush=True)


if __name__ == "__main__":
    main()
