"""The Python entry points: ``segment()`` (everything in a raster) and ``prompt()``.

Each checks its arguments, wires the stages (reader, model reference, tile job, pipeline,
writers, pictures) and records provenance; the work itself lives in the stage modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from terrasam.checks import check_finite, check_nodata, check_run
from terrasam.errors import TerrasamError

__all__ = ["segment", "prompt"]

PathLike = str | os.PathLike
# columns of every object before the analysis options add theirs (``--where`` can use them;
# not ``id``, which numbers the objects that are kept); the second tuple holds text
_SEGMENT_COLUMNS = (("area_m2", "perimeter_m", "predicted_iou", "stability_score", "model",
                     "prompt", "tiles"), ("model", "prompt"))
_PROMPT_COLUMNS = (("area_m2", "perimeter_m", "prompt_id", "prompt_type", "prompt",
                    "prompt_crs", "score", "predicted_iou", "stability_score", "model"), ("prompt_type", "prompt", "prompt_crs",
                                                      "model"))


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


def _is_fast(amg, amg_params: dict) -> bool:
    return bool(amg_params.get("fast") or (
        amg.get("fast") if isinstance(amg, dict) else getattr(amg, "fast", False)))


@dataclasses.dataclass
class _Tiled:
    """What one tiled run needs besides its job: the reader, grid, model and run settings."""

    reader: Any
    src: Path
    grid: Any
    tiles: list
    model: Any  # ModelRef
    adapter: Any  # the adapter loaded in this process (its ids and sizes)
    scale: str
    gsd: float | None
    workdir: Any  # WorkDir or None
    engine: Any = "local"
    merge_iou: float = 0.5
    merge_ios: float = 0.8
    quiet: bool = False


def _work_params(run: _Tiled, job) -> dict:
    """Everything that decides a tile's result: the work directory's key."""
    a, grid = run.adapter, run.grid
    return {"input": _input_identity(run.src), "bands": run.reader.band_indexes,
            "nodata": run.reader.nodata, "scale": run.scale, "tile_size": grid.tile_size,
            "overlap": grid.overlap, "gsd": run.gsd, "grid": [grid.width, grid.height],
            "model": a.model_id, "checkpoint": a.checkpoint,
            "checkpoint_sha256": a.checkpoint_sha256, "dtype": str(a.dtype), **job.describe(),
            **_backend_of(a)}


def _backend_of(adapter) -> dict:
    """{"backend": name} for a model not run by torch alone (int8 changes the masks)."""
    backend = getattr(adapter, "backend", "torch")
    return {} if backend == "torch" else {"backend": backend}


def _guard_workdir(batches, workdir):
    """Yield the batches; after an error the user caused (a corrupt window, say), a work
    directory without any finished tile is removed: there is nothing to resume from."""
    try:
        yield from batches
    except TerrasamError:
        if workdir is not None:
            workdir.remove_unused()
        raise


def _open_workdir(path, run: _Tiled, job):
    from terrasam.engines.workdir import WorkDir

    return WorkDir(path, _work_params(run, job)) if path is not None else None


def _summary(run_stats, run: _Tiled) -> dict:
    t = run_stats.timings
    profile = t.profile.as_dict() if t.profile is not None else None
    return {"tiles": run_stats.tiles, "tiles_run": t.tiles_run, "tiles_resumed": t.tiles_resumed,
            "grid": [run.grid.width, run.grid.height], "tile_size": run.grid.tile_size,
            "overlap": run.grid.overlap, "gsd": run.gsd, "model_s": t.model,
            "read_wait_s": t.read_wait, "spill_s": t.spill, "stitch_s": run_stats.stitch_s,
            "peak_held_pixels": run_stats.peak_held_pixels, "amg": profile,
            "coverage": profile["coverage"] if profile else None}


def _stream(frames, writer, collect: bool) -> tuple[list, Any]:
    """Write frames as they come; keep them only when ``collect``. Returns (kept, schema)."""
    kept, schema = [], None
    for frame in frames:
        if schema is None:
            schema = frame.iloc[:0]
        if writer is not None:
            writer.write(frame)
        if collect and len(frame):
            kept.append(frame)
    return kept, schema


def _frame_of(kept: list, schema):
    import pandas as pd

    if not kept:
        return schema.copy()
    frame = kept[0] if len(kept) == 1 else pd.concat(kept, ignore_index=True)
    return frame.set_crs(schema.crs, allow_override=True) if schema.crs else frame


@contextlib.contextmanager
def _engine(engine, client):
    """The engine to run on; one made here from a name (and its cluster) is closed after."""
    from terrasam.engines import get_engine

    runner = get_engine(engine, client=client)
    try:
        yield runner
    finally:
        if runner is not engine and hasattr(runner, "close"):
            runner.close()


def _pictures(reader, vectors, preview, map_, overwrite: bool) -> None:
    from terrasam import viz

    if preview is not None:
        viz.write_preview(reader, vectors, preview, overwrite=overwrite)
    if map_ is not None:
        viz.write_map(reader, vectors, map_, overwrite=overwrite)


def segment(
    raster: PathLike,
    output: PathLike,
    *,
    model: str | None = None,
    checkpoint: PathLike | None = None,
    label_raster: PathLike | None = None,
    preview: PathLike | None = None,
    map: PathLike | None = None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    scale: str = "percentile",
    tile_size: int | None = None,
    overlap: int | None = None,
    gsd: float | None = None,
    amg: Any = None,
    simplify: str | float | None = None,
    min_area: str | float | None = None,
    fill_holes: str | float | None = None,
    regularize: bool | str | float = False,
    regularize_45: bool = False,
    smooth: bool | str | float = False,
    stats: str | Sequence[str] | None = None,
    stats_bands: Sequence[int] | None = None,
    index: str | Sequence[str] | dict | None = None,
    shape: bool = False,
    where: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool = False,
    backend: str = "torch",
    engine: Any = "local",
    client: Any = None,
    workdir: PathLike | None = None,
    keep_workdir: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    return_frame: bool = True,
    adapter: Any = None,
    job: Any = None,
    merge_iou: float = 0.5,
    merge_ios: float = 0.8,
    **amg_params: Any,
):
    """Segment everything in a raster, tiled and stitched, and write one polygon per object.

    Parameters:
        raster: the input raster (anything rasterio opens).
        output: the vector output; its extension picks the format (.gpkg, .shp, .parquet,
            .geojson, .fgb, .kml).
        model: a model id (``terrasam models``); default sam2.1-hiera-tiny.
        checkpoint: local weights instead (a Hugging Face folder or a Meta .pth/.pt).
        label_raster: also write a label COG whose pixels are the object ids.
        preview: also write a PNG of the objects over the image.
        map: also write a self-contained HTML map.
        bands: 1-based bands used as RGB, e.g. (4, 3, 2); default: RGB or the first three.
        nodata: a nodata value overriding the file's.
        scale: scaling to 8 bit from whole-raster statistics: percentile, minmax or none.
        tile_size: tile size in processing pixels; default the model's input size.
        overlap: overlap between tiles; default a quarter of the tile.
        gsd: resample on read to this ground sample distance (metres).
        amg: automatic mask generator settings (an AMGParams or a dict).
        simplify: simplify tolerance in pixels, or with a unit ("0.5m").
        min_area: drop parts smaller than this (pixels, or "20m2").
        fill_holes: fill holes smaller than this (pixels, or "5m2").
        regularize: straighten outlines to right angles (buildings): True, or a tolerance.
        regularize_45: with ``regularize``, also allow 45° edges.
        smooth: smooth natural outlines, neighbours kept apart: True, or a sigma ("1m").
        stats: per-object raster statistics (mean, std, min, max, median, count, sum).
        stats_bands: 1-based bands that get statistics; default all bands of the input.
        index: named band expressions that get statistics, e.g. "ndvi=(b4-b1)/(b4+b1)".
        shape: add shape measures (compactness, elongation, solidity, orientation, ...).
        where: keep only objects satisfying this, e.g. "area_m2 > 50 and ndvi_mean < 0.2".
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: auto, float32, bfloat16 or float16.
        compile: torch.compile the model.
        backend: "torch", "onnx" or "onnx-int8" (the image encoder in ONNX Runtime,
            exported once per checkpoint into the cache; needs ``terrasam[onnx]``).
        engine: "local" (this process), "dask" (with ``client``, a ``distributed.Client``),
            "dask-local" (a LocalCluster here) or an engine object.
        client: the Dask client of ``engine="dask"``.
        workdir: where finished tiles are kept so that the same call resumes after a kill;
            default ``OUTPUT.terrasam-work``.
        keep_workdir: keep the work directory after success.
        overwrite: replace existing outputs.
        quiet: no progress output.
        return_frame: return the objects as a GeoDataFrame; False keeps memory flat in the
            number of objects (the frame returned then only has the columns).
        adapter: an already loaded model (then model/checkpoint/device/dtype are unused).
        job: a tile job to run instead of the automatic mask generator (see
            ``terrasam.tiling.TileJob``; the amg options are then unused).
        merge_iou, merge_ios: how alike two parts in a tile overlap must be to merge.
        **amg_params: generator options under their upstream names (points_per_side,
            pred_iou_thresh, ...), ``fast``, ``coverage_passes``.

    Returns the GeoDataFrame written; ``gdf.attrs["terrasam"]`` holds a run summary.
    """
    from terrasam import io, pipeline, speed
    from terrasam.amg import AmgJob
    from terrasam.models.ref import ModelRef
    from terrasam.objects import ObjectOptions
    from terrasam.raster import open_raster
    from terrasam.raster import source as raster_source

    started = time.perf_counter()
    check_run(model=model, checkpoint=checkpoint, adapter=adapter, scale=scale,
              tile_size=tile_size, overlap=overlap, gsd=gsd, simplify=simplify,
              min_area=min_area, fill_holes=fill_holes, workdir=workdir,
              fractions={"merge_iou": merge_iou, "merge_ios": merge_ios},
              backend=backend, device=device)
    if job is None:
        check_finite(amg_params)
        _amg_params("sam", amg, amg_params)  # its checks, before the model loads
    analysis = ObjectOptions.build(regularize=regularize, regularize_45=regularize_45,
                                   smooth=smooth, stats=stats, stats_bands=stats_bands,
                                   index=index, shape=shape, where=where)
    outs = io.check_outputs({"vector": output, "raster": label_raster, "preview": preview,
                             "map": map}, overwrite, input=raster)
    out, label_out = outs["vector"], outs.get("raster")
    src = raster_source(raster)  # virtual paths and URLs unchanged
    ref = ModelRef.for_run(model, checkpoint, device=device, dtype=dtype, compile=compile,
                           fast=_is_fast(amg, amg_params), adapter=adapter, backend=backend)
    with _engine(engine, client) as engine, pipeline.gdal_env(), \
            open_raster(src, bands=bands, nodata=nodata, scale=scale) as reader:
        reader.check_gsd(gsd)
        check_nodata(nodata, reader.dtype)
        finish = analysis.finisher(reader, *_SEGMENT_COLUMNS, nodata=nodata)  # before the model
        io.check_crs_for(outs, reader.crs, reader.transform, warn=_warn)
        loaded = ref.load()
        job = job if job is not None else AmgJob(_amg_params(loaded.family, amg, amg_params))
        grid, tiles = pipeline.plan_grid(reader, loaded.image_size, tile_size, overlap, gsd)
        speed_key = speed.key(loaded, (min(grid.tile_size, grid.width),
                                       min(grid.tile_size, grid.height)), job)
        run = _Tiled(reader, src, grid, tiles, ref, loaded, scale, gsd, None, engine,
                     merge_iou, merge_ios, quiet)
        run.workdir = _open_workdir(Path(workdir) if workdir else
                                    out.with_name(out.name + ".terrasam-work"), run, job)
        run_stats = pipeline.RunStats()
        model_id = loaded.model_id

        def columns(concepts, objects):
            n = len(objects)
            return {"predicted_iou": np.array([o.predicted_iou for o in objects], np.float64),
                    "stability_score": np.array([o.stability_score for o in objects],
                                                np.float64),
                    "model": np.array([model_id] * n, dtype=object),
                    "prompt": np.array(["auto"] * n, dtype=object),
                    "tiles": np.array([o.n_tiles for o in objects], np.int64)}

        batches = _guard_workdir(pipeline.run_tiled(
            reader, grid, tiles, job, ref, engine=engine, workdir=run.workdir,
            merge_iou=merge_iou, merge_ios=merge_ios, quiet=quiet, stats=run_stats,
            speed_key=speed_key), run.workdir)
        frames = pipeline.frames(batches, grid.transform, reader.crs, columns=columns,
                                 simplify=simplify, min_area=min_area, fill_holes=fill_holes,
                                 **analysis.clean_options(), footprint=reader.footprint,
                                 finish=finish, stats=run_stats, quiet=quiet)
        with io.VectorWriter(out, overwrite=overwrite) as writer:
            kept, schema = _stream(frames, writer, return_frame)
            t0 = time.perf_counter()
            provenance = io.make_provenance(
                # the adapter already knows its checkpoint's hash: do not hash gigabytes twice
                input=str(src), model=model_id, command="segment",
                checkpoint_path=loaded.checkpoint, checkpoint_sha256=loaded.checkpoint_sha256,
                bands=list(reader.band_indexes), nodata=reader.nodata, scale=scale,
                tile_size=grid.tile_size, overlap=grid.overlap, gsd=gsd, grid_scale=grid.scale,
                device=str(loaded.device), dtype=str(loaded.dtype), **_backend_of(loaded),
                simplify=simplify,
                min_area=min_area, fill_holes=fill_holes, merge_iou=merge_iou,
                merge_ios=merge_ios, label_raster=str(label_out) if label_out else None,
                **job.describe(), **analysis.describe(), tiles=len(tiles),
                objects=run_stats.objects)
            labels = None if label_out is None else io.write_label_raster(
                label_out, writer, grid.width, grid.height, grid.transform, reader.crs,
                overwrite=overwrite, provenance=provenance, commit=False)
            try:  # both outputs or neither: the finished label raster waits for the vectors
                writer.close(provenance)
            except BaseException:
                if labels is not None:
                    labels.abort()
                raise
            if labels is not None:
                labels.commit()
        gdf = _frame_of(kept, schema)
        _pictures(reader, gdf if return_frame else out, preview, map, overwrite)
        t_write = time.perf_counter() - t0
    if run.workdir is not None and not keep_workdir:
        run.workdir.remove()
    timings = run_stats.timings
    if timings.tiles_run:  # the next run's plan line says how long its tiles will take
        speed.record(speed_key, timings.model / timings.tiles_run)
    gdf.attrs["terrasam"] = {
        "output": str(out), "label_raster": str(label_out) if label_out else None,
        "preview": str(outs["preview"]) if preview else None,
        "map": str(outs["map"]) if map else None, "objects": run_stats.objects,
        **_summary(run_stats, run),
        "wall_s": time.perf_counter() - started, "write_s": t_write + run_stats.clean_s,
        "workdir": str(run.workdir.path) if keep_workdir and run.workdir else None,
        "rejected": _rejected(run_stats, job),
    }
    return gdf


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, UserWarning, stacklevel=3)


def _rejected(run_stats, job) -> dict | None:
    """How many candidate masks each filter dropped (tiles computed in this run), with the
    thresholds used; None for a job that does not count them."""
    profile = run_stats.timings.profile
    if profile is None:
        return None
    counts = {"candidates": profile.candidates, "masks": profile.masks, **profile.rejected()}
    params = getattr(job, "params", None)
    for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
        if hasattr(params, name):
            counts[name] = float(getattr(params, name))
    return counts


def prompt(
    raster: PathLike,
    output: PathLike | None = None,
    points: Any = None,
    boxes: Any = None,
    text: str | Sequence[str] | None = None,
    *,
    exemplars: Any = None,
    negative_exemplars: Any = None,
    crs: Any = None,
    label_field: str | None = None,
    group_field: str | None = None,
    model: str | None = None,
    checkpoint: PathLike | None = None,
    adapter: Any = None,
    device: str = "auto",
    dtype: str = "auto",
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    scale: str = "percentile",
    multimask_all: bool = False,
    parts: str = "all",
    max_downsample: float | None = None,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    tile_size: int | None = None,
    overlap: int | None = None,
    gsd: float | None = None,
    simplify: str | float | None = None,
    min_area: str | float | None = None,
    fill_holes: str | float | None = None,
    regularize: bool | str | float = False,
    regularize_45: bool = False,
    smooth: bool | str | float = False,
    stats: str | Sequence[str] | None = None,
    stats_bands: Sequence[int] | None = None,
    index: str | Sequence[str] | dict | None = None,
    shape: bool = False,
    where: str | None = None,
    compile: bool = False,
    backend: str = "torch",
    engine: Any = "local",
    client: Any = None,
    workdir: PathLike | None = None,
    keep_workdir: bool = False,
    overwrite: bool = False,
    preview: PathLike | None = None,
    map: PathLike | None = None,
    quiet: bool = True,
    warn: Callable[[str], None] | None = None,
):
    """Segment one object per point/box prompt, or every instance of text concepts (SAM 3).

    Parameters:
        raster: the input raster (anything rasterio opens).
        output: the vector output (format from the extension); None: only return the frame.
        points: a vector file (Point/MultiPoint, its own CRS), a GeoDataFrame, or tuples
            ``(x, y[, label[, group]])`` in ``crs``; label 1 positive, 0 negative.
        boxes: a polygon file (each polygon's bounds in the raster's CRS are the box) or
            tuples ``(minx, miny, maxx, maxy[, group])`` in ``crs``.
        text: a concept or a list of them, found over the whole raster (needs SAM 3, the
            default model then), tiled and stitched like ``segment``.
        exemplars, negative_exemplars: SAM 3 box exemplars (a polygon file, or tuples
            ``(minx, miny, maxx, maxy)`` in ``crs``): every object like them is found over
            the whole raster; with one ``text`` they form one concept.
        crs: the CRS of coordinate tuples; default the raster's.
        label_field: the field of a points file holding 1/0.
        group_field: the field of points/boxes files: features sharing it form one prompt.
        model, checkpoint, adapter, device, dtype, compile, backend: the model, as in
            ``segment``.
        bands, nodata, scale: raster reading, as in ``segment``.
        multimask_all: keep the model's three candidate masks (column ``rank``).
        parts: "all" keeps the whole mask, "prompt" only its parts under a positive point or
            the box.
        max_downsample: warn when a box is read coarser than this many times the working
            resolution (default 4).
        score_threshold, mask_threshold: SAM 3's instance score and mask probability cut-offs.
        tile_size, overlap: the tiling of text prompts; default the model's input, a quarter.
        gsd: the working resolution (metres) of every window and tile.
        simplify, min_area, fill_holes: cleaning, as in ``segment``.
        regularize, regularize_45, smooth: outlines, as in ``segment``.
        stats, stats_bands, index, shape, where: attributes and filter, as in ``segment``.
        engine, client: the engine of text prompts, as in ``segment``.
        workdir: text prompts: where finished tiles are kept for resuming; default
            ``OUTPUT.terrasam-work`` (none without an output).
        keep_workdir: keep the work directory after success.
        overwrite: replace existing outputs.
        preview, map: also write a PNG preview / an HTML map (needs ``output``).
        quiet: no progress output.
        warn: called with each warning (skipped prompts); default ``warnings.warn``.

    Prompts outside the raster or on nodata are reported through ``warn`` and skipped.
    Returns the GeoDataFrame (``gdf.attrs["terrasam"]`` summarises the run, skipped prompt
    ids too).
    """
    from terrasam import io, pipeline
    from terrasam.models.ref import ModelRef
    from terrasam.objects import ObjectOptions
    from terrasam.prompts import decode, sources, windows
    from terrasam.raster import open_raster
    from terrasam.raster import source as raster_source
    from terrasam.text import TextJob
    from terrasam.tiling import grid_scale
    from terrasam.vectorize import clean, to_frame

    warn = warn or sources._warn
    texts = [text] if isinstance(text, str) else list(text or [])
    texts = [t.strip() for t in texts]
    if any(not t for t in texts):
        raise TerrasamError("a text prompt must not be empty.")
    from terrasam.prompts import exemplars as exemplar_prompts

    has_exemplars = exemplars is not None or negative_exemplars is not None
    concept = bool(texts) or has_exemplars  # a tiled SAM 3 run
    if points is None and boxes is None and not concept:
        raise TerrasamError("give point prompts, box prompts or a text prompt, or exemplars (SAM 3).")
    if has_exemplars:
        exemplar_prompts.check_model(model, checkpoint)
        if len(texts) > 1:
            raise TerrasamError(f"exemplars form one concept with at most one --text (SAM 3 "
                                f"takes one concept per prompt), got {len(texts)} texts.")
    if parts not in decode.PARTS:
        raise TerrasamError(f"parts must be one of {', '.join(decode.PARTS)}, got {parts!r}.")
    if not (0.0 <= score_threshold <= 1.0):
        raise TerrasamError(f"the score threshold must be between 0 and 1, got {score_threshold}.")
    if output is None and (preview is not None or map is not None):
        raise TerrasamError("a preview or map needs an output file.")
    check_run(model=model if model or checkpoint or not concept else "sam3", checkpoint=checkpoint,
              adapter=adapter, scale=scale, tile_size=tile_size, overlap=overlap, gsd=gsd,
              simplify=simplify, min_area=min_area, fill_holes=fill_holes, workdir=workdir,
              fractions={"--score-threshold": score_threshold,
                         "--mask-threshold": mask_threshold}, backend=backend, device=device)
    analysis = ObjectOptions.build(regularize=regularize, regularize_45=regularize_45,
                                   smooth=smooth, stats=stats, stats_bands=stats_bands,
                                   index=index, shape=shape, where=where)
    outs = io.check_outputs({"vector": output, "preview": preview, "map": map}, overwrite,
                            input=raster)
    out = outs.get("vector")
    max_downsample = decode.MAX_DOWNSAMPLE if max_downsample is None else max_downsample
    ref = ModelRef.for_run(model, checkpoint, device=device, dtype=dtype, compile=compile,
                           text=concept, adapter=adapter, backend=backend)
    src = raster_source(raster)  # virtual paths and URLs unchanged

    with _engine(engine if concept else "local", client if concept else None) as engine, \
            pipeline.gdal_env(), open_raster(src, bands=bands, nodata=nodata,
                                             scale=scale) as reader:
        reader.check_gsd(gsd)
        io.check_crs_for(outs, reader.crs, reader.transform, warn=warn)
        check_nodata(nodata, reader.dtype)
        px_scale = grid_scale(reader.transform, gsd, reader.ground_res if gsd else None)
        prompts, live, plans, report = [], [], {}, sources.Report()
        if points is not None or boxes is not None:
            prompts, negatives, report = sources.collect_prompts(
                points, boxes, raster_crs=reader.crs, transform=reader.transform, crs=crs,
                label_field=label_field, group_field=group_field, warn=warn)
            live = windows.clip_prompts(prompts, reader.width, reader.height, report)
            if not live:
                raise sources.outside_error(prompts, reader)
        found = exemplar_prompts.collect(exemplars, negative_exemplars, reader=reader, crs=crs,
                                         warn=warn) if has_exemplars else []
        if has_exemplars and not texts and not any(e.label == 1 for e in found):
            raise TerrasamError("negative exemplars need a positive --exemplar or a --text "
                                "concept to refine.")
        base, text_cols = _PROMPT_COLUMNS
        finish = analysis.finisher(reader, base + (("rank",) if multimask_all else ()),
                                   text_cols, nodata=nodata)  # checked before the model loads
        loaded = ref.load()
        if texts and loaded.family != "sam3":
            raise TerrasamError(
                f"model {loaded.model_id} does not take text prompts; use --model sam3.")
        if found and loaded.family != "sam3":
            raise TerrasamError(f"model {loaded.model_id} does not take exemplars; exemplars "
                                f"are a SAM 3 prompt: use --model sam3.")
        model_id = loaded.model_id
        rows = []
        if live:
            live, plans = windows.plan_windows(live, negatives, reader.width, reader.height,
                                               int(loaded.image_size), report, scale=px_scale)
            rows = decode.run_point_box(reader, loaded, live, plans, report,
                                        multimask_all=multimask_all, parts=parts,
                                        max_downsample=max_downsample, scale=px_scale,
                                        quiet=quiet, warn=warn)
            decode._report_skips(report, len(prompts), warn)
            if not rows and len(report.outside) + len(report.nodata) == len(prompts):
                raise TerrasamError(
                    f"all {len(prompts)} prompts fall outside the raster or on nodata.")

        def prompt_columns(r: list[dict]) -> dict:
            cols = {"prompt_id": np.array([x["prompt_id"] for x in r], dtype=np.int64),
                    "prompt_type": np.array([x["prompt_type"] for x in r], dtype=object),
                    "prompt": np.array([x["prompt"] for x in r], dtype=object),
                    "prompt_crs": np.array([x["prompt_crs"] for x in r], dtype=object),
                    "score": np.array([x["score"] for x in r], dtype=np.float64),
                    "predicted_iou": np.array([x["predicted_iou"] for x in r], np.float64),
                    "stability_score": np.array([x["stability_score"] for x in r],
                                                np.float64),
                    "model": np.array([model_id] * len(r), dtype=object)}
            if multimask_all:
                cols["rank"] = np.array([x["rank"] for x in r], dtype=np.int64)
            return cols

        geoms = clean(np.array([r["geometry"] for r in rows], dtype=object), simplify=simplify,
                      min_area=min_area, fill_holes=fill_holes, crs=reader.crs,
                      pixel_size=reader.res, **analysis.clean_options(),
                      footprint=reader.footprint)
        keep = [i for i, g in enumerate(geoms) if g is not None and not g.is_empty]
        first = to_frame(geoms[keep], reader.crs,
                         prompt_columns([rows[i] for i in keep]))
        if finish is not None:
            first = finish(first)
            first["id"] = np.arange(1, len(first) + 1, dtype=np.int64)
        stream = [first]
        run, run_stats, job = None, None, None
        if concept:
            grid, tiles = pipeline.plan_grid(reader, loaded.image_size, tile_size, overlap, gsd)
            labels, kinds, made, described = list(texts), ["text"] * len(texts), [None] * len(
                texts), ()
            if found:
                made_prompt, described = exemplar_prompts.make_concept(
                    loaded, reader, found, texts[0] if texts else None,
                    tile_size=grid.tile_size, scale=px_scale)
                labels, made = [made_prompt.label], [made_prompt]
                kinds = ["text+exemplar" if texts else "exemplar"]
            job = TextJob(tuple(labels), score_threshold, mask_threshold, tuple(made),
                          described)
            run = _Tiled(reader, src, grid, tiles, ref, loaded, scale, gsd, None, engine,
                         quiet=quiet)
            default_work = out.with_name(out.name + ".terrasam-work") if out else None
            run.workdir = _open_workdir(Path(workdir) if workdir else default_work, run, job)
            run_stats = pipeline.RunStats()
            first_id = len(prompts) + 1

            def text_columns(concepts, objects):
                return prompt_columns([
                    {"prompt_id": first_id + k, "prompt_type": kinds[k], "prompt": labels[k],
                     "prompt_crs": "", "score": float(o.predicted_iou),
                     "predicted_iou": float(o.predicted_iou),
                     # SAM 3 gives mask probabilities, not logits: no stability score
                     "stability_score": float("nan"), "rank": 1}
                    for k, o in zip(concepts.tolist(), objects)])

            batches = _guard_workdir(pipeline.run_tiled(
                reader, grid, tiles, job, ref, engine=engine, workdir=run.workdir, quiet=quiet,
                stats=run_stats), run.workdir)
            stream = _chain_frames(first, pipeline.frames(
                batches, grid.transform, reader.crs, columns=text_columns,
                first_id=len(first) + 1, simplify=simplify, min_area=min_area,
                fill_holes=fill_holes, pixel_size=reader.res, **analysis.clean_options(),
                footprint=reader.footprint, finish=finish, stats=run_stats))
        writer = io.VectorWriter(out, overwrite=overwrite) if out is not None else None
        try:
            kept, schema = _stream(stream, writer, True)
            gdf = _frame_of(kept, schema)
            if writer is not None:
                provenance = io.make_provenance(
                    input=str(src), model=model_id, command="prompt",
                    checkpoint_path=loaded.checkpoint,
                    checkpoint_sha256=loaded.checkpoint_sha256,
                    bands=list(reader.band_indexes), nodata=reader.nodata, scale=scale,
                    points=sources._source_text(points), boxes=sources._source_text(boxes),
                    text=texts, exemplars=[dict(e) for e in job.exemplars] if job else None,
                    crs=None if crs is None else str(crs), label_field=label_field,
                    group_field=group_field, multimask_all=multimask_all, parts=parts,
                    score_threshold=score_threshold, mask_threshold=mask_threshold,
                    tile_size=tile_size, overlap=overlap, gsd=gsd, simplify=simplify,
                    min_area=min_area, fill_holes=fill_holes, **analysis.describe(),
                    device=str(loaded.device), dtype=str(loaded.dtype), **_backend_of(loaded),
                    skipped=report.to_dict(), objects=len(gdf))
                writer.close(provenance)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if out is not None:
            _pictures(reader, gdf, preview, map, overwrite)
    if run is not None and run.workdir is not None and not keep_workdir:
        run.workdir.remove()
    summary = {"prompts": len(prompts), "texts": texts, "exemplars": len(found),
               "objects": len(gdf),
               "skipped": report.to_dict(), "output": str(out) if out else None}
    if run is not None:
        summary["text"] = _summary(run_stats, run)
    gdf.attrs["terrasam"] = summary
    return gdf


def _chain_frames(first, rest):
    yield first
    yield from rest
