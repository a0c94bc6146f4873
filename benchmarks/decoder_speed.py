"""Prompt-decoder speed: transformers' forward vs terrasam's adapters (shared per-image work,
re-associated attention, IoU gating) on full-size random weights and a random embedding.

    python benchmarks/decoder_speed.py [--prompts 64] [--repeats 5] [--models sam-vit-b ...]

Prints the median time of each path and its ratio to the transformers forward; all paths of
a model are timed interleaved in one run, so that ratios hold on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from terrasam.models import sam, sam2
from terrasam.models.base import Embedding
from terrasam.models.registry import MODELS
from terrasam.testing import random_model


def _setup(model_id: str, seed: int = 0):
    model = random_model(model_id, "full", seed=seed, prompt_sensitive=True)
    is2 = model_id.startswith("sam2")
    adapter = (sam2.Sam2Adapter if is2 else sam.SamAdapter)(model, MODELS[model_id], "cpu",
                                                           torch.float32)
    g = torch.Generator().manual_seed(seed)
    extra = {}
    if is2:
        extra["high_res"] = [torch.randn(1, 32, 256, 256, generator=g),
                             torch.randn(1, 64, 128, 128, generator=g)]
    feats = torch.randn(1, 256, 64, 64, generator=g)
    return adapter, Embedding(feats, (1024, 1024), (1024, 1024), extra)


def _transformers(adapter, emb, pts):
    kw = {"input_points": torch.as_tensor(pts).float()[None],  # (1, B, 1, 2)
          "input_labels": torch.ones(1, len(pts), 1, dtype=torch.int64)}
    if adapter.family == "sam2":
        kw["image_embeddings"] = [*emb.extra["high_res"], emb.features]
    else:
        kw["image_embeddings"] = emb.features
    with torch.inference_mode():
        out = adapter.model(multimask_output=True, **kw)
    return out.pred_masks, out.iou_scores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=["sam-vit-b", "sam2.1-hiera-tiny"])
    args = ap.parse_args(argv)
    print(f"torch threads: {torch.get_num_threads()}, prompts per batch: {args.prompts}")
    for model_id in args.models:
        _bench(model_id, args)


def _bench(model_id, args):
    """Time the three paths of one model, interleaved, and print medians and ratios."""
    adapter, emb = _setup(model_id)
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1024, (args.prompts, 1, 2))
    labels = np.ones((args.prompts, 1), np.int64)
    _, iou = adapter.decode(emb, pts, labels)  # warm-up, fills the per-image cache
    thresh = float(iou.flatten().median())
    passing = (iou >= thresh).any(1).float().mean().item()
    paths = {
        "transformers forward": lambda: _transformers(adapter, emb, pts),
        "terrasam decode": lambda: adapter.decode(emb, pts, labels),
        "terrasam decode + iou gating": lambda: adapter.decode(emb, pts, labels,
                                                               iou_thresh=thresh),
    }
    times = {k: [] for k in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["transformers forward"])
    print(f"\n{model_id}: iou_thresh {thresh:.4f} keeps half the masks, "
          f"{passing:.0%} of the prompts are upscaled")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:30s} {med:7.3f} s   {base / med:5.2f}x")


if __name__ == "__main__":
    main()
