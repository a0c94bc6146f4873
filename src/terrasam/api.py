"""The Python entry points: ``segment()`` (everything in a raster) and ``prompt()``."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import numpy as np
import shapely
from affine import Affine

from terrasam.errors import TerrasamError
from terrasam.prompts import prompt

__all__ = ["segment", "prompt"]

LABEL_BLOCK = 1024  # label raster written in blocks of this many pixels a side
# GDAL's block cache defaults to 5 % of RAM and fills with the whole raster's blocks as tiles
# stream by, so memory would grow with the raster; a fixed cache keeps it flat (MB; a
# GDAL_CACHEMAX set by the user wins)
GDAL_CACHE_MB = 64


def _pixels_to_crs(geoms: np.ndarray, transform: Affine) -> np.ndarray:
    """Processing-grid pixel coordinates -> CRS coordinates (exact affine, vectorised)."""
    t = transform

    def forward(xy):
        x, y = xy[:, 0], xy[:, 1]
        return np.column_stack([t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f])

    return shapely.transform(geoms, forward)


def _input_identity(path) -> dict:
    p = Path(path)
    try:
        st = p.stat()
        return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return {"path": str(path)}


def _amg_params(family: str, amg, overrides: dict):
    from terrasam.amg import AMGParams

    if amg is not None and not isinstance(amg, dict):
        amg = dataclasses.asdict(amg)
    merged = {**(amg or {}), **{k: v for k, v in overrides.items() if v is not None}}
    return AMGParams.for_family(family, **merged)


def _write_labels(path, objects, kept_ids, grid, crs, overwrite, provenance) -> None:
    """Burn each kept object's exact pixel mask with its id, block by block (small on top)."""
    from rasterio import features

    from terrasam.io import LabelRasterWriter

    geoms = np.array([o.geometry for o in objects], dtype=object)
    bounds = shapely.bounds(geoms) if len(geoms) else np.zeros((0, 4))
    order = np.argsort(-shapely.area(geoms), kind="stable") if len(geoms) else np.zeros(0, int)
    geoms, bounds, ids = geoms[order], bounds[order], np.asarray(kept_ids, np.int64)[order]
    with LabelRasterWriter(path, grid.width, grid.height, grid.transform, crs, dtype="uint32",
                           overwrite=overwrite, provenance=provenance) as writer:
        for r0 in range(0, grid.height, LABEL_BLOCK):
            h = min(LABEL_BLOCK, grid.height - r0)
            for c0 in range(0, grid.width, LABEL_BLOCK):
                w = min(LABEL_BLOCK, grid.width - c0)
                hit = ((bounds[:, 0] < c0 + w) & (bounds[:, 2] > c0)
                       & (bounds[:, 1] < r0 + h) & (bounds[:, 3] > r0))
                block = np.zeros((h, w), np.uint32)
                if hit.any():
                    features.rasterize(zip(geoms[hit], ids[hit].tolist()), out=block,
                                       transform=Affine.translation(c0, r0))
                writer.write(block, (c0, r0, w, h))


