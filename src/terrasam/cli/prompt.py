"""`terrasam prompt RASTER -o OUT`: one object per point/box prompt, or concepts (text,
exemplars) found over the whole raster."""

from __future__ import annotations

import click

from terrasam.cli.options import (
    apply_config,
    engine_options,
    model_options,
    object_options,
    plural,
    pop_engine,
    pop_objects,
    raster_options,
    run_options,
    tiling_options,
    vector_options,
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("raster", type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, metavar="OUT",
              help="Vector output; format from the extension: .gpkg (also when there is none), "
                   ".shp, .parquet (GeoParquet), .geojson, .fgb, .kml.")
@click.option("--point", "point", multiple=True, metavar="X,Y[,LABEL[,GROUP]]",
              help="A point prompt in --crs (repeatable). LABEL 1 positive (default), 0 negative; "
                   "points sharing a GROUP form one object.")
@click.option("--box", "box", multiple=True, metavar="MINX,MINY,MAXX,MAXY[,GROUP]",
              help="A box prompt in --crs (repeatable); GROUP joins it with points of that group.")
@click.option("--points", "points_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Vector file of point prompts (Point/MultiPoint, in the file's own CRS).")
@click.option("--boxes", "boxes_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Vector file of box prompts (in the file's own CRS): each polygon's bounds "
                   "in the raster's CRS are the box.")
@click.option("--crs", metavar="CRS",
              help="CRS of --point/--box coordinates (e.g. EPSG:4326); default the raster's.")
@click.option("--label-field", metavar="FIELD",
              help="Field of --points holding 1 (positive) or 0 (negative).")
@click.option("--group-field", metavar="FIELD",
              help="Field of --points/--boxes: features with the same value form one object.")
@click.option("--text", "text", multiple=True, metavar="CONCEPT",
              help="Segment every instance of a concept, e.g. \"swimming pool\" (repeatable; needs "
                   "SAM 3, the default model with --text).")
@click.option("--exemplar", "exemplar", multiple=True, metavar="MINX,MINY,MAXX,MAXY",
              help="A box in --crs around an example object (repeatable; SAM 3): every object "
                   "like it is found over the whole raster; with --text, one concept.")
@click.option("--negative-exemplar", "negative_exemplar", multiple=True,
              metavar="MINX,MINY,MAXX,MAXY",
              help="A box in --crs around something that is NOT the concept (repeatable).")
@click.option("--exemplars", "exemplars_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Vector file of exemplar polygons (the file's own CRS): each polygon's "
                   "bounding box is an exemplar.")
@click.option("--negative-exemplars", "negative_exemplars_file",
              type=click.Path(dir_okay=False), metavar="FILE",
              help="Vector file of negative exemplar polygons.")
@click.option("--score-threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="--text/--exemplar: keep instances scoring at least this.")
@click.option("--mask-threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="--text/--exemplar: mask probability threshold.")
@click.option("--multimask-all", is_flag=True, default=False,
              help="Keep the model's three candidate masks per prompt (column rank), not only "
                   "the best by predicted IoU.")
@click.option("--parts", type=click.Choice(["all", "prompt"]), default="all", show_default=True,
              help="all: the model's whole mask; prompt: only its connected parts under a "
                   "positive point or inside the box.")
@model_options
@raster_options
@tiling_options
@vector_options
@object_options
@click.option("--preview", metavar="PNG", help="Also write a PNG of the objects over the image.")
@click.option("--map", "map_", metavar="HTML", help="Also write an HTML map of image and objects.")
@run_options
@engine_options
@click.pass_context
def prompt(ctx, **kw):
    """Segment the objects under point/box prompts, or every instance of --text, in RASTER."""
    from terrasam.errors import TerrasamError
    from terrasam.prompts import parse_box, parse_point

    config = kw.pop("config")
    if config:
        kw = apply_config(ctx, kw, config, "prompt")
    if kw["point"] and kw["points_file"]:
        raise TerrasamError("give points with --points FILE or --point X,Y, not both.")
    if kw["box"] and kw["boxes_file"]:
        raise TerrasamError("give boxes with --boxes FILE or --box MINX,MINY,MAXX,MAXY, not both.")
    points = kw["points_file"] or ([parse_point(p) for p in kw["point"]] or None)
    boxes = kw["boxes_file"] or ([parse_box(b) for b in kw["box"]] or None)
    exemplars = _exemplars(kw, "exemplar", "exemplars_file", "--exemplar")
    negative_exemplars = _exemplars(kw, "negative_exemplar", "negative_exemplars_file",
                                    "--negative-exemplar")
    quiet = kw["quiet"]
    if quiet:
        from terrasam.warn import set_quiet

        set_quiet()  # GDAL's warnings too

    def warn(message: str) -> None:
        click.echo(f"terrasam: warning: {message}", err=True)

    from terrasam import api

    engine = pop_engine(kw)
    try:
        gdf = _run(api, kw, points, boxes, engine, warn, exemplars, negative_exemplars)
    finally:
        if hasattr(engine, "close"):
            engine.close()
    if not quiet:
        info = gdf.attrs["terrasam"]
        extra = "".join(f", {p}" for p in (kw["preview"], kw["map_"]) if p)
        texts = f" and {plural(len(info['texts']), 'text prompt')}" if info["texts"] else ""
        if info.get("exemplars"):
            texts += f" and {plural(info['exemplars'], 'exemplar')}"
        click.echo(f"{plural(info['objects'], 'object')} from "
                   f"{plural(info['prompts'], 'prompt')}{texts} -> {info['output']}{extra}")
        if info["objects"] == 0:
            click.echo(f"terrasam: hint: {_zero_objects_hint(info, kw)}", err=True)


def _zero_objects_hint(info: dict, kw: dict) -> str:
    """Why prompts gave nothing, and what to try."""
    skipped = info.get("skipped") or {}
    empty = len(skipped.get("empty") or [])
    if info.get("exemplars") and not info["prompts"]:
        return (f"0 objects: no object like the exemplars scored --score-threshold "
                f"{kw['score_threshold']:g} or more; try lowering it")
    if info["texts"] and not info["prompts"]:
        return (f"0 objects: no instance of {', '.join(map(repr, info['texts']))} scored "
                f"--score-threshold {kw['score_threshold']:g} or more; try lowering it")
    why = f" ({empty} empty masks)" if empty else ""
    return (f"0 objects: the masks of the {info['prompts']} prompts were empty or removed by "
            f"the cleaning or filter options{why}; check --min-area and --where")


def _exemplars(kw: dict, boxes: str, file: str, option: str):
    """Exemplar boxes from the command line or a file (not both), parsed before any load."""
    from terrasam.errors import TerrasamError
    from terrasam.prompts.exemplars import parse_exemplar

    if kw[boxes] and kw[file]:
        raise TerrasamError(f"give {option[2:]}s with {option}s FILE or {option} "
                            f"MINX,MINY,MAXX,MAXY, not both.")
    return kw[file] or ([parse_exemplar(b, option) for b in kw[boxes]] or None)


def _run(api, kw: dict, points, boxes, engine, warn, exemplars=None, negative_exemplars=None):
    from terrasam.raster import parse_bands

    return api.prompt(
        kw["raster"], kw["output"], points=points, boxes=boxes, text=list(kw["text"]) or None,
        exemplars=exemplars, negative_exemplars=negative_exemplars,
        crs=kw["crs"], label_field=kw["label_field"], group_field=kw["group_field"],
        model=kw["model"], checkpoint=kw["checkpoint"], device=kw["device"], dtype=kw["dtype"],
        compile=kw["compile_"], backend=kw["backend"], bands=parse_bands(kw["bands"]),
        nodata=kw["nodata"],
        scale=kw["scale"], multimask_all=kw["multimask_all"], parts=kw["parts"],
        score_threshold=kw["score_threshold"], mask_threshold=kw["mask_threshold"],
        tile_size=kw["tile_size"], overlap=kw["overlap"], gsd=kw["gsd"],
        simplify=kw["simplify"], min_area=kw["min_area"], fill_holes=kw["fill_holes"],
        workdir=kw["workdir"], keep_workdir=kw["keep_workdir"], overwrite=kw["overwrite"],
        preview=kw["preview"], map=kw["map_"], quiet=kw["quiet"], engine=engine, warn=warn,
        **pop_objects(kw))
