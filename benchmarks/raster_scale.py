"""Memory and time of `segment` as the raster grows: 2k x 2k, 8k x 8k, 20k x 20k.

Synthetic flat-colour scenes (a rectangle of its own colour in every 256 px cell, on a dark
background) are written strip by strip, never held whole. Each run is a child process, so the
peak RSS printed is that run's own. Models: the oracle of the tests (exact masks, cheap model),
a tiny random-weight SAM (real model code path, thresholds lowered so masks survive) and
"full": the default model (SAM 2.1 hiera-tiny) at full size with random weights, default
32 x 32 point grid, thresholds lowered so masks survive (the worst case for the non-model share).

    python benchmarks/raster_scale.py                      # 2k and 8k, both models
    python benchmarks/raster_scale.py --sizes 2000,8000,20000 --models oracle
    python benchmarks/raster_scale.py --sizes 2048 --models full
    python benchmarks/raster_scale.py --objects 10000,300000 --objects-size 6000
    python benchmarks/raster_scale.py --stats mean,std,min,max,median,count --sizes 2000,20000

``--objects``: memory against the number of objects, one raster size. The scene holds about
that many small rectangles (the cell shrinks as the count grows); the oracle runs as a tile
job that returns every connected object of a tile (no decoder), with a label raster, so the
run is all engine, spill, stitching, vectorising, streaming writes and label burning.

``--stats``: the oracle run twice per size, without and with per-object statistics (the listed
ones over every band, plus the band expression ``--stats-index``), so the table shows what the
statistics add: peak RSS and seconds.

Columns: peak RSS (MB), wall seconds, seconds per megapixel, the model share (time inside the
automatic mask generator: encoder, decoder, filters) and non-model share (reading, spilling,
stitching, vectorising, writing), objects and tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BACKGROUND = (20, 20, 20)
CELL = 256


def _hash(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    h = (a.astype(np.uint64) * np.uint64(73856093)) ^ (b.astype(np.uint64) * np.uint64(19349663))
    h ^= np.uint64(salt * 83492791)
    h = (h ^ (h >> np.uint64(13))) * np.uint64(0x5BD1E995)
    return (h ^ (h >> np.uint64(15))) & np.uint64(0xFFFFFFFF)


def write_scene(path: Path, size: int, strip: int = 512, cell: int = CELL) -> Path:
    """A size x size uint8 RGB GeoTIFF, one rectangle per ``cell`` px cell, written by strips."""
    import rasterio
    from rasterio.windows import Window

    if path.exists():
        return path
    meta = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
            "crs": "EPSG:32614", "transform": rasterio.Affine(0.5, 0, 500000, 0, -0.5, 4100000),
            "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate",
            "bigtiff": "IF_SAFER"}
    tmp = path.with_suffix(".part.tif")
    cols = np.arange(size)
    cx, ox = cols // cell, cols % cell
    lo, span = max(1, cell * 40 // 256), max(1, cell * 180 // 256)
    with rasterio.open(tmp, "w", **meta) as ds:
        for r0 in range(0, size, strip):
            rows = np.arange(r0, min(r0 + strip, size))
            cy, oy = rows // cell, rows % cell
            cyy, cxx = np.meshgrid(cy, cx, indexing="ij")
            w = lo + _hash(cxx, cyy, 1) % span  # rectangle size and offset inside its cell
            h = lo + _hash(cxx, cyy, 2) % span
            x0 = _hash(cxx, cyy, 3) % (cell - w)  # at most cell - w - 1: a gap to the next
            y0 = _hash(cxx, cyy, 4) % (cell - h)
            inside = ((ox[None, :] >= x0) & (ox[None, :] < x0 + w)
                      & (oy[:, None] >= y0) & (oy[:, None] < y0 + h))
            out = np.empty((3, rows.size, size), np.uint8)
            for b in range(3):
                colour = (60 + _hash(cxx, cyy, 10 + b) % 190).astype(np.uint8)
                out[b] = np.where(inside, colour, BACKGROUND[b])
            ds.write(out, window=Window(0, r0, size, rows.size))
    os.replace(tmp, path)
    return path


def child(args) -> None:
    """One run in this process; prints one JSON line."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from terrasam import api

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kw = dict(tile_size=args.tile_size, overlap=args.tile_size // 4, scale="none", quiet=True,
              overwrite=True, keep_workdir=False)
    if args.model == "components":
        from oracle import ComponentsJob, OracleAdapter

        kw.update(adapter=OracleAdapter(background=BACKGROUND, flat=True),
                  job=ComponentsJob(BACKGROUND), return_frame=False,
                  label_raster=str(Path(args.output).with_suffix(".labels.tif")))
    elif args.model == "oracle":
        from oracle import OracleAdapter

        kw.update(adapter=OracleAdapter(background=BACKGROUND, flat=True),
                  points_per_side=args.oracle_points,
                  points_per_batch=8)
    elif args.model == "full":
        kw.update(checkpoint=args.checkpoint, device="cpu", dtype="float32",
                  pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=100)
    else:
        kw.update(checkpoint=args.checkpoint, device="cpu", points_per_side=4,
                  pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=100)
    if args.stats:
        kw.update(stats=args.stats, index=[args.stats_index] if args.stats_index else None)
    t0 = time.perf_counter()
    gdf = api.segment(args.raster, args.output, **kw)
    wall = time.perf_counter() - t0
    info = gdf.attrs["terrasam"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_mb": peak / 1024, "import_rss_mb": base_rss / 1024,
                      "wall_s": wall, "model_s": info["model_s"], "objects": info["objects"],
                      "tiles": info["tiles"], "stitch_s": info["stitch_s"],
                      "write_s": info["write_s"], "read_wait_s": info["read_wait_s"],
                      "peak_held_pixels": info["peak_held_pixels"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,8000")
    ap.add_argument("--models", default="oracle,tiny")
    ap.add_argument("--tile-size", type=int, default=1024)
    ap.add_argument("--oracle-points", type=int, default=8,
                    help="oracle runs: points per tile side (fewer: faster, same memory pattern)")
    ap.add_argument("--objects", help="object counts (one raster size): memory vs objects")
    ap.add_argument("--objects-size", type=int, default=6000)
    ap.add_argument("--stats", help="statistics (e.g. mean,std,count): oracle runs with and "
                                    "without them, per size")
    ap.add_argument("--stats-index", default="gr=(b2-b1)/(b2+b1)",
                    help="--stats runs: a band expression that also gets the statistics")
    ap.add_argument("--dir", default=str(HERE.parent / ".bench"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--raster", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.objects:
        objects_table(args, work)
        return
    if args.stats:
        stats_table(args, work)
        return
    models = args.models.split(",")
    ckpts = {"tiny": work / "sam-vit-b-tiny", "full": work / "sam2.1_hiera_tiny_random.pt"}
    for name, path in ckpts.items():
        if name in models and not path.exists():
            from terrasam.testing import random_checkpoint

            if name == "tiny":
                random_checkpoint("sam-vit-b", path, size="tiny", seed=0)
            else:
                random_checkpoint("sam2.1-hiera-tiny", path, size="full", format="meta",
                                  seed=0, prompt_sensitive=True)
    print(f"{'model':7} {'size':>6} {'tiles':>5} {'objects':>7} {'peak RSS MB':>11} "
          f"{'wall s':>8} {'s/MP':>6} {'model %':>7} {'other %':>7}", flush=True)
    for model in models:
        first_rss = None
        for size in (int(s) for s in args.sizes.split(",")):
            raster = write_scene(work / f"scene_{size}.tif", size)
            r = run_child(args, model, raster, work / f"out_{model}_{size}.gpkg",
                          ckpts.get(model, ckpts["tiny"]))
            if r is None:
                continue
            mp = size * size / 1e6
            first_rss = first_rss or r["peak_rss_mb"]
            print(f"{model:7} {size:>6} {r['tiles']:>5} {r['objects']:>7} "
                  f"{r['peak_rss_mb']:>11.0f} {r['wall_s']:>8.1f} {r['wall_s'] / mp:>6.2f} "
                  f"{100 * r['model_s'] / r['wall_s']:>7.1f} "
                  f"{100 * (1 - r['model_s'] / r['wall_s']):>7.1f}"
                  f"   (RSS x{r['peak_rss_mb'] / first_rss:.2f} of the smallest)", flush=True)


def run_child(args, model: str, raster: Path, output: Path, checkpoint: Path,
              extra: tuple = ()) -> dict | None:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--raster", str(raster),
           "--output", str(output), "--tile-size", str(args.tile_size), "--oracle-points",
           str(args.oracle_points), "--checkpoint", str(checkpoint), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{model} {raster.name}: failed\n{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def objects_table(args, work: Path) -> None:
    """Peak RSS against the number of objects on one raster size."""
    size = args.objects_size
    print(f"{'raster':>7} {'cell px':>7} {'objects':>8} {'tiles':>5} {'peak RSS MB':>11} "
          f"{'wall s':>7} {'stitch s':>8} {'write s':>7}", flush=True)
    first = None
    for target in (int(n) for n in args.objects.split(",")):
        cell = max(4, int(size / target ** 0.5))
        raster = write_scene(work / f"scene_{size}_c{cell}.tif", size, cell=cell)
        out = work / f"objects_{size}_c{cell}.gpkg"
        r = run_child(args, "components", raster, out, work / "unused")
        if r is None:
            continue
        first = first or r["peak_rss_mb"]
        print(f"{size:>7} {cell:>7} {r['objects']:>8} {r['tiles']:>5} {r['peak_rss_mb']:>11.0f} "
              f"{r['wall_s']:>7.1f} {r['stitch_s']:>8.1f} {r['write_s']:>7.1f}"
              f"   (RSS x{r['peak_rss_mb'] / first:.2f} of the first)", flush=True)



def stats_table(args, work: Path) -> None:
    """What per-object statistics add to an oracle run: peak RSS and seconds, per size."""
    print(f"{'size':>6} {'tiles':>5} {'objects':>7} {'columns':>7} {'RSS MB':>7} "
          f"{'+stats MB':>9} {'wall s':>7} {'+stats s':>8} {'added s':>7} {'added %':>7}",
          flush=True)
    extra = ("--stats", args.stats, "--stats-index", args.stats_index or "")
    first = None
    for size in (int(s) for s in args.sizes.split(",")):
        raster = write_scene(work / f"scene_{size}.tif", size)
        plain = run_child(args, "oracle", raster, work / f"out_oracle_{size}.gpkg", work)
        stats = run_child(args, "oracle", raster, work / f"out_stats_{size}.gpkg", work, extra)
        if plain is None or stats is None:
            continue
        import geopandas as gpd

        columns = len(gpd.read_file(work / f"out_stats_{size}.gpkg", rows=1).columns) - \
            len(gpd.read_file(work / f"out_oracle_{size}.gpkg", rows=1).columns)
        added = stats["wall_s"] - plain["wall_s"]
        first = first or stats["peak_rss_mb"]
        print(f"{size:>6} {stats['tiles']:>5} {stats['objects']:>7} {columns:>7} "
              f"{plain['peak_rss_mb']:>7.0f} {stats['peak_rss_mb']:>9.0f} "
              f"{plain['wall_s']:>7.1f} {stats['wall_s']:>8.1f} {added:>7.1f} "
              f"{100 * added / plain['wall_s']:>7.1f}"
              f"   (+stats RSS x{stats['peak_rss_mb'] / first:.2f} of the smallest)", flush=True)


if __name__ == "__main__":
    main()