def segment(raster, output, *, model=None, checkpoint=None, label_raster=None, bands=None,
            nodata=None, scale="percentile", tile_size=None, overlap=None, gsd=None, amg=None,
            simplify=None, min_area=None, fill_holes=None, device="auto", dtype="auto",
            compile=False, workdir=None, keep_workdir=False, overwrite=False, quiet=False,
            adapter=None, merge_iou=0.5, merge_ios=0.8, **amg_params):
    """Segment everything in a raster, tiled and stitched, and write one polygon per object.

    ``amg`` (an AMGParams or a dict) and any extra keyword (upstream names such as
    ``points_per_side``, ``pred_iou_thresh``) set the automatic mask generator. ``tile_size``
    defaults to the model's input size, ``overlap`` to a quarter of it (256 px at 1024).
    ``gsd`` (metres) resamples on read. ``adapter`` is an already loaded model (then
    ``model``/``checkpoint``/``device``/``dtype`` are ignored). Finished tiles are kept in
    ``workdir`` (default ``OUTPUT.terrasam-work`` beside the output) so that the same call
    after a kill resumes; it is removed on success unless ``keep_workdir``.
    Returns the GeoDataFrame written; ``gdf.attrs["terrasam"]`` holds a run summary.
    """
    from terrasam import io
    from terrasam.engines.local import Timings, WorkDir, run_tiles
    from terrasam.progress import Progress
    from terrasam.raster import open_raster
    from terrasam.stitch import Stitcher, assign_ids
    from terrasam.tiling import make_grid
    from terrasam.vectorize import clean, to_frame

    started = time.perf_counter()
    out = io.check_output(output, overwrite)
    label_out = io.check_output(label_raster, overwrite, kind="raster") if label_raster else None
    src = Path(raster).expanduser()
    for target in filter(None, (out, label_out)):
        if src.exists() and target.exists() and os.path.samefile(src, target):
            raise TerrasamError(f"the output {target} is the input raster")
    if label_out is not None and label_out.resolve() == out.resolve():
        raise TerrasamError("the label raster and the vector output are the same file")

    import rasterio

    cache = ({} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": GDAL_CACHE_MB})
    with rasterio.Env(**cache), open_raster(src, bands=bands, nodata=nodata,
                                             scale=scale) as reader:
        if adapter is None:
            from terrasam.models import load_model

            fast = amg_params.get("fast") or (
                amg.get("fast") if isinstance(amg, dict) else getattr(amg, "fast", False))
            if fast and dtype == "auto":
                dtype = "bfloat16"  # fast mode promises speed, not bit-parity
            adapter = load_model(model, checkpoint, device=device, dtype=dtype, compile=compile)
        params = _amg_params(adapter.family, amg, amg_params)
        size = int(tile_size) if tile_size is not None else int(adapter.image_size)
        ovl = int(overlap) if overlap is not None else size // 4
        grid = make_grid(reader.width, reader.height, reader.transform, tile_size=size,
                         overlap=ovl, gsd=gsd, res=reader.ground_res if gsd else None)
        tiles = grid.with_data(reader)

        run_params = {
            "input": _input_identity(src), "bands": reader.band_indexes,
            "nodata": reader.nodata, "scale": scale, "tile_size": size, "overlap": ovl,
            "gsd": gsd, "grid": [grid.width, grid.height],
            "model": adapter.model_id, "checkpoint": adapter.checkpoint,
            "checkpoint_sha256": adapter.checkpoint_sha256, "dtype": str(adapter.dtype),
            "amg": dataclasses.asdict(params),
        }
        work = WorkDir(Path(workdir) if workdir else out.with_name(out.name + ".terrasam-work"),
                       run_params)
        resumed = sum(work.tile_path(t).exists() for t in tiles)
        timings = Timings()
        stitcher = Stitcher(tiles, grid.width, grid.height, merge_iou=merge_iou,
                            merge_ios=merge_ios)
        objects = []
        t_stitch = 0.0
        with Progress(len(tiles), "tiles", quiet=quiet, initial=resumed) as progress:
            for tile, records in run_tiles(tiles, reader, lambda: adapter, params, workdir=work,
                                           progress=progress, timings=timings):
                t0 = time.perf_counter()
                objects.extend(stitcher.add_tile(tile, records))
                t_stitch += time.perf_counter() - t0
        objects.extend(stitcher.finish())
        objects = assign_ids(objects)
        crs = reader.crs

    # vectors: pixel polygons -> CRS, cleaned; objects emptied by cleaning are dropped and the
    # remaining ones numbered 1..n (the label raster uses the same numbers)
    t0 = time.perf_counter()
    pixel_geoms = np.array([o.geometry for o in objects], dtype=object)
    pixel_size = (math.hypot(grid.transform.a, grid.transform.d),
                  math.hypot(grid.transform.b, grid.transform.e))
    geoms = clean(_pixels_to_crs(pixel_geoms, grid.transform), simplify=simplify,
                  min_area=min_area, fill_holes=fill_holes, crs=crs, pixel_size=pixel_size)
    keep = np.flatnonzero(~(shapely.is_missing(geoms) | shapely.is_empty(geoms)))
    kept = [objects[i] for i in keep]
    ids = np.arange(1, len(kept) + 1, dtype=np.int64)
    gdf = to_frame(geoms[keep], crs, {
        "id": ids,
        "predicted_iou": np.array([o.predicted_iou for o in kept], np.float64),
        "stability_score": np.array([o.stability_score for o in kept], np.float64),
        "model": np.array([adapter.model_id] * len(kept), dtype=object),
        "prompt": np.array(["auto"] * len(kept), dtype=object),
        "tiles": np.array([o.n_tiles for o in kept], np.int64),
    })
    provenance = io.make_provenance(
        # the adapter already knows its checkpoint's hash: do not hash gigabytes twice
        input=str(src), model=adapter.model_id, command="segment",
        checkpoint_path=adapter.checkpoint,
        checkpoint_sha256=adapter.checkpoint_sha256, bands=list(reader.band_indexes),
        nodata=reader.nodata, scale=scale, tile_size=size, overlap=ovl, gsd=gsd,
        grid_scale=grid.scale, device=str(adapter.device), dtype=str(adapter.dtype),
        simplify=simplify, min_area=min_area, fill_holes=fill_holes, merge_iou=merge_iou,
        merge_ios=merge_ios, label_raster=str(label_out) if label_out else None,
        amg=dataclasses.asdict(params), tiles=len(tiles), objects=len(kept))
    if label_out is not None:
        _write_labels(label_out, kept, ids, grid, crs, overwrite, provenance)
    io.write_vectors(gdf, out, provenance, overwrite=overwrite)
    t_write = time.perf_counter() - t0
    if not keep_workdir:
        work.remove()

    wall = time.perf_counter() - started
    gdf.attrs["terrasam"] = {
        "output": str(out), "label_raster": str(label_out) if label_out else None,
        "objects": len(kept), "tiles": len(tiles), "tiles_run": timings.tiles_run,
        "tiles_resumed": timings.tiles_resumed, "grid": [grid.width, grid.height],
        "tile_size": size, "overlap": ovl, "gsd": gsd, "wall_s": wall,
        "model_s": timings.model, "read_wait_s": timings.read_wait, "spill_s": timings.spill,
        "stitch_s": t_stitch, "write_s": t_write, "peak_held_pixels": stitcher.peak_held_pixels,
        "amg": dataclasses.asdict(timings.amg) if timings.amg is not None else None,
        "workdir": None if not keep_workdir else str(work.path),
    }
    return gdf
