"""`terrasam serve RASTER`: a local web page to click on the raster and keep objects."""

from __future__ import annotations

import click

from terrasam.cli.options import amg_options, model_options, raster_options, vector_options


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("raster", type=click.Path(dir_okay=False))
@model_options
@raster_options
@vector_options
@amg_options
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--host", metavar="ADDRESS", default=None,
              help="Address to listen on (default 127.0.0.1). Anything but a loopback address "
                   "shares the page with the network.")
@click.option("--open", "open_browser", is_flag=True, default=False,
              help="Open the page in the default web browser.")
@click.option("--basemap", type=click.Choice(["none", "osm", "esri"]), default="none",
              show_default=True, help="A base map under the raster (needs internet).")
@click.option("--score-threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Text concepts (SAM 3): keep instances scoring at least this.")
@click.option("--cache-mb", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Memory for image embeddings kept per model window.")
def serve(raster, **kw):
    """Serve RASTER on a local web page: click on the image, get the object as a polygon."""
    from terrasam.serve import require

    require()
    from terrasam.checks import check_finite, check_run
    from terrasam.cli.options import AMG_NAMES
    from terrasam.raster import parse_bands
    from terrasam.serve.app import serve as run

    amg = {k: kw[k] for k in AMG_NAMES if kw.get(k) is not None}
    check_run(model=kw["model"], checkpoint=kw["checkpoint"], scale=kw["scale"],
              simplify=kw["simplify"], min_area=kw["min_area"], fill_holes=kw["fill_holes"],
              backend=kw["backend"], device=kw["device"])
    check_finite(amg)
    from terrasam.amg import AMGParams

    AMGParams.for_family("sam", **amg)  # the generator's own checks, before the model loads
    host = kw["host"]
    click.echo("terrasam: loading the model ...", err=True)
    run(raster, host=host or "127.0.0.1", port=kw["port"], allow_remote=host is not None,
        open_browser=kw["open_browser"], echo=lambda m: click.echo(m, err=True),
        model=kw["model"], checkpoint=kw["checkpoint"], device=kw["device"],
        dtype=kw["dtype"], compile=kw["compile_"], backend=kw["backend"],
        bands=parse_bands(kw["bands"]),
        nodata=kw["nodata"], scale=kw["scale"], simplify=kw["simplify"],
        min_area=kw["min_area"], fill_holes=kw["fill_holes"],
        amg=amg,
        cache_mb=kw["cache_mb"], basemap=kw["basemap"],
        score_threshold=kw["score_threshold"])
