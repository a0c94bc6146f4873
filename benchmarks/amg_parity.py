"""Parity and speed of terrasam's automatic mask generator against Meta's official ones.

Runs in the optional parity environment (see benchmarks/README.md), which has the official
``segment-anything`` and ``sam2`` packages. For each model it writes a full-size,
random-weight checkpoint in Meta's format (``terrasam.testing.random_checkpoint``,
prompt-sensitive so that masks differ between prompts), loads that one file in the official
package and in terrasam, and runs on the same 1024 x 1024 RGB image:

* ``official``: SamAutomaticMaskGenerator / SAM2AutomaticMaskGenerator,
* ``exact``: terrasam.amg.generate with the same parameters,
* ``fast``: the same plus prompt pruning, with the model in ``--fast-dtype`` (bfloat16 by
  default, as the command line's ``--fast``; ``--fast-dtype float32`` isolates the
  generator's own share),

under three settings: the family's default thresholds (``default``), thresholds at 0 so that
masks survive random weights (``low``), and the same with NMS off (``per-prompt``,
``box_nms_thresh`` 1.0: one mask per prompt and output, compared one to one).

Printed per run: median time (of --official-runs runs of the official generator, of --runs
runs of each terrasam mode, whose time split is its last run's), ratio to official, masks
matched at IoU >= 0.95 in both directions (share of official masks with a terrasam match,
and the reverse), coverage; at the end a Markdown table for benchmarks/README.md.
Empty masks (kept by the official generators when the stability threshold is 0) are left
out of the official side: terrasam never returns empty masks.

The image: the top-left 934 x 723 of ../shared/data/naip_2020_5m.tif (bands 1-3, 2-98 %
percentile stretch to uint8 unless already uint8), reflect-padded to 1024 x 1024 (no
resampling: every pixel is a source pixel or its mirror).

    python benchmarks/amg_parity.py --official-runs 1 --runs 3 --markdown parity.md
    python benchmarks/amg_parity.py --models sam-vit-b --settings default --runs 1
    python benchmarks/amg_parity.py --points-per-side 8 --settings per-prompt --runs 1  # smoke
    python benchmarks/amg_parity.py --settings default,per-prompt --runs 2 --backend onnx
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "naip_2020_5m.tif"
SAM2_CONFIGS = {
    "sam2.1-hiera-tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1-hiera-small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2-hiera-tiny": "configs/sam2/sam2_hiera_t.yaml",
}
SETTINGS = {
    "default": {},
    "low": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
    "per-prompt": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0},
}


def load_image(path: Path, size: int = 1024) -> np.ndarray:
    """An (size, size, 3) uint8 image: bands 1-3, stretched, reflect-padded."""
    import rasterio

    with rasterio.open(path) as src:
        data = src.read([1, 2, 3], window=((0, min(size, src.height)), (0, min(size, src.width))))
    data = np.moveaxis(data, 0, -1)
    if data.dtype != np.uint8:
        out = np.empty(data.shape, np.uint8)
        for b in range(3):
            lo, hi = np.nanpercentile(data[..., b], [2, 98])
            out[..., b] = np.clip((data[..., b] - lo) / max(hi - lo, 1e-9) * 255, 0, 255)
        data = out
    h, w = data.shape[:2]
    return np.pad(data, ((0, size - h), (0, size - w), (0, 0)), mode="reflect")


def official_model(model_id: str, family: str, ckpt: Path):
    """The official package's model, loaded once per checkpoint."""
    if family in ("sam", "sam_hq"):
        from segment_anything import sam_model_registry

        variant = model_id.split("-", 1)[1].replace("-", "_")  # sam-vit-b -> vit_b
        return sam_model_registry[variant](checkpoint=str(ckpt)).eval()
    from sam2.build_sam import build_sam2

    return build_sam2(SAM2_CONFIGS[model_id], str(ckpt), device="cpu")


def official_generator(model, family: str, params: dict):
    if family in ("sam", "sam_hq"):
        from segment_anything import SamAutomaticMaskGenerator

        keys = ("points_per_side", "points_per_batch", "pred_iou_thresh",
                "stability_score_thresh", "stability_score_offset", "box_nms_thresh",
                "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio",
                "crop_n_points_downscale_factor", "min_mask_region_area")
        return SamAutomaticMaskGenerator(model, **{k: params[k] for k in keys})
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    keys = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
            "stability_score_offset", "mask_threshold", "box_nms_thresh", "crop_n_layers",
            "crop_nms_thresh", "crop_overlap_ratio", "crop_n_points_downscale_factor",
            "min_mask_region_area", "use_m2m", "multimask_output")
    return SAM2AutomaticMaskGenerator(model, **{k: params[k] for k in keys})


