"""`terrasam segment RASTER -o OUT`: segment everything, tiled and stitched."""

from __future__ import annotations

import click

from terrasam.cli.options import (
    AMG_NAMES,
    amg_options,
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
@click.option("--label-raster", metavar="OUT.tif",
              help="Also write a label raster (COG) whose pixel values are the object ids.")
@model_options
@raster_options
@tiling_options
@amg_options
@vector_options
@object_options
@click.option("--preview", metavar="PNG", help="Also write a PNG of the objects over the image.")
@click.option("--map", "map_", metavar="HTML", help="Also write an HTML map of image and objects.")
@run_options
@engine_options
@click.pass_context
def segment(ctx, **kw):
    """Segment every object in RASTER and write one polygon per object to OUT."""
    config = kw.pop("config")
    if config:
        kw = apply_config(ctx, kw, config, "segment")
    amg = {name: kw.pop(name) for name in AMG_NAMES}
    quiet = kw["quiet"]
    if quiet:
        from terrasam.warn import set_quiet

        set_quiet()  # GDAL's warnings too
    engine = pop_engine(kw)

    from terrasam import api

    try:
        info = _run(api, kw, amg, engine)
    finally:
        if hasattr(engine, "close"):
            engine.close()
    if not quiet:
        extra = "".join(f", {p}" for p in (info["label_raster"], info.get("preview"),
                                           info.get("map")) if p)
        resumed = f" ({info['tiles_resumed']} resumed)" if info["tiles_resumed"] else ""
        click.echo(f"{plural(info['objects'], 'object')} from {plural(info['tiles'], 'tile')}"
                   f"{resumed} in "
                   f"{info['wall_s']:.1f} s -> {info['output']}{extra}")
        if info["objects"] == 0 and info.get("rejected") is not None:
            click.echo(f"terrasam: hint: {zero_objects_hint(info['rejected'])}", err=True)


def zero_objects_hint(rejected: dict | None) -> str:
    """Why a run found nothing: the candidate masks each filter rejected, and what to try."""
    if not rejected or not rejected.get("candidates"):
        return ("0 objects: no candidate mask was decoded (the raster is nodata everywhere, "
                "or every tile was resumed from the work directory)")

    def n(key: str) -> int:
        return rejected.get(key, 0)

    if n("masks"):
        return (f"0 objects: {n('masks'):,} masks were found but the cleaning or filter options "
                "removed them all; check --min-area and --where")
    parts = [f"{n('iou'):,} below --pred-iou-thresh {rejected.get('pred_iou_thresh', 0):g}",
             f"{n('stability'):,} below --stability-score-thresh "
             f"{rejected.get('stability_score_thresh', 0):g}",
             f"{n('nms'):,} duplicates (NMS)", f"{n('nodata'):,} on nodata"]
    if n("edge"):
        parts.append(f"{n('edge'):,} on crop edges")
    advice = {"iou": "try lowering --pred-iou-thresh",
              "stability": "try lowering --stability-score-thresh",
              "nodata": "check --nodata and the raster's mask",
              "nms": "try raising --box-nms-thresh",
              "edge": "try fewer --crop-n-layers"}
    worst = max(advice, key=n)
    return (f"0 objects: {n('candidates'):,} candidate masks were rejected "
            f"({', '.join(parts)}); {advice[worst]}")


def _run(api, kw: dict, amg: dict, engine) -> dict:
    from terrasam.raster import parse_bands

    return api.segment(
        kw.pop("raster"), kw.pop("output"), model=kw.pop("model"),
        checkpoint=kw.pop("checkpoint"), label_raster=kw.pop("label_raster"),
        preview=kw.pop("preview"), map=kw.pop("map_"), bands=parse_bands(kw.pop("bands")),
        nodata=kw.pop("nodata"), scale=kw.pop("scale"), tile_size=kw.pop("tile_size"),
        overlap=kw.pop("overlap"), gsd=kw.pop("gsd"), simplify=kw.pop("simplify"),
        min_area=kw.pop("min_area"), fill_holes=kw.pop("fill_holes"), device=kw.pop("device"),
        dtype=kw.pop("dtype"), compile=kw.pop("compile_"), backend=kw.pop("backend"),
        workdir=kw.pop("workdir"),
        keep_workdir=kw.pop("keep_workdir"), overwrite=kw.pop("overwrite"),
        quiet=kw.pop("quiet"), engine=engine, return_frame=False, **pop_objects(kw),
        **{k: v for k, v in amg.items() if v is not None}).attrs["terrasam"]
