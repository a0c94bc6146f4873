"""`terrasam sample [DEST]`: copy the bundled sample raster out, to try terrasam on."""

from __future__ import annotations

import click


@click.command()
@click.argument("dest", required=False, default="naip_sample.tif",
                type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace DEST if it exists.")
def sample(dest, overwrite):
    """Copy the bundled sample raster (NAIP, public domain) to DEST (default naip_sample.tif)."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    import rasterio
    from rasterio.warp import transform_bounds

    from terrasam.data import sample_raster
    from terrasam.errors import TerrasamError

    out = Path(dest).expanduser()
    if out.is_dir():
        raise TerrasamError(f"{dest} is a folder; give a file name such as "
                            f"{out / 'naip_sample.tif'}.")
    if out.exists() and not overwrite:
        raise TerrasamError(f"{dest} exists; use --overwrite to replace it.")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise TerrasamError(f"output folder {folder} does not exist.")
    src = sample_raster()
    # copied under a temporary name and renamed, so an interrupted copy leaves nothing behind
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=folder)
    except OSError as exc:
        raise TerrasamError(f"cannot write to folder {folder} ({exc.strerror}).") from None
    try:
        with os.fdopen(fd, "wb") as f, open(src, "rb") as s:
            shutil.copyfileobj(s, f)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    with rasterio.open(out) as ds:
        crs, bounds, size = ds.crs, ds.bounds, (ds.width, ds.height, ds.count)
    lonlat = transform_bounds(crs, "EPSG:4326", *bounds)
    click.echo(f"wrote {out} ({out.stat().st_size / 2**10:.0f} KB, {size[0]} x {size[1]} px, "
               f"{size[2]} bands)")
    click.echo(f"crs     EPSG:{crs.to_epsg()}")
    click.echo("bounds  " + ", ".join(f"{v:.1f}" for v in bounds) + " (left, bottom, right, top)")
    click.echo("lon/lat " + ", ".join(f"{v:.5f}" for v in lonlat)
               + " (west, south, east, north)")
    click.echo("source  USDA NAIP 2020 imagery, resampled to 5 m (US public domain)")
