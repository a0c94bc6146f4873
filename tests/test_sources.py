"""Raster sources: GDAL virtual paths and URLs open unchanged; GCP and RPC rasters are warped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from rasterio.control import GroundControlPoint
from rasterio.rpc import RPC
from rasterio.transform import from_gcps
from rasterio.windows import Window

from oracle import OracleAdapter
from terrasam import api, io
from terrasam.cli import main
from terrasam.raster import is_local_path, open_raster, source

# writing a GCP/RPC-only raster: GDAL notes it has no transform, which is the point
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

SEGMENT = ["--tile-size", "128", "--overlap", "32", "--points-per-side", "4",
           "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--quiet"]


# -- fixtures ---------------------------------------------------------------------------
# The server runs in its own process: GDAL holds the GIL while it opens a URL, so a server
# thread of the test process could never answer.
_SERVER = r"""
import http.server, io, os, re, sys


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    # static files with HTTP range requests, as /vsicurl/ needs (http.server has none)
    def log_message(self, *args):
        pass

    def send_head(self):
        path = self.translate_path(self.path)
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match is None or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start = int(match[1])
        end = min(int(match[2]) if match[2] else size - 1, size - 1)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


os.chdir(sys.argv[1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@pytest.fixture(scope="module")
def cog(tmp_path_factory, sample_raster):
    """A 128 x 128 px COG cut from the sample raster, alone and inside a zip."""
    d = tmp_path_factory.mktemp("cog")
    with rasterio.open(sample_raster) as ds:
        win = Window(200, 200, 128, 128)
        profile = {"driver": "COG", "width": 128, "height": 128, "count": ds.count,
                   "dtype": ds.dtypes[0], "crs": ds.crs, "nodata": ds.nodata,
                   "transform": ds.window_transform(win), "compress": "deflate",
                   "blocksize": 128}
        data = ds.read(window=win)
    path = d / "x.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    with zipfile.ZipFile(d / "x.zip", "w") as z:
        z.write(path, "x.tif")
    return path


@pytest.fixture(scope="module")
def http_url(cog):
    """``http://127.0.0.1:PORT/x.tif``, served by ``http.server`` for the module's tests."""
    script = cog.parent / "serve.py"
    script.write_text(_SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(cog.parent)],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        with pytest.MonkeyPatch.context() as mp:  # a proxy must not see the local server
            for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                         "all_proxy", "ALL_PROXY"):
                mp.delenv(name, raising=False)
            mp.setenv("NO_PROXY", "127.0.0.1")
            yield f"http://127.0.0.1:{port}/x.tif"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from terrasam.testing import random_checkpoint

    return random_checkpoint("sam-vit-b", tmp_path_factory.mktemp("ckpt") / "sam",
                             size="tiny", seed=0)


def _zip_paths(cog):
    z = cog.parent / "x.zip"
    return {"vsizip": f"/vsizip/{z}/x.tif", "zip+file": f"zip+file://{z}!x.tif"}


# -- the path helpers ----------------------------------------------------------------------
@pytest.mark.parametrize("path, local", [
    ("/data/x.tif", True), ("x.tif", True), ("~/x.tif", True), ("C:\\data\\x.tif", True),
    ("/vsizip//data/x.zip/x.tif", False), ("/vsicurl/https://h/x.tif", False),
    ("https://h/x.tif", False), ("s3://bucket/x.tif", False), ("/vsis3/bucket/x.tif", False),
    ("zip+file:///data/x.zip!x.tif", False),
])
def test_is_local_path(path, local):
    assert is_local_path(path) is local


def test_source_keeps_virtual_paths_byte_for_byte():
    assert source("/vsizip//abs/x.zip/x.tif") == "/vsizip//abs/x.zip/x.tif"
    assert source("/vsicurl/https://h//x.tif") == "/vsicurl/https://h//x.tif"
    assert source("~/x.tif") == os.path.expanduser("~/x.tif")


# -- info and segment on virtual paths and URLs -------------------------------------------
@pytest.mark.parametrize("kind", ["vsizip", "zip+file", "http", "vsicurl"])
def test_info_opens_virtual_paths_and_urls(cog, http_url, kind):
    path = {**_zip_paths(cog), "http": http_url, "vsicurl": f"/vsicurl/{http_url}"}[kind]
    result = CliRunner().invoke(main, ["info", path, "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["path"] == path  # unchanged: no folded double slash
    assert (d["width"], d["height"], d["count"]) == (128, 128, 4)
    assert d["crs"]["epsg"] == 26914


def test_a_missing_member_of_a_zip_is_one_sentence(cog):
    path = f"/vsizip/{cog.parent / 'x.zip'}/nothere.tif"
    result = CliRunner().invoke(main, ["info", path])
    assert result.exit_code == 1
    assert result.output.startswith(f"terrasam: error: '{path}' is not a raster GDAL can read")
    assert "Traceback" not in result.output and len(result.output.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vsizip", "http"])
def test_segment_on_a_zipped_and_a_served_cog(cog, http_url, checkpoint, tmp_path, kind):
    path = _zip_paths(cog)["vsizip"] if kind == "vsizip" else http_url
    out = tmp_path / "out.gpkg"
    result = CliRunner().invoke(main, ["segment", path, "-o", str(out), "--checkpoint",
                                       str(checkpoint), *SEGMENT])
    assert result.exit_code == 0, result.output
    gdf = gpd.read_file(out)
    assert gdf.crs.to_epsg() == 26914 and len(gdf) >= 1
    with rasterio.open(cog) as ds:
        left, bottom, right, top = ds.bounds
    x0, y0, x1, y1 = gdf.total_bounds
    assert left - 1e-6 <= x0 and x1 <= right + 1e-6 and bottom - 1e-6 <= y0 and y1 <= top + 1e-6
    provenance = io.read_provenance(out)["input"]
    assert provenance == {"name": "x.tif", "location": path}  # not stat'ed nor hashed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gpkg"]


# -- GCP and RPC rasters ----------------------------------------------------------------
SQUARE = (30, 50, 60, 80)  # rows 30..59, columns 50..79 of the unwarped image


def _write_square(path, height=120, width=140, gcps=None, rpcs=None):
    data = np.full((3, height, width), 20, dtype=np.uint8)
    r0, c0, r1, c1 = SQUARE
    data[:, r0:r1, c0:c1] = np.array([230, 200, 60], dtype=np.uint8)[:, None, None]
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3,
                       dtype="uint8") as dst:
        dst.write(data)
        if gcps is not None:
            dst.gcps = (gcps, rasterio.CRS.from_epsg(32611))
        if rpcs is not None:
            dst.rpcs = rpcs
    return path


def _gcps(width=140, height=120):
    """GCPs of a 2 m, 25-degree rotated grid (an affine the GCPs define exactly)."""
    from affine import Affine

    t = Affine.translation(400_000, 3_800_000) @ Affine.rotation(-25) @ Affine.scale(2, -2)
    corners = [(0, 0), (width, 0), (0, height), (width, height)]
    return [GroundControlPoint(row=r, col=c, x=(t @ (c, r))[0], y=(t @ (c, r))[1])
            for c, r in corners], t


def _rpc():
    """RPCs of a plain lon/lat grid: column c -> lon, row r -> lat, around (-110, 40)."""
    den = [1.0] + [0.0] * 19
    line, samp = [0.0] * 20, [0.0] * 20
    line[2], samp[1] = -1.0, 1.0  # normalised line = -lat, sample = lon
    return RPC(height_off=0, height_scale=100, lat_off=40.0, lat_scale=0.0012,
               line_den_coeff=den, line_num_coeff=line, line_off=60, line_scale=60,
               long_off=-110.0, long_scale=0.0014, samp_den_coeff=den, samp_num_coeff=samp,
               samp_off=70, samp_scale=70)


def _oracle_segment(path, tmp_path, **kw):
    oracle = OracleAdapter(background=(20, 20, 20))
    return api.segment(path, tmp_path / "out.gpkg", adapter=oracle, tile_size=128,
                       overlap=32, scale="none", points_per_side=8, quiet=True, **kw)


def test_gcp_raster_is_warped_and_polygons_land_where_the_gcps_put_them(tmp_path):
    gcps, t = _gcps()
    path = _write_square(tmp_path / "gcp.tif", gcps=gcps)
    with open_raster(path) as reader:
        assert reader.crs.to_epsg() == 32611 and not reader.transform.is_identity
        assert reader.georeferencing == {"method": "gcps", "count": 4,
                                         "warped_to": "EPSG:32611"}
    gdf = _oracle_segment(path, tmp_path, stats="mean,count", stats_bands=[1])
    assert gdf.crs.to_epsg() == 32611
    r0, c0, r1, c1 = SQUARE
    xs, ys = zip(*[t @ (c, r) for c, r in [(c0, r0), (c1, r0), (c0, r1), (c1, r1)]])
    expected = (min(xs), min(ys), max(xs), max(ys))
    found = max(gdf.geometry, key=lambda g: g.area).bounds
    assert np.allclose(found, expected, atol=2 * 2.0 * 1.5)  # within ~1.5 warped pixels
    # the square is a rotated square, not an axis-aligned box: area ~ 30 x 30 pixels of 4 m2
    assert abs(max(gdf.area_m2) - 900 * 4.0) < 0.15 * 900 * 4.0
    # per-object statistics read the same warped pixels: the square's painted value
    square = gdf.loc[gdf.area_m2.idxmax()]
    assert square["b1_mean"] == pytest.approx(230, abs=1)
    assert from_gcps(gcps).a == pytest.approx(t.a)


def test_rpc_raster_gets_wgs84_and_polygons_at_the_rpc_lon_lat(tmp_path):
    path = _write_square(tmp_path / "rpc.tif", rpcs=_rpc())
    with open_raster(path) as reader:
        assert reader.crs.to_epsg() == 4326
        assert reader.georeferencing["method"] == "rpcs"
    gdf = _oracle_segment(path, tmp_path)
    assert gdf.crs.to_epsg() == 4326
    r0, c0, r1, c1 = SQUARE
    lon = [-110.0 + 0.0014 * (c - 70) / 70 for c in (c0, c1)]
    lat = [40.0 - 0.0012 * (r - 60) / 60 for r in (r1, r0)]
    pixel = 0.0014 / 70
    found = max(gdf.geometry, key=lambda g: g.area).bounds
    assert np.allclose(found, (lon[0], lat[0], lon[1], lat[1]), atol=2 * pixel)


def test_info_says_how_a_gcp_or_rpc_raster_is_georeferenced(tmp_path):
    gcps, _ = _gcps()
    gcp = _write_square(tmp_path / "gcp.tif", gcps=gcps)
    rpc = _write_square(tmp_path / "rpc.tif", rpcs=_rpc())
    plain = _write_square(tmp_path / "plain.tif")
    out = CliRunner().invoke(main, ["info", str(gcp)])
    assert out.exit_code == 0, out.output
    assert "georef      from 4 GCPs (warped to EPSG:32611)" in out.output
    assert "crs         EPSG:32611" in out.output
    out = CliRunner().invoke(main, ["info", str(rpc)])
    assert out.exit_code == 0, out.output
    assert "georef      from RPCs (warped to EPSG:4326)" in out.output
    out = CliRunner().invoke(main, ["info", str(plain), "--json"])
    d = json.loads(out.stdout)
    assert d["crs"] is None and d["georeferencing"]["method"] == "none"
    assert "georef " not in CliRunner().invoke(main, ["info", str(plain)]).output
