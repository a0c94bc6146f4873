"""The ONNX Runtime backend: encoder speed and how many fp32 masks each backend reproduces.

For each model, full-size prompt-sensitive random weights are built in memory
(``terrasam.testing.random_model(..., prompt_sensitive=True)``; nothing is downloaded) and run
three ways: ``torch`` (fp32), ``onnx`` (the encoder exported to ONNX, fp32, ONNX Runtime) and
``onnx-int8`` (the same export after ``onnxruntime.quantization.quantize_dynamic``). The
exports go to the terrasam ONNX cache (``TERRASAM_ONNX_CACHE`` or ``~/.cache/terrasam/onnx``;
``--cache DIR`` here), keyed by the weights' sha256: the first run exports, later runs reuse.

Printed per model and backend:

* encoder seconds per 1024 x 1024 tile (median of --runs after one warm-up call) and the
  ratio to torch;
* the automatic mask generator on the same tile (the ONNX backends with ORT's decoder, as
  the command line; ``TERRASAM_ONNX_DECODER=0`` for terrasam's) (thresholds 0 and NMS off, so that masks
  survive random weights and every prompt's masks are compared): its time, its masks, and
  the share of torch's fp32 masks it reproduces at IoU >= 0.9 and at IoU >= 0.95.

The image: the top-left of ../shared/data/naip_2020_5m.tif reflect-padded to 1024 x 1024 (as
amg_parity.py), or a seeded synthetic scene when that file is absent.

    python benchmarks/onnx_speed.py --runs 5                                     # the table
    python benchmarks/onnx_speed.py --models sam-vit-b --runs 1 --points-per-side 4 --size tiny  # smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from amg_parity import DEFAULT_IMAGE, load_image, match_share  # noqa: E402

BACKENDS = ("torch", "onnx", "onnx-int8")


def _image(path: Path, size: int) -> np.ndarray:
    if path.exists():
        return load_image(path, size)
    rng = np.random.default_rng(0)
    img = np.full((size, size, 3), 60, np.uint8)
    for _ in range(24):
        y, x = rng.integers(0, size - 64, 2)
        h, w = rng.integers(16, size // 4, 2)
        img[y:y + h, x:x + w] = rng.integers(0, 256, 3)
    return img


def _adapters(model_id: str, size: str, backends):
    """{backend: adapter} sharing one float32 model; the ORT ones with their load time."""
    from terrasam.models import adapter_class, get_spec, onnx_backend
    from terrasam.models.registry import family_module
    from terrasam.testing import random_model

    spec = get_spec(model_id)
    model = random_model(model_id, size=size, seed=0, prompt_sensitive=True)
    make = adapter_class(family_module(spec.family), spec.family)
    out, load_s = {}, {}
    for backend in backends:
        adapter = make(model, spec, torch.device("cpu"), torch.float32)
        if backend != "torch":
            t = time.perf_counter()
            onnx_backend.attach(adapter, backend)
            load_s[backend] = time.perf_counter() - t
        out[backend] = adapter
    return out, load_s


def _median_time(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="sam-vit-b,sam2.1-hiera-tiny")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--runs", type=int, default=5, help="timed encoder runs (median)")
    ap.add_argument("--points-per-side", type=int, default=16,
                    help="AMG point grid for the mask comparison")
    ap.add_argument("--size", default="full", choices=["full", "tiny"],
                    help="tiny: the test suite's small models (a smoke test, not a benchmark)")
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--cache", type=Path, default=None, help="ONNX cache folder")
    ap.add_argument("--threads", type=int, default=0, help="torch/ORT threads (0: default)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cache:
        import os

        os.environ["TERRASAM_ONNX_CACHE"] = str(args.cache)
    import onnxruntime

    from terrasam.amg import AMGParams, generate

    backends = args.backends.split(",")
    if backends[0] != "torch":
        ap.error("--backends must start with torch (the reference)")
    image = _image(args.image, 1024)
    header = (f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
              f"{torch.get_num_threads()} threads, {args.size} random weights "
              f"(prompt-sensitive), 1024 x 1024 tile, encoder: median of {args.runs}; AMG: "
              f"{args.points_per_side}² points, thresholds 0, NMS off, one run")
    print(header, flush=True)
    rows = []
    for model_id in args.models.split(","):
        adapters, load_s = _adapters(model_id, args.size, backends)
        ref_masks, enc_ref = None, None
        for backend in backends:
            a = adapters[backend]
            enc = _median_time(lambda a=a: a.embed(image), args.runs)
            params = AMGParams.for_family(a.family, points_per_side=args.points_per_side,
                                          pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                          box_nms_thresh=1.0)
            a.decode(a.embed(image), np.full((1, 1, 2), 512.0))  # exports the ORT decoder
            t = time.perf_counter()
            masks = [(r.mask, r.bbox) for r in generate(a, image, params)]
            amg_s = time.perf_counter() - t
            if backend == "torch":
                ref_masks, enc_ref = masks, enc
            row = {"model": model_id, "backend": backend, "enc": enc, "ratio": enc_ref / enc,
                   "amg": amg_s, "masks": len(masks),
                   "m90": match_share(ref_masks, masks, 0.9),
                   "m95": match_share(ref_masks, masks, 0.95),
                   "load": load_s.get(backend)}
            rows.append(row)
            print(f"{model_id:18s} {backend:9s} encoder {enc:7.3f} s (x{row['ratio']:.2f}) "
                  f"AMG {amg_s:7.2f} s masks {len(masks):5d} reproduced "
                  f"{100 * row['m90']:5.1f}% @0.9 {100 * row['m95']:5.1f}% @0.95"
                  + (f" (export/load {row['load']:.1f} s)" if row["load"] else ""), flush=True)
    command = "python benchmarks/onnx_speed.py " + " ".join(sys.argv[1:] if argv is None
                                                           else argv)
    print(f"\n`{command.strip()}`\n\n{header}\n")
    print("| model | backend | encoder s / 1024² tile | vs torch | AMG s | masks | "
          "fp32 masks reproduced (IoU ≥ 0.9) | (IoU ≥ 0.95) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['backend']} | {r['enc']:.2f} | {r['ratio']:.2f}x | "
              f"{r['amg']:.1f} | {r['masks']} | {100 * r['m90']:.1f}% | {100 * r['m95']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
