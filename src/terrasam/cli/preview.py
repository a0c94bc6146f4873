"""`terrasam preview` (PNG of masks over the image) and `terrasam map` (HTML map)."""

from __future__ import annotations

import click

SCALES = ["percentile", "minmax", "none"]


def _raster_options(f):
    f = click.option("--nodata", type=float, default=None,
                     help="Nodata value overriding the file's.")(f)
    f = click.option("--scale", type=click.Choice(SCALES), default="percentile",
                     show_default=True,
                     help="8-bit scaling; use the one the vectors were segmented with.")(f)
    f = click.option("--bands", default=None, metavar="LIST",
                     help="1-based bands to show as RGB, e.g. 4,3,2.")(f)
    return f


@click.command()
@click.argument("raster", type=click.Path(dir_okay=False))
@click.argument("vectors", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="PNG file to write.")
@_raster_options
@click.option("--max-size", type=click.IntRange(min=16), default=2048, show_default=True,
              help="Longest side of the picture in pixels (the raster is decimated).")
@click.option("--title", default=None, help="Title line (default: file, model, counts).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def preview(raster, vectors, output, bands, scale, nodata, max_size, title, overwrite):
    """PNG of the VECTORS' objects drawn over RASTER."""
    from terrasam.raster import parse_bands
    from terrasam.viz import write_preview

    out = write_preview(raster, vectors, output, bands=parse_bands(bands), scale=scale,
                        nodata=nodata, max_size=max_size, title=title, overwrite=overwrite)
    click.echo(f"wrote {out}")


@click.command("map")
@click.argument("raster", type=click.Path(dir_okay=False))
@click.argument("vectors", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="HTML file to write.")
@_raster_options
@click.option("--max-size", type=click.IntRange(min=16), default=1024, show_default=True,
              help="Longest side of the embedded image overlay in pixels.")
@click.option("--basemap", type=click.Choice(["osm", "esri", "none"]), default="osm",
              show_default=True, help="Base map shown first (all are in the layer control).")
@click.option("--title", default=None, help="Caption (default: file, model, count).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def map_(raster, vectors, output, bands, scale, nodata, max_size, basemap, title, overwrite):
    """Self-contained HTML map of RASTER with the VECTORS (base-map tiles need internet)."""
    from terrasam.raster import parse_bands
    from terrasam.viz import write_map

    out = write_map(raster, vectors, output, bands=parse_bands(bands), scale=scale,
                    nodata=nodata, max_size=max_size, basemap=basemap, title=title,
                    overwrite=overwrite)
    click.echo(f"wrote {out}")
