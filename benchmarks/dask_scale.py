"""Tiles per second of `segment` on the local engine and on 1 and 2 single-thread Dask workers.

One synthetic scene (flat-colour rectangles, see raster_scale.py), one tiny random-weight SAM
checkpoint (real model code; with the family's default thresholds random weights keep no mask,
so every tile costs the same encoder + decoder work and the client has nothing to stitch),
each run a child process (so the peak RSS printed is the client's own: the LocalCluster's
workers are other processes). Medians of ``--runs`` runs; speed-ups against 1 worker in the
same invocation. Start-up (cluster, imports, model loading in every process) is done before
the clock starts; "worker busy" is the share of the workers' time spent inside the tile job.

    python benchmarks/dask_scale.py                       # 1408 px raster: 16 tiles of 512 px
    python benchmarks/dask_scale.py --size 3072 --runs 5

It ends with the machine ceiling: the encoder alone, one torch thread, in one process and in
two concurrent processes; 2 workers cannot scale better than that ratio.

The local engine runs torch with all cores; a Dask worker with one thread runs torch with one
(distributed sets OMP_NUM_THREADS=1 for its workers).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CONFIGS = [("local", {}), ("dask 1x1", {"workers": 1}), ("dask 2x1", {"workers": 2})]


def _warm(ref) -> None:
    ref.load()  # imports and the model: loaded once per process, kept for every tile


def child(args) -> None:
    from terrasam import api
    from terrasam.models.ref import ModelRef

    kw = dict(checkpoint=args.checkpoint, tile_size=args.tile_size,
              overlap=args.tile_size // 4, scale="none", quiet=True, overwrite=True,
              points_per_side=args.points, return_frame=False)
    engine = "local"
    ref = ModelRef.for_run(None, args.checkpoint)  # the reference segment() will use
    _warm(ref)
    if args.workers:
        from terrasam.engines.dask import DaskEngine

        # cluster start-up and each worker's imports and model loading are not part of the
        # tile rate (a real run pays them once, not per tile)
        engine = DaskEngine(workers=args.workers, threads_per_worker=1)
        engine.client.wait_for_workers(args.workers)
        engine.client.run(_warm, ref)
    t0 = time.perf_counter()
    gdf = api.segment(args.raster, args.output, engine=engine, **kw)
    wall = time.perf_counter() - t0
    if args.workers:
        engine.close()
    info = gdf.attrs["terrasam"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "tiles": info["tiles"], "objects": info["objects"],
                      "model_s": info["model_s"],
                      "peak_rss_mb": peak}))


def ceiling_child(args) -> None:
    """Encoder forwards per second in this process with one torch thread (for --ceiling)."""
    import numpy as np
    import torch

    from terrasam.models.ref import ModelRef

    torch.set_num_threads(1)
    adapter = ModelRef.for_run(None, args.checkpoint).load()
    rgb = np.random.default_rng(0).integers(0, 255, (args.tile_size, args.tile_size, 3),
                                            dtype=np.uint8)
    adapter.embed(rgb)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.ceiling_s:
        adapter.embed(rgb)
        n += 1
    print(json.dumps({"rate": n / (time.perf_counter() - t0)}))


def ceiling(args, ckpt: Path) -> tuple[float, float]:
    """Machine ceiling: summed encoder rate of 2 concurrent 1-thread processes vs 1 alone."""
    cmd = [sys.executable, __file__, "--ceiling-child", "--checkpoint", str(ckpt),
           "--tile-size", str(args.tile_size), "--ceiling-s", str(args.ceiling_s)]

    def rates(k):
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(k)]
        return [json.loads(p.communicate()[0].strip().splitlines()[-1])["rate"] for p in procs]

    one = statistics.median(rates(1)[0] for _ in range(args.runs))
    two = statistics.median(sum(rates(2)) for _ in range(args.runs))
    return one, two


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1408)
    ap.add_argument("--tile-size", type=int, default=512)
    ap.add_argument("--points", type=int, default=8, help="points per tile side")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=str(HERE.parent / ".bench"))
    ap.add_argument("--ceiling-s", type=float, default=8.0,
                    help="seconds per machine-ceiling probe (0: skip the probe)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ceiling-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--raster", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.ceiling_child:
        ceiling_child(args)
        return
    from raster_scale import write_scene
    from terrasam.testing import random_checkpoint

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    raster = write_scene(work / f"scene_{args.size}.tif", args.size)
    ckpt = work / "sam-vit-b-tiny"
    if not ckpt.exists():
        random_checkpoint("sam-vit-b", ckpt, size="tiny", seed=0)
    results: dict[str, list[dict]] = {name: [] for name, _ in CONFIGS}
    for _ in range(args.runs):  # interleaved, so drift in the machine hits every config
        for name, extra in CONFIGS:
            cmd = [sys.executable, __file__, "--child", "--raster", str(raster), "--output",
                   str(work / "dask_scale.gpkg"), "--checkpoint", str(ckpt), "--tile-size",
                   str(args.tile_size), "--points", str(args.points),
                   "--workers", str(extra.get("workers", 0))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    one = statistics.median(r["tiles"] / r["wall_s"] for r in results["dask 1x1"])
    print(f"raster {args.size} px, tiles {args.tile_size} px, {args.points}x{args.points} "
          f"points, median of {args.runs}")
    print(f"{'engine':10} {'tiles':>5} {'objects':>7} {'wall s':>7} {'tiles/s':>7} "
          f"{'vs 1 worker':>11} {'worker busy':>11} {'client peak RSS MB':>18}")
    for name, extra in CONFIGS:
        rs = results[name]
        rate = statistics.median(r["tiles"] / r["wall_s"] for r in rs)
        n = extra.get("workers", 1)
        busy = statistics.median(r["model_s"] / (n * r["wall_s"]) for r in rs)
        print(f"{name:10} {rs[0]['tiles']:>5} {rs[0]['objects']:>7} "
              f"{statistics.median(r['wall_s'] for r in rs):>7.1f} {rate:>7.3f} "
              f"{rate / one:>10.2f}x {100 * busy:>10.0f}% "
              f"{statistics.median(r['peak_rss_mb'] for r in rs):>18.0f}")
    if args.ceiling_s > 0:
        c1, c2 = ceiling(args, ckpt)
        print(f"machine ceiling: encoder forwards/s with one torch thread: 1 process {c1:.2f}, "
              f"2 concurrent processes {c2:.2f} in all = {c2 / c1:.2f}x (no 2-worker run can "
              f"beat this ratio on this machine)")


if __name__ == "__main__":
    main()
