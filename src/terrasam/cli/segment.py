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
              help="Vector output; format from the extension (.gpkg, .shp, .parquet, .geojson, .fgb).")
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
        click.echo(f"{info['objects']} objects from {info['tiles']} tiles{resumed} in "
                   f"{info['wall_s']:.1f} s -> {info['output']}{extra}")


def _run(api, kw: dict, amg: dict, engine) -> dict:
    from terrasam.raster import parse_bands

    return api.segment(
        kw.pop("raster"), kw.pop("output"), model=kw.pop("model"),
        checkpoint=kw.pop("checkpoint"), label_raster=kw.pop("label_raster"),
        preview=kw.pop("preview"), map=kw.pop("map_"), bands=parse_bands(kw.pop("bands")),
        nodata=kw.pop("nodata"), scale=kw.pop("scale"), tile_size=kw.pop("tile_size"),
        overlap=kw.pop("overlap"), gsd=kw.pop("gsd"), simplify=kw.pop("simplify"),
        min_area=kw.pop("min_area"), fill_holes=kw.pop("fill_holes"), device=kw.pop("device"),
        dtype=kw.pop("dtype"), compile=kw.pop("compile_"), workdir=kw.pop("workdir"),
        keep_workdir=kw.pop("keep_workdir"), overwrite=kw.pop("overwrite"),
        quiet=kw.pop("quiet"), engine=engine, return_frame=False, **pop_objects(kw),
        **{k: v for k, v in amg.items() if v is not None}).attrs["terrasam"]
