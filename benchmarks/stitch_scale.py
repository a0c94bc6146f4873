"""Stitching at scale: one object over every tile, time per tile as the raster grows.

Runs the :class:`terrasam.stitch.Stitcher` alone (no model, no raster file) on in-memory
scenes tiled like ``terrasam segment`` tiles (512 px tiles, 128 px overlap): each tile's
"masks" are its 8-connected components, as ``tests/oracle.ComponentsJob`` makes them.

* ``lattice``: one lattice of 2 px lines every 16 px over the whole raster, one object of
  thousands of holes that spans every tile (issue 14: the stitch phase of such an object
  used to grow faster than its parts). ``--canvas-limit`` (default 1024², the library's is
  4096²) makes it take the large-object path (kept in blocks, joined by
  ``terrasam.vectorize.join_blocks``) from the first row on, so every row times that path;
  the result is checked against vectorising the whole scene at once (same pixels, same
  holes);
* ``blobs`` (with ``--blobs``): many small separate objects, for comparison.

Prints tiles, parts, stitch seconds, seconds per tile and the ratio of seconds per tile to the
first (20-tile) row, the median of ``--runs`` runs; and the longest single call into GEOS or
GDAL during stitching (Python cannot act on Ctrl-C inside one: this bounds how long an
interrupt waits). Timings on a shared machine vary: read
the ratios. Usage: ``python benchmarks/stitch_scale.py [--runs 3] [--blobs] [--canvas-limit N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import shapely
from affine import Affine
from scipy import ndimage

import terrasam.stitch
from terrasam.stitch import Stitcher
from terrasam.tiling import MaskRecord, make_grid
from terrasam.vectorize import mask_to_geometry

TILE, OVERLAP = 512, 128
LAYOUTS = ((4, 5), (5, 10), (10, 10), (20, 20))  # tiles down x across: 20 ... 400 tiles
LONGEST = [0.0]  # the longest single native call timed by _timed


def _timed(module, name):
    """Wrap module.name so that each call's duration updates LONGEST."""
    inner = getattr(module, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            LONGEST[0] = max(LONGEST[0], time.perf_counter() - t0)

    setattr(module, name, wrapper)


for _name in ("union_all", "union", "simplify", "point_on_surface", "polygons"):
    _timed(shapely, _name)
_timed(terrasam.stitch, "mask_to_geometry")  # one rasterio (GDAL) polygonize per block


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


def run(scene, rows: int, cols: int, canvas_limit: int, check: bool = False
        ) -> tuple[int, int, float, int]:
    """(tiles, parts, stitch seconds, objects) of one scene of rows x cols tiles."""
    step = TILE - OVERLAP
    height, width = rows * step + OVERLAP, cols * step + OVERLAP
    fg = scene(height, width)
    grid = make_grid(width, height, Affine.identity(), tile_size=TILE, overlap=OVERLAP)
    tiles = list(grid.tiles)
    # the masks are made before the clock starts: only stitching is timed
    results = [(t, components(fg[t.y0:t.y0 + t.height, t.x0:t.x0 + t.width])) for t in tiles]
    parts = sum(len(r) for _, r in results)
    stitcher = Stitcher(tiles, width, height, canvas_limit=canvas_limit)
    t0 = time.perf_counter()
    objects = []
    for tile, records in results:
        objects += stitcher.add_tile(tile, records)
    objects += stitcher.finish()
    seconds = time.perf_counter() - t0
    if check:
        whole = mask_to_geometry(fg, Affine.identity(), 8)
        got = shapely.union_all([o.geometry for o in objects])
        assert shapely.symmetric_difference(got, whole).area == 0, "not the scene's pixels"
        assert (shapely.get_num_interior_rings(got) == shapely.get_num_interior_rings(whole)
                or len(objects) > 1), "holes differ from the whole scene's"
    return len(tiles), parts, seconds, len(objects)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--blobs", action="store_true", help="also the many-small-objects scene")
    ap.add_argument("--canvas-limit", type=int, default=1024**2,
                    help="pixels of an object's box above which it is kept in blocks")
    ap.add_argument("--max-tiles", type=int, default=400, help="skip layouts above this")
    args = ap.parse_args()
    scenes = [("lattice", lattice)] + ([("blobs", blobs)] if args.blobs else [])
    for name, scene in scenes:
        print(f"\n{name}")
        print(f"{'tiles':>6} {'parts':>7} {'objects':>8} {'stitch s':>9} {'s/tile':>7} "
              f"{'ratio':>6} {'longest call s':>15}")
        first = None
        for rows, cols in LAYOUTS:
            if rows * cols > args.max_tiles:
                continue
            LONGEST[0] = 0.0
            runs = [run(scene, rows, cols, args.canvas_limit, check=(i == 0))
                    for i in range(args.runs)]
            n, parts, _, objects = runs[0]
            seconds = statistics.median(r[2] for r in runs)
            per_tile = seconds / n
            first = first or per_tile
            print(f"{n:>6} {parts:>7} {objects:>8} {seconds:>9.2f} {per_tile:>7.3f} "
                  f"{per_tile / first:>6.2f} {LONGEST[0]:>15.2f}", flush=True)


if __name__ == "__main__":
    main()
