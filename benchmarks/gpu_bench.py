"""GPU timings per 1024 px tile: image encoder, decoder (64 prompts) and the whole automatic
mask generator, for full-size models with random weights, in float32 and bfloat16.

Every timing synchronises the GPU before reading the clock. Run by benchmarks/gpu_check.sh;
on its own:

    python benchmarks/gpu_bench.py --models sam2.1-hiera-tiny,sam-vit-b --modes fp32,bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import MODES, _sync, _timed  # noqa: E402
from terrasam.amg import AMGParams, generate  # noqa: E402
from terrasam.models import adapter_class, get_spec  # noqa: E402
from terrasam.models.device import decode_batch_for, resolve_device  # noqa: E402
from terrasam.models.registry import family_module  # noqa: E402
from terrasam.testing import random_model  # noqa: E402


def bench(model_id: str, mode: str, device: torch.device, runs: int, prompts: int) -> dict:
    """Median seconds of encoder, decoder and AMG per tile, and the AMG decode batch used."""
    spec = get_spec(model_id)
    module = family_module(spec.family)
    dtype, _ = MODES[mode]
    adapter = adapter_class(module, spec.family)(random_model(model_id, size="full"), spec,
                                                 device, dtype)
    size = adapter.image_size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    points = rng.uniform(0, size, (prompts, 1, 2))
    labels = np.ones((prompts, 1), dtype=np.int64)
    with torch.inference_mode():
        embedding = adapter.embed(image)
        enc = _timed(lambda: adapter.embed(image), device, runs)
        dec = _timed(lambda: adapter.decode(embedding, points, labels), device, runs)
        params = AMGParams.for_family(spec.family)
        amg = _timed(lambda: generate(adapter, image, params), device, runs)
    _sync(device)
    batch = decode_batch_for(device, params.points_per_batch)
    return {"enc": enc, "dec": dec, "amg": amg, "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sam2.1-hiera-tiny,sam-vit-b")
    parser.add_argument("--modes", default="fp32,bf16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"device: {name}; torch {torch.__version__}; median of {args.runs} run(s) "
          f"after a warm-up; random full-size weights, default AMG thresholds")
    print(f"| model | mode | encoder s / tile | decoder s / {args.prompts} prompts "
          f"| AMG s / tile | AMG decode batch |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for model_id in args.models.split(","):
        for mode in args.modes.split(","):
            try:
                r = bench(model_id, mode, device, args.runs, args.prompts)
                print(f"| {model_id} | {mode} | {r['enc']:.4f} | {r['dec']:.4f} "
                      f"| {r['amg']:.3f} | {r['batch']} |", flush=True)
            except Exception as exc:  # a mode a device cannot run is reported, not fatal
                print(f"| {model_id} | {mode} | failed: {type(exc).__name__}: {exc} | | | |",
                      flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
