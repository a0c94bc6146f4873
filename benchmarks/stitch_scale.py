"""Stitching at scale: one object over every tile, time per tile as the raster grows.

Runs the :class:`terrasam.stitch.Stitcher` alone (no model, no raster file) on in-memory
scenes tiled like ``terrasam segment`` tiles (512 px tiles, 128 px overlap): each tile's
"masks" are its 8-connected components, as ``tests/oracle.ComponentsJob`` makes them.

* ``lattice``: one lattice of 2 px lines every 16 px over the whole raster, one object of
  thousands of holes that spans every tile (issue 14: the stitch phase of such an object
  used to grow faster than its parts);
* ``blobs`` (with ``--blobs``): many small separate objects, for comparison.

Prints tiles, parts, stitch seconds, seconds per tile and the ratio of seconds per tile to the
first (20-tile) row; the median of ``--runs`` runs. Timings on a shared machine vary: read
the ratios. Usage: ``python benchmarks/stitch_scale.py [--runs 3] [--blobs]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from affine import Affine
from scipy import ndimage

from terrasam.stitch import Stitcher
from terrasam.tiling import MaskRecord, make_grid

TILE, OVERLAP = 512, 128
CANVAS_LIMIT = 4096**2
LAYOUTS = ((4, 5), (5, 10), (10, 10))  # tiles down x across: 20, 50, 100 tiles


def lattice(height: int, width: int) -> np.ndarray:
    fg = np.zeros((height, width), bool)
    fg[:, np.arange(width) % 16 < 2] = True
    fg[np.arange(height) % 16 < 2, :] = True
    return fg


def blobs(height: int, width: int, seed: int = 0) -> np.ndarray:
    fg = np.zeros((height, width), bool)
    rng = np.random.default_rng(seed)
    for y, x in zip(rng.integers(0, height - 12, height * width // 2000),
                    rng.integers(0, width - 12, height * width // 2000)):
        fg[y:y + 10, x:x + 10] = True
    return fg


def components(fg: np.ndarray) -> list[MaskRecord]:
    labels, _ = ndimage.label(fg, structure=np.ones((3, 3), bool))
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is not None:
            mask = labels[sl] == i
            out.append(MaskRecord(mask, (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop),
                                  int(mask.sum()), 0.96, 0.96))
    return out


def run(scene, rows: int, cols: int) -> tuple[int, int, float, int]:
    """(tiles, parts, stitch seconds, objects) of one scene of rows x cols tiles."""
    step = TILE - OVERLAP
    height, width = rows * step + OVERLAP, cols * step + OVERLAP
    fg = scene(height, width)
    grid = make_grid(width, height, Affine.identity(), tile_size=TILE, overlap=OVERLAP)
    tiles = list(grid.tiles)
    # the masks are made before the clock starts: only stitching is timed
    results = [(t, components(fg[t.y0:t.y0 + t.height, t.x0:t.x0 + t.width])) for t in tiles]
    parts = sum(len(r) for _, r in results)
    stitcher = Stitcher(tiles, width, height, canvas_limit=CANVAS_LIMIT)
    t0 = time.perf_counter()
    objects = []
    for tile, records in results:
        objects += stitcher.add_tile(tile, records)
    objects += stitcher.finish()
    return len(tiles), parts, time.perf_counter() - t0, len(objects)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--blobs", action="store_true", help="also the many-small-objects scene")
    args = ap.parse_args()
    scenes = [("lattice", lattice)] + ([("blobs", blobs)] if args.blobs else [])
    for name, scene in scenes:
        print(f"\n{name}")
        print(f"{'tiles':>6} {'parts':>7} {'objects':>8} {'stitch s':>9} {'s/tile':>7} "
              f"{'ratio':>6}")
        first = None
        for rows, cols in LAYOUTS:
            runs = [run(scene, rows, cols) for _ in range(args.runs)]
            n, parts, _, objects = runs[0]
            seconds = statistics.median(r[2] for r in runs)
            per_tile = seconds / n
            first = first or per_tile
            print(f"{n:>6} {parts:>7} {objects:>8} {seconds:>9.2f} {per_tile:>7.3f} "
                  f"{per_tile / first:>6.2f}")


if __name__ == "__main__":
    main()
