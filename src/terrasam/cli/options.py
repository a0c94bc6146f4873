"""Click options shared by the commands that run a model (`segment`, `prompt`).

Each decorator adds one group of options. Every option can also come from ``--config FILE``
(TOML or YAML, keys under the option's name with - or _); a flag given on the command line wins.
"""

from __future__ import annotations

import click

from terrasam.errors import TerrasamError

# The automatic mask generator's knobs, under the upstream names (None: the family default).
AMG_OPTIONS = [
    ("points_per_side", int, "Points sampled along one side of the tile (grid of N x N)."),
    ("points_per_batch", int, "Point prompts decoded together."),
    ("decode_batch", int, "Prompts per decoder call (default: 16 on a CPU; on a GPU as many as "
                          "half its free memory holds)."),
    ("pred_iou_thresh", float, "Drop masks whose predicted IoU is below this."),
    ("stability_score_thresh", float, "Drop masks whose stability score is below this."),
    ("stability_score_offset", float, "Logit offset used for the stability score."),
    ("mask_threshold", float, "Logit threshold that turns a mask's logits into pixels."),
    ("box_nms_thresh", float, "Box IoU above which duplicate masks are suppressed."),
    ("crop_n_layers", int, "Extra layers of crops of the tile (0: the tile only)."),
    ("crop_nms_thresh", float, "Box IoU for suppressing duplicates between crops."),
    ("crop_overlap_ratio", float, "Overlap of crops, as a fraction of the crop size."),
    ("crop_n_points_downscale_factor", int, "Point grid of crop layer n is divided by this^n."),
    ("min_mask_region_area", int, "Remove islands and holes smaller than this (pixels)."),
]
AMG_NAMES = [name for name, _, _ in AMG_OPTIONS] + ["fast", "coverage_passes"]


def plural(n: int, word: str) -> str:
    """``"1 object"``, ``"2 objects"``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _stack(*decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def model_options(f):
    """--model, --checkpoint, --device, --dtype, --compile, --backend."""
    return _stack(
        click.option("--model", "-m", "model", metavar="ID",
                     help="Model id (see `terrasam models`); default sam2.1-hiera-tiny."),
        click.option("--checkpoint", type=click.Path(dir_okay=True), metavar="PATH",
                     help="Local weights: a Hugging Face model folder or a Meta .pth/.pt."),
        click.option("--device", default="auto", show_default=True,
                     help="cuda, cuda:N, mps, cpu or auto."),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     help="Model precision (auto: bf16/fp16 on GPUs, fp32 on CPU)."),
        click.option("--compile", "compile_", is_flag=True, default=False,
                     help="torch.compile the model (slow start, faster tiles)."),
        click.option("--backend", default="torch", show_default=True,
                     type=click.Choice(["torch", "onnx", "onnx-int8"]),
                     help="Model runtime: torch, or ONNX Runtime for the image encoder and "
                          "the generator's decoder (onnx; onnx-int8: int8 encoder weights, "
                          "approximate), exported once per checkpoint into the cache; needs "
                          "pip install 'terrasam[onnx]'."),
    )(f)


def raster_options(f):
    """--bands, --nodata, --scale."""
    return _stack(
        click.option("--bands", metavar="LIST",
                     help="Bands to use as RGB, 1-based, e.g. 4,3,2 (default: RGB or first 3)."),
        click.option("--nodata", type=float, metavar="VALUE",
                     help="Nodata value overriding the file's."),
        click.option("--scale", default="percentile", show_default=True,
                     type=click.Choice(["percentile", "minmax", "none"]),
                     help="Scaling to 8 bit, from statistics of the whole raster."),
    )(f)


def tiling_options(f):
    """--tile-size, --overlap, --gsd."""
    return _stack(
        click.option("--tile-size", type=int, metavar="PX",
                     help="Tile size in pixels (default: the model's input, 1024 or 1008)."),
        click.option("--overlap", type=int, metavar="PX",
                     help="Overlap between tiles in pixels (default: a quarter of the tile)."),
        click.option("--gsd", type=float, metavar="METRES",
                     help="Resample on read to this ground sample distance."),
    )(f)


def amg_options(f):
    """The automatic mask generator's knobs (upstream names), --fast, --coverage-passes."""
    opts = [click.option("--" + name.replace("_", "-"), name, type=kind, default=None, help=text)
            for name, kind, text in AMG_OPTIONS]
    opts += [
        click.option("--fast", is_flag=True, default=None,
                     help="Fewer prompts and cheaper filters: quicker, slightly less complete."),
        click.option("--coverage-passes", type=int, metavar="N", default=None,
                     help="Extra passes that prompt where nothing was segmented yet."),
    ]
    return _stack(*opts)(f)


def vector_options(f):
    """--simplify, --min-area, --fill-holes."""
    return _stack(
        click.option("--simplify", metavar="TOL",
                     help="Simplify polygons: pixels (1) or with a unit (0.5m)."),
        click.option("--min-area", metavar="AREA",
                     help="Drop parts smaller than this: pixels (20) or with a unit (20m2)."),
        click.option("--fill-holes", metavar="AREA",
                     help="Fill holes smaller than this: pixels or with a unit (5m2)."),
    )(f)


