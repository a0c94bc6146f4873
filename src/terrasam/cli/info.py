"""`terrasam info RASTER`: what terrasam will do with a raster."""

from __future__ import annotations

import json
import logging

import click


def _number(value) -> str:
    return f"{value:.10g}" if isinstance(value, float) else str(value)


_UNITS = {"metre": "m", "meter": "m", "metres": "m", "meters": "m"}


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.0f} MB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.0f} KB"


def _georef(g: dict) -> str:
    what = f"{g['count']} GCPs" if g["method"] == "gcps" else "RPCs"
    return f"from {what} (warped to {g['warped_to']})"


def _report(d: dict, grid: dict) -> list[str]:
    crs = d["crs"]
    if crs is None:
        crs_line = "none (pixel coordinates)"
    else:
        crs_line = f"EPSG:{crs['epsg']} ({crs['name']})" if crs["epsg"] else crs["name"]
    units = ""
    if crs is not None:
        units = " degrees" if crs["geographic"] else f" {_UNITS.get(crs['units'], crs['units'])}"
    res = f"{_number(d['res'][0])} x {_number(d['res'][1])}{units}"
    if crs is not None and crs["geographic"]:
        res += f" (~{d['ground_res_m'][0]:.3g} x {d['ground_res_m'][1]:.3g} m)"
    bands = ", ".join(f"{b['index']} {b['colorinterp']}" for b in d["bands"])
    nodata = "none" if d["nodata"] is None else _number(d["nodata"])
    if d["nodata_source"]:
        nodata += f" (from: {d['nodata_source']})"
    if d["nan_is_nodata"]:
        nodata += "; NaN pixels are nodata"
    s = d["scaling"]
    if s["method"] == "none":
        scaling = "none: values clipped to 0..255"
    else:
        what = (f"percentile {_number(s['percentiles'][0])}-{_number(s['percentiles'][1])} %"
                if s["method"] == "percentile" else "minmax")
        scaling = f"{what} (global, from {s['source']})"
    ranges = [f"band {b}: {_number(lo)} .. {_number(hi)} -> 0 .. 255"
              for b, lo, hi in zip(d["band_indexes"], s["lo"], s["hi"])]
    layout = f"{d['driver']}, {'tiled' if d['tiled'] else 'striped'} "
    layout += f"{d['block_shape'][1]}x{d['block_shape'][0]}"
    layout += f", {d['compress'].lower() if d['compress'] else 'uncompressed'}"
    layout += f", overviews: {', '.join(map(str, d['overviews'])) or 'none'}"
    tiles = (f"{grid['tile_size']} px tiles, {grid['overlap']} px overlap: "
             f"{grid['rows']} x {grid['cols']} = {grid['tiles']} tiles, "
             f"{grid['tiles_with_data']} with data")
    lines = [
        ("file", d["path"]),
        ("format", layout),
        ("size", f"{d['width']} x {d['height']} px, {d['count']} bands"),
        ("bands", bands),
        ("rgb from", "bands " + ", ".join(map(str, d["rgb_channels"]))),
        ("dtype", d["dtype"]),
        ("nodata", nodata),
        ("crs", crs_line),
        *([("georef", _georef(d["georeferencing"]))]
          if d["georeferencing"]["method"] in ("gcps", "rpcs") else []),
        ("resolution", res),
        ("bounds", ", ".join(_number(v) for v in d["bounds"])),
        ("scaling", scaling),
        *[("", r) for r in ranges],
    ]
    if grid["scale"] != 1.0:
        lines.append(("gsd", f"resampled x{1 / grid['scale']:.4g}: processing grid "
                             f"{grid['width']} x {grid['height']} px of "
                             f"{grid['pixel_size'][0]:.6g}{units}"))
    lines += [("tile grid", tiles),
              ("memory", f"~{_mb(grid['read_bytes_per_tile'])} per tile to read and scale")]
    return [f"{k:<11} {v}" if k else f"{'':<13}{v}" for k, v in lines]


@click.command()
@click.argument("raster", type=click.Path(dir_okay=False))
@click.option("--bands", help="1-based bands to use as R,G,B, e.g. 4,3,2.")
@click.option("--nodata", type=float, help="Nodata value overriding the file's.")
@click.option("--scale", type=click.Choice(["percentile", "minmax", "none"]),
              default="percentile", show_default=True, help="Scaling to 8 bits.")
@click.option("--percentiles", default="2,98", show_default=True,
              help="Low,high percentiles for --scale percentile.")
@click.option("--tile-size", type=int, default=1024, show_default=True)
@click.option("--overlap", type=int, default=256, show_default=True)
@click.option("--gsd", type=float, help="Processing ground sample distance in metres.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(raster, bands, nodata, scale, percentiles, tile_size, overlap, gsd, as_json):
    """Show what terrasam will do with RASTER: bands, nodata, scaling and tile grid."""
    import rasterio

    from terrasam.errors import TerrasamError
    from terrasam.raster import open_raster, parse_bands
    from terrasam.tiling import make_grid

    try:
        pct = tuple(float(p) for p in percentiles.split(","))
    except ValueError:
        raise TerrasamError(f"--percentiles must be two numbers such as 2,98, got "
                            f"{percentiles!r}.") from None
    from terrasam.checks import check_tiling

    check_tiling(tile_size, overlap, gsd)
    # GDAL's warnings about quirky-but-readable files are not the user's business here.
    logging.getLogger("rasterio._env").setLevel(logging.ERROR)
    with rasterio.Env(), open_raster(raster, bands=parse_bands(bands), nodata=nodata,
                                     scale=scale, percentiles=pct) as reader:
        reader.check_gsd(gsd)
        desc = reader.describe()
        res = reader.ground_res if gsd is not None else reader.res
        grid = make_grid(reader.width, reader.height, reader.transform, tile_size=tile_size,
                         overlap=overlap, gsd=gsd, res=res)
        desc["tiling"] = grid.describe(reader)
    if as_json:
        click.echo(json.dumps(desc, indent=2))
    else:
        click.echo("\n".join(_report(desc, desc["tiling"])))