def crop_to_box(mask: np.ndarray):
    """(mask cropped to its box, (x0, y0, x1, y1) exclusive) or None when empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return None
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return mask[y0:y1, x0:x1].copy(), (int(x0), int(y0), int(x1), int(y1))


def match_share(a: list, b: list, thr: float = 0.95) -> float:
    """Share of masks in ``a`` (cropped mask, box) with a mask in ``b`` at IoU >= thr."""
    if not a:
        return 1.0 if not b else 0.0
    areas_b = np.array([m.sum() for m, _ in b])
    order = np.argsort(areas_b)
    sorted_areas = areas_b[order]
    hits = 0
    for m, (x0, y0, x1, y1) in a:
        area = m.sum()
        lo, hi = np.searchsorted(sorted_areas, [area * thr, area / thr + 1e-9])
        for j in order[lo:hi]:
            mb, (u0, v0, u1, v1) = b[j]
            if u0 >= x1 or u1 <= x0 or v0 >= y1 or v1 <= y0:
                continue
            X0, Y0, X1, Y1 = min(x0, u0), min(y0, v0), max(x1, u1), max(y1, v1)
            ca = np.zeros((Y1 - Y0, X1 - X0), bool)
            cb = np.zeros_like(ca)
            ca[y0 - Y0:y1 - Y0, x0 - X0:x1 - X0] = m
            cb[v0 - Y0:v1 - Y0, u0 - X0:u1 - X0] = mb
            inter = np.count_nonzero(ca & cb)
            if inter / (area + areas_b[j] - inter) >= thr:
                hits += 1
                break
    return hits / len(a)


def coverage(masks: list, shape) -> float:
    canvas = np.zeros(shape, bool)
    for m, (x0, y0, x1, y1) in masks:
        canvas[y0:y1, x0:x1] |= m
    return float(canvas.mean())


def run_official(gen, image):
    t = time.perf_counter()
    anns = gen.generate(image)
    elapsed = time.perf_counter() - t
    masks = [c for c in (crop_to_box(a["segmentation"]) for a in anns) if c is not None]
    return elapsed, masks


def run_terrasam(adapter, image, params):
    from terrasam.amg import AMGProfile, generate

    prof = AMGProfile()
    t = time.perf_counter()
    records = generate(adapter, image, params, profile=prof)
    elapsed = time.perf_counter() - t
    return elapsed, [(r.mask, r.bbox) for r in records], prof


def markdown_table(rows: list[dict]) -> str:
    """The results as a Markdown table (terrasam rows also say where the time went)."""
    lines = ["| model | thresholds | run | time (s) | speed-up | masks | official matched | "
             "terrasam matched | coverage | prompts decoded | embed / decode / upscale / post "
             "(s) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        prof = r["profile"]
        split = (f"{prof.embed_s:.1f} / {prof.decode_s:.1f} / {prof.upscale_s:.1f} / "
                 f"{prof.post_s:.1f}" if prof else "")
        matched = (f"{100 * r['off_matched']:.1f}% | {100 * r['ts_matched']:.1f}%" if prof
                   else "- | -")
        lines.append(f"| {r['model']} | {r['setting']} | {r['run']} | {r['time']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['masks']} | {matched} | "
                     f"{100 * r['coverage']:.1f}% | {r['calls']} | {split} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="sam-vit-b,sam2.1-hiera-tiny")
    ap.add_argument("--settings", default="default,low,per-prompt")
    ap.add_argument("--runs", type=int, default=3,
                    help="runs of each terrasam mode per measurement (median time)")
    ap.add_argument("--official-runs", type=int, default=1,
                    help="runs of the official generator per measurement (median time; it is "
                         "slow and its time varies little)")
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/terrasam-parity"),
                    help="where the random checkpoints are written (once)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="exact,fast",
                    help="terrasam modes to run: exact, fast, and torch (exact on the PyTorch "
                         "backend, to compare another --backend with it in the same run)")
    ap.add_argument("--backend", default="torch", choices=["torch", "onnx", "onnx-int8"],
                    help="terrasam's image-encoder runtime (onnx needs onnxruntime and onnx in "
                         "this environment; the export is cached, keyed by the checkpoint)")
    ap.add_argument("--fast-dtype", default="bfloat16",
                    help="model precision of the fast runs (the CLI's --fast uses bfloat16)")
    ap.add_argument("--markdown", type=Path, default=None,
                    help="also write the Markdown table (with the command line) to this file")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.official_runs < 1:
        ap.error("--runs and --official-runs must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from terrasam.amg import AMGParams
    from terrasam.models import load_model
    from terrasam.models.registry import get_spec
    from terrasam.testing import random_checkpoint

    image = load_image(args.image)
    header = (f"image {args.image.name}: {image.shape[1]}x{image.shape[0]} (reflect-padded), "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"device {args.device}, terrasam backend {args.backend}, "
              f"{args.official_runs} official run(s), {args.runs} "
              "terrasam run(s) per mode, median times")
    print(header)
    rows = []
    for model_id in args.models.split(","):
        spec = get_spec(model_id)
        ckpt = args.workdir / f"random-{spec.meta_file}"
        if not ckpt.exists():
            random_checkpoint(model_id, ckpt, size="full", format="meta", seed=0,
                              prompt_sensitive=True)
        modes = args.modes.split(",")
        adapter = load_model(model_id, checkpoint=str(ckpt), device=args.device, dtype="float32",
                             backend=args.backend)
        adapters = {"exact": adapter, "fast": adapter if args.fast_dtype == "float32" else
                    load_model(model_id, checkpoint=str(ckpt), device=args.device,
                               dtype=args.fast_dtype, backend=args.backend)}
        if "torch" in modes:
            adapters["torch"] = (adapter if args.backend == "torch" else
                                 load_model(model_id, checkpoint=str(ckpt), device=args.device,
                                            dtype="float32", backend="torch"))
        official = official_model(model_id, spec.family, ckpt)
        for setting in args.settings.split(","):
            params = AMGParams.for_family(spec.family, points_per_side=args.points_per_side,
                                          **SETTINGS[setting])
            fast_params = AMGParams.for_family(spec.family, **{**vars(params), "fast": True})
            gen = official_generator(official, spec.family, vars(params))
            times = {"official": [], "exact": [], "fast": [], "torch": []}
            masks, profs = {}, {"official": None}
            for _ in range(args.official_runs):
                t, masks["official"] = run_official(gen, image)
                times["official"].append(t)
            for name, prm in (("exact", params), ("fast", fast_params), ("torch", params)):
                for _ in range(args.runs if name in modes else 0):
                    t, masks[name], profs[name] = run_terrasam(adapters[name], image, prm)
                    times[name].append(t)
            t_off = statistics.median(times["official"])
            for name in ["official"] + [m for m in ("exact", "fast", "torch") if m in modes]:
                t, prof, found = statistics.median(times[name]), profs[name], masks[name]
                rows.append(dict(
                    model=model_id, setting=setting, run=name, time=t, ratio=t_off / t,
                    masks=len(found),
                    off_matched=match_share(masks["official"], found) if prof else 1.0,
                    ts_matched=match_share(found, masks["official"]) if prof else 1.0,
                    coverage=coverage(found, image.shape[:2]),
                    calls=prof.decoder_calls if prof else len(params.layer_grids()[0]),
                    profile=prof))
                r = rows[-1]
                print(f"{model_id:18s} {setting:10s} {name:8s} {t:8.2f}s x{r['ratio']:5.2f} "
                      f"masks {r['masks']:5d} matched {100 * r['off_matched']:5.1f}%/"
                      f"{100 * r['ts_matched']:5.1f}% coverage {100 * r['coverage']:5.1f}% "
                      f"prompts {r['calls']}  {prof or ''}", flush=True)
    table = markdown_table(rows)
    command = "python benchmarks/amg_parity.py " + " ".join(sys.argv[1:] if argv is None
                                                           else argv)
    print(f"\n`{command.strip()}`\n\n{header}\n\n{table}")
    if args.markdown:
        args.markdown.write_text(f"`{command.strip()}`\n\n{header}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