def object_options(f):
    """--regularize, --smooth (outlines); --stats, --index, --shape (columns); --where."""
    return _stack(
        click.option("--regularize", is_flag=True, default=False,
                     help="Building footprints: straight edges at right angles, aligned to "
                          "each object's dominant orientation."),
        click.option("--regularize-tolerance", metavar="TOL",
                     help="How far a straight edge may stray from the traced outline: pixels "
                          "(default 1.5) or with a unit (0.75m)."),
        click.option("--regularize-45", is_flag=True, default=False,
                     help="With --regularize, also allow edges at 45 degrees."),
        click.option("--smooth", is_flag=True, default=False,
                     help="Natural boundaries (fields, water, trees): smooth outlines; "
                          "neighbours stay apart."),
        click.option("--smooth-tolerance", metavar="SIGMA",
                     help="Smoothing length along the outline: pixels (default 2) or with a "
                          "unit (1m)."),
        click.option("--stats", metavar="LIST",
                     help="Per-object statistics of the input's own values: any of mean, std, "
                          "min, max, median, count, sum (exact pixel coverage)."),
        click.option("--stats-bands", metavar="LIST",
                     help="Bands that get --stats, 1-based, e.g. 1,4 (default: all bands)."),
        click.option("--index", "index", multiple=True, metavar="NAME=EXPR",
                     help="A band expression that gets --stats (default mean), e.g. "
                          "\"ndvi=(b4-b1)/(b4+b1)\" (repeatable); columns ndvi_mean, ..."),
        click.option("--shape", is_flag=True, default=False,
                     help="Add compactness, elongation, solidity, orientation, holes, "
                          "centroid_x, centroid_y."),
        click.option("--where", metavar="EXPR",
                     help="Keep only objects that satisfy this, e.g. \"area_m2 > 50 and "
                          "ndvi_mean < 0.2\" (column names, numbers, and/or/not)."),
    )(f)


def pop_objects(kw: dict) -> dict:
    """The api keyword arguments of the object options in ``kw`` (removed from it)."""
    from terrasam.raster import parse_bands

    reg_tol, smooth_tol = kw.pop("regularize_tolerance"), kw.pop("smooth_tolerance")
    regularize, smooth = kw.pop("regularize"), kw.pop("smooth")
    bands = kw.pop("stats_bands")
    try:
        stats_bands = parse_bands(bands)
    except TerrasamError:
        raise TerrasamError(f"--stats-bands must be comma-separated band numbers such as "
                            f"1,4, got {bands!r}.") from None
    return {"regularize": reg_tol if reg_tol is not None else regularize,
            "regularize_45": kw.pop("regularize_45"),
            "smooth": smooth_tol if smooth_tol is not None else smooth,
            "stats": kw.pop("stats"), "stats_bands": stats_bands,
            "index": list(kw.pop("index")) or None, "shape": kw.pop("shape"),
            "where": kw.pop("where")}


def run_options(f):
    """--config, --workdir, --keep-workdir, --overwrite, --quiet."""
    return _stack(
        click.option("--config", "config", type=click.Path(dir_okay=False), metavar="FILE",
                     help="TOML or YAML file with option values (command-line flags win)."),
        click.option("--workdir", type=click.Path(file_okay=False), metavar="DIR",
                     help="Where finished tiles are kept for resuming (default: OUT.terrasam-work)."),
        click.option("--keep-workdir", is_flag=True, default=False,
                     help="Keep the work directory after success."),
        click.option("--overwrite", is_flag=True, default=False, help="Replace existing outputs."),
        click.option("--quiet", "-q", is_flag=True, default=False, help="No progress output."),
    )(f)


def engine_options(f):
    """--engine, --scheduler, --workers, --threads-per-worker."""
    return _stack(
        click.option("--engine", default="local", show_default=True,
                     type=click.Choice(["local", "dask", "dask-local"]),
                     help="Where tiles run: this process, a Dask cluster (--scheduler), or a "
                          "Dask LocalCluster on this machine."),
        click.option("--scheduler", metavar="ADDRESS",
                     help="--engine dask: the scheduler, e.g. tcp://10.0.0.5:8786."),
        click.option("--workers", type=click.IntRange(1), metavar="N",
                     help="--engine dask-local: worker processes (default: one per core)."),
        click.option("--threads-per-worker", type=click.IntRange(1), default=1,
                     show_default=True, metavar="T", help="--engine dask-local: threads each."),
    )(f)


def pop_engine(kw: dict):
    """The engine object for the engine options in ``kw`` (removed from it)."""
    from terrasam.engines import get_engine

    return get_engine(kw.pop("engine"), scheduler=kw.pop("scheduler"),
                      workers=kw.pop("workers"), threads_per_worker=kw.pop("threads_per_worker"))


def apply_config(ctx: click.Context, values: dict, path, command: str) -> dict:
    """Fill options the user did not give on the command line from a config file."""
    from terrasam.config import load_config

    data = load_config(path)
    flat: dict = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key in (command, "amg"):
                flat.update(value)
            continue
        flat[key] = value
    params = {p.name: p for p in ctx.command.params}
    flags = {opt.lstrip("-").replace("-", "_"): p.name for p in ctx.command.params
             for opt in getattr(p, "opts", [])}
    out = dict(values)
    for key, value in flat.items():
        name = flags.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if name not in params or name == "config" or isinstance(params[name], click.Argument):
            raise TerrasamError(f"unknown option {key!r} in config file {path}")
        if ctx.get_parameter_source(name) in (click.core.ParameterSource.DEFAULT, None):
            try:
                out[name] = params[name].type_cast_value(ctx, value)
            except click.BadParameter as exc:
                raise TerrasamError(f"bad value for {key!r} in config file {path}: "
                                    f"{exc.message}") from None
    return out
