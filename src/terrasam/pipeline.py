"""The tiled pipeline: grid -> engine -> stitcher (one per concept) -> ids -> CRS -> clean -> frames.

Every tiled command (``segment``, ``prompt --text``) runs through here, on any engine:

* :func:`plan_grid` tiles the raster at the model's input size (tiles without data skipped);
* :func:`run_tiled` has an engine run a tile job over the tiles (spilled to the work
  directory, resumable) and stitches each concept's records as the tiles come back, in tile
  order, yielding objects as soon as no later tile can touch them;
* :func:`frames` numbers those objects, maps them from processing pixels to the CRS, cleans
  them and yields GeoDataFrames in batches, which the caller streams to the writers.

Memory stays flat in the raster size and in the number of objects: nothing here keeps more
than one batch of finished objects.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import shapely

# GDAL's block cache defaults to 5 % of RAM and fills with the whole raster's blocks as tiles
# stream by, so memory would grow with the raster; a fixed cache keeps it flat (MB; a
# GDAL_CACHEMAX set by the user wins)
GDAL_CACHE_MB = 64
BATCH_OBJECTS = 2000  # finished objects cleaned and written together


@contextlib.contextmanager
def gdal_env():
    """The GDAL settings of a tiled run: a bounded block cache, no .aux.xml sidecars."""
    import rasterio

    options = {"GDAL_PAM_ENABLED": "NO"}
    if "GDAL_CACHEMAX" not in os.environ:
        options["GDAL_CACHEMAX"] = GDAL_CACHE_MB
    with rasterio.Env(**options):
        yield


def plan_grid(reader, image_size: int, tile_size=None, overlap=None, gsd=None):
    """The processing grid and the tiles holding data: ``(grid, tiles)``.

    ``tile_size`` defaults to the model's ``image_size``, ``overlap`` to a quarter of it.
    """
    from terrasam.tiling import make_grid

    size = int(tile_size) if tile_size is not None else int(image_size)
    ovl = int(overlap) if overlap is not None else size // 4
    grid = make_grid(reader.width, reader.height, reader.transform, tile_size=size,
                     overlap=ovl, gsd=gsd, res=reader.ground_res if gsd else None)
    return grid, grid.with_data(reader)


@dataclass
class RunStats:
    """What a tiled run did, for the summary."""

    tiles: int = 0
    timings: object = None  # the engine's Timings
    stitch_s: float = 0.0
    peak_held_pixels: int = 0
    objects: int = 0
    clean_s: float = 0.0
    extra: dict = field(default_factory=dict)


def run_tiled(reader, grid, tiles, job, model, *, engine="local", workdir=None,
              merge_iou: float = 0.5, merge_ios: float = 0.8, quiet: bool = False,
              stats: RunStats | None = None,
              speed_key: str | None = None) -> Iterator[tuple[int, list]]:
    """Run ``job`` over ``tiles`` on ``engine`` and stitch the results.

    ``speed_key`` (:func:`terrasam.speed.key`): with a record of earlier runs on this
    machine, the plan line says how long the tiles will take.

    Yields ``(concept index, [StitchedObject])`` as objects are finished, in an order fixed by
    the tiles alone (the same for every engine, and after a resume).
    """
    from terrasam import speed
    from terrasam.engines import get_engine
    from terrasam.engines.local import Timings
    from terrasam.progress import Progress, about, note
    from terrasam.stitch import Stitcher

    stats = stats if stats is not None else RunStats()
    stats.tiles = len(tiles)
    stats.timings = Timings(job.new_profile())
    runner = get_engine(engine)
    stitchers = [Stitcher(tiles, grid.width, grid.height, merge_iou=merge_iou,
                          merge_ios=merge_ios) for _ in job.concepts]
    resumed = sum(workdir.has(t) for t in tiles) if workdir is not None else 0
    n_grid = len(grid.tiles)
    tw, th = min(grid.tile_size, grid.width), min(grid.tile_size, grid.height)
    todo = len(tiles) - resumed
    known = speed.lookup(speed_key) if speed_key is not None and todo > 0 else None
    if todo <= 0:
        when = ""
    elif known is not None:
        when = f"; {about(known * todo)} for {todo} tile{'s' * (todo != 1)} (earlier runs here)"
    else:
        # the local engine sees the first tile's batches of prompts (progress.report), so
        # its estimate comes within that tile; tiles run elsewhere (Dask) report only ends
        where = "within" if getattr(runner, "name", "") == "local" else "after"
        when = f"; time estimate {where} the first tile"
    note(f"{n_grid} tile{'s' * (n_grid != 1)} ({len(tiles)} with data) of {tw}x{th} px "
         f"over {grid.width}x{grid.height} px"
         + (f", {resumed} done before" if resumed else "") + when, quiet=quiet)
    with Progress(len(tiles), "tiles", quiet=quiet, initial=resumed,
                  estimate=known is None) as progress:
        for tile, records in runner.run(tiles, reader, job, model, workdir=workdir,
                                        progress=progress, timings=stats.timings):
            t0 = time.perf_counter()
            by_concept: list[list] = [[] for _ in stitchers]
            for r in records:
                by_concept[r.concept].append(r)
            done = [(k, s.add_tile(tile, by_concept[k])) for k, s in enumerate(stitchers)]
            stats.stitch_s += time.perf_counter() - t0
            for k, objects in done:
                if objects:
                    yield k, objects
    still_open = sum(s.open_objects for s in stitchers)
    if still_open:
        note(f"stitching the objects still open ({still_open})", quiet=quiet)
    with Progress(still_open, "objects", quiet=quiet or not still_open,
                  estimate=False) as progress:
        for k, s in enumerate(stitchers):
            t0 = time.perf_counter()
            objects = s.finish(on_object=lambda: progress.update(1))
            stats.stitch_s += time.perf_counter() - t0
            if objects:
                yield k, objects
    stats.peak_held_pixels = max((s.peak_held_pixels for s in stitchers), default=0)


def _position(o) -> tuple:
    b = o.geometry.bounds
    return (b[1], b[0], b[3], b[2], -o.geometry.area, o.geometry.wkb)


def frames(batches: Iterable[tuple[int, list]], transform, crs, *,
           columns: Callable[[np.ndarray, list], dict], number: bool = True, first_id: int = 1,
           simplify=None, min_area=None, fill_holes=None, pixel_size=None,
           regularize=None, regularize_45: bool = False, smooth=None, footprint=None,
           finish: Callable | None = None,
           batch_objects: int | None = None, stats: RunStats | None = None,
           quiet: bool = True):
    """GeoDataFrames of finished objects, georeferenced, cleaned and numbered, in batches.

    ``batches`` are ``(concept, objects)`` from :func:`run_tiled` (or any source of stitched
    objects in processing-pixel coordinates); ``transform`` maps those pixels to ``crs``.
    ``columns(concepts, objects)`` gives the attribute columns of objects (with their concept
    indexes as an array).
    Objects emptied by cleaning are dropped; with ``number`` the others get ids
    ``first_id, first_id + 1, ...`` in output order (objects of a batch sorted by their
    top-left corner). ``pixel_size`` (map units) gives plain-number cleaning options their
    unit; default: the pixel size of ``transform``. ``regularize``, ``regularize_45`` and
    ``smooth`` go to :func:`terrasam.vectorize.clean`, and so does ``footprint``, the raster's
    outline in ``crs``: objects are cut to it (smoothing or regularizing can push an outline
    past the raster's edge). ``finish(frame) -> frame`` runs on
    each batch after it is measured and before it is numbered (added columns, dropped rows:
    the kept objects are numbered without gaps). At least one (possibly empty) frame is
    yielded, so that the columns are always known. Unless ``quiet``, each batch prints a
    line ("writing: N objects").
    """
    from terrasam.progress import note
    from terrasam.vectorize import clean, pixels_to_crs, to_frame

    if pixel_size is None:
        pixel_size = (math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e))
    stats = stats if stats is not None else RunStats()
    batch_objects = batch_objects or BATCH_OBJECTS
    next_id = first_id
    pending: list[tuple[int, object]] = []
    yielded = False

    def flush():
        nonlocal next_id
        t0 = time.perf_counter()
        items = sorted(pending, key=lambda ko: _position(ko[1]))
        pending.clear()
        geoms = pixels_to_crs(np.array([o.geometry for _, o in items], dtype=object), transform)
        geoms = clean(geoms, simplify=simplify, min_area=min_area, fill_holes=fill_holes,
                      crs=crs, pixel_size=pixel_size, regularize=regularize,
                      regularize_45=regularize_45, smooth=smooth, footprint=footprint)
        keep = np.flatnonzero(~(shapely.is_missing(geoms) | shapely.is_empty(geoms)))
        kept = [items[i] for i in keep]
        attrs = columns(np.array([k for k, _ in kept], dtype=np.int64), [o for _, o in kept])
        frame = to_frame(geoms[keep], crs, attrs)
        if finish is not None:
            frame = finish(frame)
        if number:
            frame["id"] = np.arange(next_id, next_id + len(frame), dtype=np.int64)
            next_id += len(frame)
        stats.objects += len(frame)
        stats.clean_s += time.perf_counter() - t0
        if len(frame):
            note(f"writing: {stats.objects} object{'s' * (stats.objects != 1)}", quiet=quiet)
        return frame

    for k, objects in batches:
        pending.extend((k, o) for o in objects)
        if len(pending) >= batch_objects:
            yielded = True
            yield flush()
    if pending or not yielded:
        yield flush()
