"""The corpus test (issue 14): hard inputs through the command line, each answered either with
one ``terrasam: error:`` line and exit 1, or with the right output (CRS, count, bounds) — never a
traceback, never a partial or temporary file left behind.

Each case builds its inputs in ``tmp_path/in`` and runs ``terrasam`` in-process with the current
directory and the outputs in ``tmp_path/out``, whose full listing (dot-files included) is then
compared with what the case expects. Cases that run a model use the oracle (tests/oracle.py);
the checkpoint cases load real-format random checkpoints.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pyproj
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from click.testing import CliRunner
from pyproj import CRS
from shapely.geometry import box

import corpus
import synth
from oracle import OracleAdapter
from terrasam.cli import main
from terrasam.models.ref import ModelRef

TESTS = Path(__file__).resolve().parent
UTM_T = synth.utm_transform()
FAST = ["--tile-size", "128", "--overlap", "32", "--points-per-side", "8", "-q"]
N = len(corpus.RECTS)
# library wording that must never reach the user's one line
INTERNAL = ("see previous exception", "traceback", "[errno", "cple_", "torch.size",
            "_pickle", "unpicklingerror", "prefixing the file path")


# --------------------------------------------------------------------------- the case table


@dataclass
class Run:
    """What a case runs (argv after ``terrasam``) and how its result is checked."""

    args: list
    check: Callable | None = None  # check(ctx, result) after the common assertions
    files: tuple = ()  # names expected in the output folder afterwards (dirs end with "/")


@dataclass
class Case:
    id: str
    build: Callable  # build(ctx) -> Run
    error: tuple | None  # fragments of the error line (str, or tuple of alternatives)
    oracle: bool = True  # the model is the oracle (else --checkpoint files really load)


@dataclass
class Ctx:
    inp: Path
    out: Path
    request: object

    def fixture(self, name):
        return self.request.getfixturevalue(name)


CASES: list[Case] = []


def case(id, error=None, oracle=True):
    """Register a builder as a corpus case; ``error`` set means exit 1 with that line."""
    def register(build):
        CASES.append(Case(id, build, None if error is None else tuple(error), oracle))
        return build
    return register


def seg(ctx, raster, name="o.gpkg", *extra, scale="none"):
    """``terrasam segment RASTER -o out/NAME`` with small tiles and few points."""
    return ["segment", str(raster), "-o", str(ctx.out / name), *FAST, "--scale", scale, *extra]


def ok(args, count, crs, within=None, truth=(), name="o.gpkg", files=None, check=None) -> Run:
    """A run that must succeed with ``count`` objects in ``crs`` (None: no CRS) in out/NAME,
    inside ``within`` (a polygon in the output's CRS), matching the ``truth`` polygons;
    ``check(ctx, result, gdf)`` adds case-specific assertions."""
    def run_check(ctx, result):
        path = ctx.out / name
        gdf = gpd.read_file(path)
        assert len(gdf) == count, f"{len(gdf)} objects, expected {count}"
        if crs is None:
            assert gdf.crs is None, gdf.crs
        else:
            assert gdf.crs is not None and CRS.from_user_input(gdf.crs).equals(
                CRS.from_user_input(crs)), gdf.crs
        if within is not None:
            area = within.buffer(shapely.length(within) * 1e-6)
            outside = [g.bounds for g in gdf.geometry if not area.contains(g)]
            assert not outside, f"objects outside the raster: {outside}"
        for t in truth:
            best = max(shapely.area(g & t) / shapely.area(g | t) for g in gdf.geometry)
            assert best >= 0.98, f"no object matches {t.bounds} (best IoU {best:.3f})"
        if "area_m2" in gdf.columns:
            assert (gdf["area_m2"] >= 0).all(), list(gdf["area_m2"])
        if check is not None:
            check(ctx, result, gdf)
    return Run(args, run_check, tuple(files or (name,)))


def utm_truth(transform=UTM_T):
    return [corpus.rect_polygon(i, transform) for i in range(1, N + 1)]


def utm_raster(ctx, name="in.tif", **kw):
    return corpus.geotiff(ctx.inp / name, **kw)


def warned(fragment):
    def check(ctx, result, gdf):
        lines = [x for x in result.stderr.splitlines() if x.startswith("terrasam: warning")]
        assert any(fragment in x.lower() for x in lines), result.stderr
    return check


# --------------------------------------------------------------------------- files that are not rasters


@case("raster-empty-file", error=["zero.tif", ("empty", "0 bytes")])
def _(ctx):
    (ctx.inp / "zero.tif").write_bytes(b"")
    return Run(seg(ctx, ctx.inp / "zero.tif"))


@case("raster-truncated", error=["cut.tif", ("truncated", "corrupt", "damaged", "incomplete",
                                              "cannot read")])
def _(ctx):
    src = utm_raster(ctx, "whole.tif")
    corpus.truncated(src, ctx.inp / "cut.tif")
    return Run(seg(ctx, ctx.inp / "cut.tif"))


@case("raster-truncated-header", error=["head.tif", ("truncated", "corrupt", "damaged",
                                                     "incomplete")])
def _(ctx):
    src = utm_raster(ctx, "whole.tif")
    corpus.truncated(src, ctx.inp / "head.tif", fraction=0.01)
    return Run(seg(ctx, ctx.inp / "head.tif"))


@case("raster-corrupt-tile", error=["bad.tif", ("window", "row", "tile", "block"),
                                     ("corrupt", "damaged", "cannot read", "cannot decode")])
def _(ctx):
    src = utm_raster(ctx, "whole.tif")
    corpus.corrupt_tile(src, ctx.inp / "bad.tif")
    return Run(seg(ctx, ctx.inp / "bad.tif"))


@case("raster-text-file", error=["notes.tif", ("not a raster", "not recognized",
                                               "not a supported", "cannot read", "text")])
def _(ctx):
    (ctx.inp / "notes.tif").write_text("these are my field notes, not an image\n")
    return Run(seg(ctx, ctx.inp / "notes.tif"))


@case("raster-vector-file", error=["fields.geojson", ("not a raster", "vector", "not recognized",
                                                      "cannot read", "no raster")])
def _(ctx):
    corpus.points_file(ctx.inp / "fields.geojson", [(-99.0, 35.0)])
    return Run(seg(ctx, ctx.inp / "fields.geojson"))


@case("raster-directory", error=["directory"])
def _(ctx):
    return Run(seg(ctx, ctx.inp))


@case("raster-missing", error=["nope.tif", ("does not exist", "no such file", "not found")])
def _(ctx):
    return Run(seg(ctx, ctx.inp / "nope.tif"))


@case("raster-zip-url")
def _(ctx):
    corpus.zipped(utm_raster(ctx), ctx.inp / "in.zip")
    url = f"zip+file://{ctx.inp / 'in.zip'}!/in.tif"
    return ok(seg(ctx, url), N, synth.UTM, corpus.footprint(UTM_T, 128, 128), utm_truth())


@case("raster-vsizip-missing-member", error=["nope.tif"])
def _(ctx):
    path = corpus.zipped(utm_raster(ctx), ctx.inp / "in.zip")
    return Run(seg(ctx, path.replace("in.tif", "nope.tif")))


@case("raster-vsizip")
def _(ctx):
    path = corpus.zipped(utm_raster(ctx), ctx.inp / "in.zip")
    return ok(seg(ctx, path), N, synth.UTM, corpus.footprint(UTM_T, 128, 128), utm_truth())


# --------------------------------------------------------------------------- georeferencing


def no_crs_raster(ctx):
    return utm_raster(ctx, "nocrs.tif", crs=None)


@case("no-crs-gpkg")
def _(ctx):
    raster = no_crs_raster(ctx)
    return ok(seg(ctx, raster), N, None, corpus.footprint(UTM_T, 128, 128), utm_truth())


@case("no-crs-geojson-refused", error=["crs", ("geojson", ".geojson")])
def _(ctx):
    return Run(seg(ctx, no_crs_raster(ctx), "o.geojson"))


@case("no-crs-kml-refused", error=["crs", ("kml", ".kml")])
def _(ctx):
    return Run(seg(ctx, no_crs_raster(ctx), "o.kml"))


@case("no-crs-gsd-refused", error=["--gsd", ("crs", "georeferenc")])
def _(ctx):
    return Run(seg(ctx, no_crs_raster(ctx), "o.gpkg", "--gsd", "1"))


@case("png-pixel-output")
def _(ctx):
    raster = corpus.plain_image(ctx.inp / "photo.png", "PNG")
    pixel_truth = [box(c0, r0, c1, r1) for r0, c0, r1, c1 in corpus.RECTS]
    return ok(seg(ctx, raster), N, None, box(0, 0, 128, 128), pixel_truth,
              check=warned("pixel coordinates"))


@case("jpeg-pixel-output")
def _(ctx):
    raster = corpus.plain_image(ctx.inp / "photo.jpg", "JPEG")
    return ok(seg(ctx, raster, "o.gpkg", scale="none"), N, None, box(0, 0, 128, 128),
              check=warned("pixel coordinates"))


@case("png-geojson-refused", error=["crs", ("geojson", ".geojson", "georeferenc")])
def _(ctx):
    raster = corpus.plain_image(ctx.inp / "photo.png", "PNG")
    return Run(seg(ctx, raster, "o.geojson"))


@case("rotated-affine")
def _(ctx):
    t = synth.rotated_transform(30.0)
    raster = utm_raster(ctx, transform=t)
    return ok(seg(ctx, raster), N, synth.UTM, corpus.footprint(t, 128, 128), utm_truth(t))


@case("sheared-affine")
def _(ctx):
    t = synth.utm_transform() @ Affine.shear(20.0, 0.0)
    raster = utm_raster(ctx, transform=t)
    return ok(seg(ctx, raster), N, synth.UTM, corpus.footprint(t, 128, 128), utm_truth(t))


@case("south-up-affine")
def _(ctx):
    t = Affine(0.5, 0.0, 500_000.0, 0.0, 0.5, 4_000_000.0)  # rows run north
    raster = utm_raster(ctx, transform=t)
    return ok(seg(ctx, raster), N, synth.UTM, corpus.footprint(t, 128, 128), utm_truth(t))


@case("gcp-only")
def _(ctx):
    raster = corpus.gcp_only(ctx.inp / "gcps.tif")
    return ok(seg(ctx, raster), N, synth.UTM, corpus.footprint(UTM_T, 128, 128).buffer(1.0),
              utm_truth())


@case("rpc-only")
def _(ctx):
    raster = corpus.rpc_only(ctx.inp / "rpcs.tif")
    d = 1e-5
    outline = box(-99.0 - 64 * d, 35.0 - 64 * d, -99.0 + 64 * d, 35.0 + 64 * d).buffer(2 * d)
    return ok(seg(ctx, raster), N, "EPSG:4326", outline)


@case("utm-geojson-in-wgs84")
def _(ctx):
    raster = utm_raster(ctx)
    outline = corpus.reproject(corpus.footprint(UTM_T, 128, 128), synth.UTM)
    truth = [corpus.reproject(p, synth.UTM) for p in utm_truth()]
    return ok(seg(ctx, raster, "o.geojson"), N, "EPSG:4326", outline, truth, name="o.geojson",
              files=("o.geojson", "o.geojson.terrasam.json"))


@case("utm-kml")
def _(ctx):
    raster = utm_raster(ctx)
    outline = corpus.reproject(corpus.footprint(UTM_T, 128, 128), synth.UTM)
    return ok(seg(ctx, raster, "o.kml"), N, "EPSG:4326", outline, name="o.kml",
              files=("o.kml", "o.kml.terrasam.json"))


# a CRS no EPSG code describes (GDAL would recognise a standard Albers as EPSG:5070)
LAEA = "+proj=laea +lat_0=35 +lon_0=-98.5 +x_0=0 +y_0=0 +datum=WGS84 +units=m +no_defs"


def laea_raster(ctx):
    t = Affine(2.0, 0.0, -100.0, 0.0, -2.0, 100.0)
    raster = utm_raster(ctx, transform=t, crs=LAEA)
    with rasterio.open(raster) as ds:
        assert ds.crs.to_epsg() is None  # really not an EPSG CRS
        crs = CRS.from_wkt(ds.crs.to_wkt())
    return raster, t, crs


@case("non-epsg-crs-geojson")
def _(ctx):
    raster, t, crs = laea_raster(ctx)
    outline = corpus.reproject(corpus.footprint(t, 128, 128), crs)
    truth = [corpus.reproject(corpus.rect_polygon(i, t), crs) for i in range(1, N + 1)]
    return ok(seg(ctx, raster, "o.geojson"), N, "EPSG:4326", outline, truth, name="o.geojson",
              files=("o.geojson", "o.geojson.terrasam.json"))


@case("non-epsg-crs-gpkg")
def _(ctx):
    raster, t, crs = laea_raster(ctx)
    truth = [corpus.rect_polygon(i, t) for i in range(1, N + 1)]
    return ok(seg(ctx, raster), N, crs, corpus.footprint(t, 128, 128), truth)


def antimeridian_transform():
    return synth.geographic_transform(pixel_size=1e-4, origin=(179.995, 0.01))


@case("antimeridian-4326")
def _(ctx):
    t = antimeridian_transform()
    raster = utm_raster(ctx, transform=t, crs=synth.WGS84)
    side = 1e-4 * 111_320.0  # metres per pixel near the equator

    def areas(ctx, result, gdf):
        expected = sorted((r1 - r0) * (c1 - c0) * side * side for r0, c0, r1, c1 in corpus.RECTS)
        got = sorted(gdf["area_m2"])
        assert np.allclose(got, expected, rtol=0.02), (got, expected)

    truth = [corpus.rect_polygon(i, t) for i in range(1, N + 1)]
    return ok(seg(ctx, raster), N, synth.WGS84, corpus.footprint(t, 128, 128), truth,
              check=areas)


def lon_lat_in_range(ctx, result, gdf):
    # RFC 7946 (GeoJSON) longitudes lie in [-180, 180]: objects across the antimeridian are
    # split there, not written with longitudes past 180
    xy = shapely.get_coordinates(gdf.geometry.values)
    assert xy[:, 0].min() >= -180 and xy[:, 0].max() <= 180, (xy[:, 0].min(), xy[:, 0].max())
    assert np.abs(xy[:, 1]).max() <= 90


@case("antimeridian-geojson")
def _(ctx):
    t = antimeridian_transform()
    raster = utm_raster(ctx, transform=t, crs=synth.WGS84)
    return ok(seg(ctx, raster, "o.geojson"), N, synth.WGS84, name="o.geojson",
              files=("o.geojson", "o.geojson.terrasam.json"), check=lon_lat_in_range)


@case("wgs84-gsd-stays-inside")
def _(ctx):
    t = synth.geographic_transform(pixel_size=1e-5)
    raster = utm_raster(ctx, transform=t, crs=synth.WGS84)
    return ok(seg(ctx, raster, "o.gpkg", "--gsd", "1.5"), N, synth.WGS84,
              corpus.footprint(t, 128, 128))


def inside_bounds_and_geodesic(raster, whole=None):
    """No coordinate past the raster's bounds (exactly), every area_m2 the geodesic area of
    its geometry; ``whole``: the one object is the whole raster, of this exact area."""
    def check(ctx, result, gdf):
        with rasterio.open(raster) as ds:
            b = ds.bounds
        xy = shapely.get_coordinates(gdf.geometry.values)
        assert b.left <= xy[:, 0].min() and xy[:, 0].max() <= b.right, (xy[:, 0].max(), b)
        assert b.bottom <= xy[:, 1].min() and xy[:, 1].max() <= b.top, (xy[:, 1].min(), b)
        geod = pyproj.Geod(ellps="WGS84")
        for g, area in zip(gdf.geometry, gdf["area_m2"]):
            assert area >= 0
            if whole is None:  # small objects: pyproj's own geodesic area
                assert area == pytest.approx(abs(geod.geometry_area_perimeter(g)[0]), rel=1e-9)
        if whole is not None:
            assert len(gdf) == 1 and gdf.geometry[0].equals(box(*b))
            assert gdf["area_m2"][0] == pytest.approx(whole, rel=1e-6)
    return check


# objects touching the right and bottom edges, which a resampled grid's last pixel overran
EDGE_RECTS = [(10, 10, 50, 60), (70, 90, 128, 128), (100, 0, 128, 40)]


@pytest.mark.parametrize("gsd", ["1.3", "7.7"])
def test_wgs84_gsd_objects_at_the_edge_stay_inside(tmp_path, monkeypatch, gsd):
    # before: 1.7e-6 and 2.4e-5 degrees past the right/bottom edge (a fraction of a coarse
    # pixel); now every coordinate lies within the raster's bounds
    t = synth.geographic_transform(pixel_size=1e-5)
    raster = corpus.geotiff(tmp_path / "edge.tif", corpus.labels_of(EDGE_RECTS), transform=t,
                            crs=synth.WGS84)
    gdf = run_oracle(tmp_path, monkeypatch, ["segment", raster, "-o", tmp_path / "o.gpkg",
                                             *FAST, "--scale", "none", "--gsd", gsd])
    assert len(gdf) >= 3
    inside_bounds_and_geodesic(raster)(None, None, gdf)


@pytest.mark.parametrize("transform, gsd, bounds", [
    (Affine(0.05, 0, 0, 0, -0.05, -83.6), "50000", (0, -90, 6.4, -83.6)),  # down to the pole
    (Affine(0.1, 0, 175, 0, -0.1, 10), "1000000", (175, -2.8, 187.8, 10)),  # the antimeridian
    (Affine(360 / 128, 0, -180, 0, -180 / 128, 90), "5000000", (-180, -90, 180, 90)),  # globe
], ids=["pole", "antimeridian", "globe"])
def test_extreme_gsd_on_wgs84_keeps_the_raster_and_its_area(tmp_path, monkeypatch, transform,
                                                            gsd, bounds):
    # one object covering the raster, read at 3-4 coarse pixels a side whose last one reached
    # 1.2 degrees past the pole (area NaN), 5.2 degrees past the raster's east edge, or 22
    # degrees past the globe's; now the object is the raster, of its exact ellipsoidal area
    raster = corpus.geotiff(tmp_path / "x.tif", np.ones((128, 128), np.int32),
                            transform=transform, crs=synth.WGS84)
    gdf = run_oracle(tmp_path, monkeypatch, ["segment", raster, "-o", tmp_path / "o.gpkg",
                                             *FAST, "--scale", "none", "--gsd", gsd])
    inside_bounds_and_geodesic(raster, whole=corpus.lonlat_box_area(*bounds))(None, None, gdf)


def run_oracle(tmp_path, monkeypatch, args):
    """``terrasam ARGS`` in-process with the oracle model; the objects written to -o."""
    oracle = OracleAdapter(background=corpus.BLACK)
    monkeypatch.setattr(ModelRef, "for_run", classmethod(lambda cls, *a, **k: cls.of(oracle)))
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return gpd.read_file(args[args.index("-o") + 1])


@case("gsd-leaves-less-than-one-pixel", error=["--gsd 130 m", "less than one pixel",
                                               "128 x 128 pixels of 1 m", "at most 128 m"],
      oracle=False)
def _(ctx):
    # refused before the model loads: this checkpoint cannot load
    (ctx.inp / "page.pth").write_text("<html>403</html>\n")
    raster = utm_raster(ctx, transform=synth.geographic_transform(pixel_size=1e-5),
                        crs=synth.WGS84)
    return Run(seg(ctx, raster, "o.gpkg", "--gsd", "130", "--checkpoint",
                   str(ctx.inp / "page.pth")))


@case("gsd-too-fine", error=["--gsd 0.004 m", "0.5 m pixel into 125.0 x 125.0",
                             "at most 100 x 100", "at least 0.005 m"], oracle=False)
def _(ctx):
    (ctx.inp / "page.pth").write_text("<html>403</html>\n")
    return Run(seg(ctx, utm_raster(ctx), "o.gpkg", "--gsd", "0.004", "--checkpoint",
                   str(ctx.inp / "page.pth")))


# --------------------------------------------------------------------------- bands and dtypes


@case("bands-1")
def _(ctx):
    raster = utm_raster(ctx, bands=1)
    return ok(seg(ctx, raster), N, synth.UTM, corpus.footprint(UTM_T, 128, 128), utm_truth())


@case("bands-2")
def _(ctx):
    raster = utm_raster(ctx, bands=2)
    return ok(seg(ctx, raster), N, synth.UTM, corpus.footprint(UTM_T, 128, 128), utm_truth())


@case("bands-5")
def _(ctx):
    raster = utm_raster(ctx, bands=5)
    return ok(seg(ctx, raster), N, synth.UTM, corpus.footprint(UTM_T, 128, 128), utm_truth())


@case("bands-16-uint16")
def _(ctx):
    raster = utm_raster(ctx, bands=16, dtype="uint16")
    return ok(seg(ctx, raster, "o.gpkg", scale="minmax"), N, synth.UTM,
              corpus.footprint(UTM_T, 128, 128), utm_truth())


@case("band-index-out-of-range", error=["band 5", ("out of range", "has 4 band", "4 bands")])
def _(ctx):
    raster = utm_raster(ctx, bands=4)
    return Run(seg(ctx, raster, "o.gpkg", "--bands", "1,2,5"))


@case("uint16")
def _(ctx):
    raster = utm_raster(ctx, dtype="uint16")
    return ok(seg(ctx, raster, "o.gpkg", scale="minmax"), N, synth.UTM,
              corpus.footprint(UTM_T, 128, 128), utm_truth())


@case("int16-negative")
def _(ctx):
    raster = utm_raster(ctx, dtype="int16")
    return ok(seg(ctx, raster, "o.gpkg", scale="minmax"), N, synth.UTM,
              corpus.footprint(UTM_T, 128, 128), utm_truth())


def float_raster(ctx, specials):
    labels = corpus.labels_of()
    image = corpus.paint(labels, dtype="float32")
    for (r, c), value in specials.items():
        image[:, r, c] = value
    return synth.write_raster(ctx.inp / "float.tif", image, transform=UTM_T, blocksize=64)


@case("float-nan")
def _(ctx):
    # a NaN nodata frame and NaN pixels in the background
    labels = corpus.labels_of()
    image = corpus.paint(labels, dtype="float32")
    image[:, :4, :] = np.nan
    image[:, 60:64, 100:104] = np.nan
    raster = synth.write_raster(ctx.inp / "nan.tif", image, transform=UTM_T, blocksize=64,
                                nodata=float("nan"))
    return ok(seg(ctx, raster, "o.gpkg", scale="minmax"), N, synth.UTM,
              corpus.footprint(UTM_T, 128, 128))


@case("float-inf")
def _(ctx):
    raster = float_raster(ctx, {(125, 2): np.inf, (126, 3): -np.inf, (2, 125): np.nan})
    return ok(seg(ctx, raster, "o.gpkg", scale="minmax"), N, synth.UTM,
              corpus.footprint(UTM_T, 128, 128), utm_truth())


@case("uint16-default-percentile-scale")
def _(ctx):
    raster = utm_raster(ctx, dtype="uint16")
    args = [a for a in seg(ctx, raster) if a not in ("--scale", "none")]
    return ok(args, N, synth.UTM, corpus.footprint(UTM_T, 128, 128), utm_truth())


@case("float64")
def _(ctx):
    image = corpus.paint(corpus.labels_of(), dtype="float64")
    raster = synth.write_raster(ctx.inp / "f64.tif", image, transform=UTM_T, blocksize=64)
    return ok(seg(ctx, raster, "o.gpkg", scale="minmax"), N, synth.UTM,
              corpus.footprint(UTM_T, 128, 128), utm_truth())


def without_quiet(args):
    """The hint shows without -q (it is not progress output)."""
    return [a for a in args if a != "-q"]


def zero_objects_check(ctx, result, gdf):
    hints = [x for x in result.stderr.splitlines() if x.startswith("terrasam: hint")]
    assert len(hints) == 1, result.stderr
    assert pyogrio.read_info(ctx.out / "o.gpkg")["geometry_type"] in ("MultiPolygon",
                                                                      "Polygon")


@case("all-nodata")
def _(ctx):
    image = np.zeros((3, 128, 128), np.uint8)
    raster = synth.write_raster(ctx.inp / "void.tif", image, transform=UTM_T, nodata=0,
                                blocksize=64)
    return ok(without_quiet(seg(ctx, raster)), 0, synth.UTM, check=zero_objects_check)


@case("all-masked")
def _(ctx):
    labels = corpus.labels_of()
    raster = synth.write_raster(ctx.inp / "masked.tif", corpus.paint(labels), transform=UTM_T,
                                blocksize=64, mask=np.zeros(labels.shape, bool))
    return ok(without_quiet(seg(ctx, raster)), 0, synth.UTM, check=zero_objects_check)


@case("zero-objects")
def _(ctx):
    image = np.zeros((3, 128, 128), np.uint8)  # valid pixels, all the oracle's background
    raster = synth.write_raster(ctx.inp / "flat.tif", image, transform=UTM_T, blocksize=64)
    return ok(without_quiet(seg(ctx, raster)), 0, synth.UTM, check=zero_objects_check)


@case("nodata-value-not-a-number", error=["--nodata", "abc"])
def _(ctx):
    return Run(seg(ctx, utm_raster(ctx), "o.gpkg", "--nodata", "abc"))


# --------------------------------------------------------------------------- sizes


@case("raster-1x1")
def _(ctx):
    labels = np.ones((1, 1), np.int32)
    raster = corpus.geotiff(ctx.inp / "one.tif", labels, tiled=False)
    return ok(seg(ctx, raster), 1, synth.UTM, corpus.footprint(UTM_T, 1, 1),
              [corpus.footprint(UTM_T, 1, 1)])


@case("raster-2x2-one-object")
def _(ctx):
    labels = np.ones((2, 2), np.int32)
    raster = corpus.geotiff(ctx.inp / "two.tif", labels, tiled=False)
    return ok(seg(ctx, raster), 1, synth.UTM, corpus.footprint(UTM_T, 2, 2),
              [corpus.footprint(UTM_T, 2, 2)])


@case("raster-10x10")
def _(ctx):
    rects = [(2, 2, 8, 7)]
    labels = corpus.labels_of(rects, 10, 10)
    raster = corpus.geotiff(ctx.inp / "ten.tif", labels, tiled=False)
    return ok(seg(ctx, raster), 1, synth.UTM, corpus.footprint(UTM_T, 10, 10),
              [corpus.rect_polygon(1, UTM_T, rects)])


STRIP_RECTS = [(1, 100, 7, 300), (1, 700, 7, 900), (0, 50_000, 8, 50_400), (2, 99_800, 6, 99_990)]


@case("strip-100000x8")
def _(ctx):
    labels = corpus.labels_of(STRIP_RECTS, 8, 100_000)
    raster = synth.write_raster(ctx.inp / "strip.tif", corpus.paint(labels), transform=UTM_T,
                                tiled=False)
    args = ["segment", str(raster), "-o", str(ctx.out / "o.gpkg"), "--tile-size", "1024",
            "--overlap", "256", "--points-per-side", "4", "--scale", "none", "-q"]
    truth = [corpus.rect_polygon(i, UTM_T, STRIP_RECTS) for i in range(1, 5)]
    return ok(args, 4, synth.UTM, corpus.footprint(UTM_T, 100_000, 8), truth)


# --------------------------------------------------------------------------- prompts


def prompt(ctx, raster, *extra, name="o.gpkg"):
    return ["prompt", str(raster), "-o", str(ctx.out / name), "--scale", "none", "-q", *extra]


def pixel_xy(col, row, transform=UTM_T):
    return transform @ (col, row)


@case("prompt-point-in-raster-crs")
def _(ctx):
    x, y = pixel_xy(30.5, 30.5)
    return ok(prompt(ctx, utm_raster(ctx), "--point", f"{x},{y}"), 1, synth.UTM,
              truth=utm_truth()[:1])


@case("prompt-point-in-another-crs")
def _(ctx):
    lon, lat = corpus.to_lonlat(*pixel_xy(40.5, 90.5))
    return ok(prompt(ctx, utm_raster(ctx), "--point", f"{lon},{lat}", "--crs", "EPSG:4326"),
              1, synth.UTM, truth=utm_truth()[1:2])


@case("prompt-point-outside", error=["outside", "500000", "4099936"])  # the raster's bounds
def _(ctx):
    x, y = pixel_xy(500, 40)
    return Run(prompt(ctx, utm_raster(ctx), "--point", f"{x},{y}"))


@case("prompt-lon-lat-swapped", error=["swap"])
def _(ctx):
    lon, lat = corpus.to_lonlat(*pixel_xy(30.5, 30.5))
    return Run(prompt(ctx, utm_raster(ctx), "--point", f"{lat},{lon}", "--crs", "EPSG:4326"))


@case("prompt-point-nan", error=["non-finite"])
def _(ctx):
    return Run(prompt(ctx, utm_raster(ctx), "--point", "nan,4100000"))


@case("prompt-point-inf", error=["non-finite"])
def _(ctx):
    return Run(prompt(ctx, utm_raster(ctx), "--point", "500010,inf"))


@case("prompt-box-partly-outside")
def _(ctx):
    # clipped to the raster the box is centred on rectangle 1; unclipped, on the background
    x0, y0 = pixel_xy(-40, -40)
    x1, y1 = pixel_xy(50, 45)
    box_arg = f"{min(x0, x1)},{min(y0, y1)},{max(x0, x1)},{max(y0, y1)}"
    return ok(prompt(ctx, utm_raster(ctx), "--box", box_arg), 1, synth.UTM,
              corpus.footprint(UTM_T, 128, 128), utm_truth()[:1])


@case("prompt-box-outside", error=["outside"])
def _(ctx):
    x0, y0 = pixel_xy(300, 300)
    x1, y1 = pixel_xy(400, 200)
    return Run(prompt(ctx, utm_raster(ctx), "--box", f"{x0},{y0},{x1},{y1}"))


@case("prompt-points-file-other-crs")
def _(ctx):
    pts = corpus.points_file(ctx.inp / "pts.geojson",
                             [corpus.to_lonlat(*pixel_xy(90.5, 60.5))])
    return ok(prompt(ctx, utm_raster(ctx), "--points", str(pts)), 1, synth.UTM,
              truth=utm_truth()[2:3])


@case("prompt-points-file-empty", error=["nothing.geojson", ("no point", "no feature", "empty")])
def _(ctx):
    pts = corpus.points_file(ctx.inp / "nothing.geojson", [])
    return Run(prompt(ctx, utm_raster(ctx), "--points", str(pts)))


@case("prompt-points-file-zero-bytes", error=["zero.geojson", ("empty", "0 bytes")])
def _(ctx):
    (ctx.inp / "zero.geojson").write_bytes(b"")
    return Run(prompt(ctx, utm_raster(ctx), "--points", str(ctx.inp / "zero.geojson")))


@case("prompt-points-file-polygons", error=["polygon"])
def _(ctx):
    pts = corpus.points_file(ctx.inp / "polys.geojson", [pixel_xy(30, 30)], crs=synth.UTM,
                             geometry="Polygon")
    return Run(prompt(ctx, utm_raster(ctx), "--points", str(pts)))


@case("prompt-points-file-outside", error=["outside"])
def _(ctx):
    pts = corpus.points_file(ctx.inp / "far.geojson", [(10.0, 50.0)])
    return Run(prompt(ctx, utm_raster(ctx), "--points", str(pts)))


@case("prompt-no-crs-raster-with-crs-option", error=["crs"])
def _(ctx):
    x, y = pixel_xy(30.5, 30.5)
    return Run(prompt(ctx, no_crs_raster(ctx), "--point", f"{x},{y}", "--crs", "EPSG:32614"))


@case("prompt-boxes-file-of-points", error=["pts.geojson", ("point", "polygon")])
def _(ctx):
    pts = corpus.points_file(ctx.inp / "pts.geojson", [corpus.to_lonlat(*pixel_xy(30, 30))])
    return Run(prompt(ctx, utm_raster(ctx), "--boxes", str(pts)))


@case("prompt-points-file-garbage", error=["junk.geojson"])
def _(ctx):
    (ctx.inp / "junk.geojson").write_text("{not json at all")
    return Run(prompt(ctx, utm_raster(ctx), "--points", str(ctx.inp / "junk.geojson")))


# --------------------------------------------------------------------------- outputs


@case("output-exists", error=["exist", "--overwrite"])
def _(ctx):
    (ctx.out / "o.gpkg").write_bytes(b"precious")

    def untouched(ctx, result):
        assert (ctx.out / "o.gpkg").read_bytes() == b"precious"

    return Run(seg(ctx, utm_raster(ctx)), untouched, ("o.gpkg",))


@case("output-exists-overwrite")
def _(ctx):
    (ctx.out / "o.gpkg").write_bytes(b"old")
    return ok(seg(ctx, utm_raster(ctx), "o.gpkg", "--overwrite"), N, synth.UTM,
              corpus.footprint(UTM_T, 128, 128), utm_truth())


@case("label-raster-exists", error=["labels.tif", "exist", "--overwrite"])
def _(ctx):
    (ctx.out / "labels.tif").write_bytes(b"precious")
    return Run(seg(ctx, utm_raster(ctx), "o.gpkg", "--label-raster",
                   str(ctx.out / "labels.tif")), files=("labels.tif",))


@case("output-folder-missing", error=[("folder", "directory")])
def _(ctx):
    return Run(seg(ctx, utm_raster(ctx), "missing/o.gpkg"))


@case("output-parent-is-a-file", error=["afile", ("is a file", "not a folder", "not a dir")])
def _(ctx):
    (ctx.out / "afile").write_text("x")
    return Run(seg(ctx, utm_raster(ctx), "afile/o.gpkg"), files=("afile",))


@case("output-is-a-directory", error=["o.gpkg", ("directory", "folder")])
def _(ctx):
    (ctx.out / "o.gpkg").mkdir()
    return Run(seg(ctx, utm_raster(ctx), "o.gpkg", "--overwrite"), files=("o.gpkg/",))


@case("output-unwritable", error=["/proc"])
def _(ctx):
    # even root cannot create files in /proc
    args = seg(ctx, utm_raster(ctx))
    args[args.index("-o") + 1] = "/proc/terrasam-corpus.gpkg"
    return Run(args)


@case("output-unsupported-format", error=[".xyz"])
def _(ctx):
    return Run(seg(ctx, utm_raster(ctx), "o.xyz"))


# --------------------------------------------------------------------------- checkpoints


def ckpt_run(ctx, path, *extra):
    return Run(seg(ctx, utm_raster(ctx), "o.gpkg", "--checkpoint", str(path), "--device",
                   "cpu", *extra))


@case("checkpoint-text-file", error=["page.pth", "text"], oracle=False)
def _(ctx):
    (ctx.inp / "page.pth").write_text("<html><body>403 Forbidden</body></html>\n")
    return ckpt_run(ctx, ctx.inp / "page.pth")


@case("checkpoint-empty", error=["empty.pth", ("empty", "0 bytes")], oracle=False)
def _(ctx):
    (ctx.inp / "empty.pth").write_bytes(b"")
    return ckpt_run(ctx, ctx.inp / "empty.pth")


@case("checkpoint-truncated", error=["cut.pth", ("truncated", "corrupt")], oracle=False)
def _(ctx):
    cut = corpus.truncated(ctx.fixture("sam_file"), ctx.inp / "cut.pth", fraction=0.5)
    return ckpt_run(ctx, cut)


@case("checkpoint-corrupt", error=["noise.pth", ("corrupt", "truncated", "not a")],
      oracle=False)
def _(ctx):
    data = bytearray(ctx.fixture("sam_file").read_bytes())
    rng = np.random.default_rng(0)
    data[1000:len(data) - 1000] = rng.integers(0, 256, len(data) - 2000, np.uint8).tobytes()
    (ctx.inp / "noise.pth").write_bytes(bytes(data))
    return ckpt_run(ctx, ctx.inp / "noise.pth")


class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@case("checkpoint-pickled-code", error=["evil.pth", "code"], oracle=False)
def _(ctx):
    marker = ctx.inp / "marker"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "x": _Payload(marker)},
               ctx.inp / "evil.pth")

    def code_did_not_run(ctx, result):
        assert not marker.exists(), "the checkpoint's code ran"
        assert "weights_only" not in result.output

    run = ckpt_run(ctx, ctx.inp / "evil.pth")
    run.check = code_did_not_run
    return run


@case("checkpoint-missing-key", error=["image_encoder.patch_embed.proj.weight"], oracle=False)
def _(ctx):
    sd = torch.load(ctx.fixture("sam_file"), weights_only=True)
    del sd["image_encoder.patch_embed.proj.weight"]
    torch.save(sd, ctx.inp / "partial.pth")
    return ckpt_run(ctx, ctx.inp / "partial.pth")


@case("checkpoint-mismatched-shape", error=["image_encoder.blocks.0.mlp.lin1.weight", "shape"],
      oracle=False)
def _(ctx):
    sd = torch.load(ctx.fixture("sam_file"), weights_only=True)
    sd["image_encoder.blocks.0.mlp.lin1.weight"] = torch.zeros(7, 3)
    torch.save(sd, ctx.inp / "shape.pth")
    return ckpt_run(ctx, ctx.inp / "shape.pth")


@case("checkpoint-of-another-model", error=["sam2", "sam-vit-b"], oracle=False)
def _(ctx):
    return ckpt_run(ctx, ctx.fixture("sam2_file"), "--model", "sam-vit-b")


@case("checkpoint-not-weights-json", error=["config.pth"], oracle=False)
def _(ctx):
    (ctx.inp / "config.pth").write_text('{"model_type": "vit_b"}')
    return ckpt_run(ctx, ctx.inp / "config.pth")


@case("checkpoint-empty-folder", error=["model", ("config.json", "checkpoint", "weights"),
                                        ("folder", "directory")], oracle=False)
def _(ctx):
    (ctx.inp / "model").mkdir()
    return ckpt_run(ctx, ctx.inp / "model")


@case("checkpoint-missing", error=["gone.pth", ("does not exist", "no such", "not found")],
      oracle=False)
def _(ctx):
    return ckpt_run(ctx, ctx.inp / "gone.pth")


@case("options-checked-before-the-model", error=["--tile-size"], oracle=False)
def _(ctx):
    # the checkpoint cannot load either: the option must be reported first
    (ctx.inp / "page.pth").write_text("<html>403</html>\n")
    return Run(seg(ctx, utm_raster(ctx), "o.gpkg", "--checkpoint", str(ctx.inp / "page.pth"),
                   "--tile-size", "10"))


@case("model-id-misspelled", error=["sam2.1-hiera-tiy", "did you mean", "sam2.1-hiera-tiny"],
      oracle=False)
def _(ctx):
    return Run(seg(ctx, utm_raster(ctx), "o.gpkg", "--model", "sam2.1-hiera-tiy"))


# --------------------------------------------------------------------------- running the table


def listing(folder: Path) -> list[str]:
    """Every entry below folder (dot-files too), relative; folders end with '/'."""
    names = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        names += [f"{rel / d}/" if str(rel) != "." else f"{d}/" for d in dirs]
        names += [str(rel / f) if str(rel) != "." else f for f in files]
    return sorted(names)


def stderr_lines(result) -> list[str]:
    return [x for x in result.stderr.splitlines() if x.strip()]


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_hard_input(c: Case, tmp_path, monkeypatch, request):
    ctx = Ctx(tmp_path / "in", tmp_path / "out", request)
    ctx.inp.mkdir()
    ctx.out.mkdir()
    if c.oracle:
        oracle = OracleAdapter(background=corpus.BLACK)
        monkeypatch.setattr(ModelRef, "for_run",
                            classmethod(lambda cls, *a, **k: cls.of(oracle)))
    run = c.build(ctx)
    inputs = listing(ctx.inp)
    monkeypatch.chdir(ctx.out)  # stray files in the current directory show in the listing
    result = CliRunner().invoke(main, run.args)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}"
    assert "Traceback" not in result.output, result.output
    assert "Usage:" not in result.output, result.output
    if c.error is not None:
        lines = stderr_lines(result)
        assert result.exit_code == 1, f"exit {result.exit_code}, expected 1\n{result.output}"
        assert len(lines) == 1 and lines[0].startswith("terrasam: error: "), result.output
        # the case id is part of tmp_path: only the message itself may match the fragments
        line = lines[0].replace(str(tmp_path), "<tmp>").lower()
        for internal in INTERNAL:
            assert internal not in line, f"internal wording {internal!r} in {lines[0]!r}"
        for fragment in c.error:
            options = fragment if isinstance(fragment, tuple) else (fragment,)
            assert any(o.lower() in line for o in options), \
                f"none of {options} in {lines[0]!r}"
    else:
        assert result.exit_code == 0, result.output
        assert not [x for x in stderr_lines(result) if x.startswith("terrasam: error")]
    if run.check is not None:
        run.check(ctx, result)
    assert listing(ctx.out) == sorted(run.files)
    assert listing(ctx.inp) == inputs  # nothing written beside the inputs (no .aux.xml)


def test_the_corpus_is_big_enough():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40


# --------------------------------------------------------------------------- runs in a subprocess

WRAPPER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
from oracle import OracleAdapter
from terrasam.models.ref import ModelRef
import terrasam.cli
oracle = OracleAdapter(background=(0, 0, 0))
ModelRef.for_run = classmethod(lambda cls, *a, **k: cls.of(oracle))
if os.environ.get("CORPUS_KILL_AT_CLOSE"):  # die like kill -9 as the outputs are put in place
    from terrasam import io
    io.VectorWriter.close = lambda self, *a, **k: os.kill(os.getpid(), signal.SIGKILL)
terrasam.cli.main(sys.argv[1:], prog_name="terrasam")
"""


def run_limited(args, cwd, fsize=None, env=None):
    """terrasam (oracle model) in a subprocess, every file it writes limited to fsize bytes."""
    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", WRAPPER.format(tests=str(TESTS)),
                           *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd, preexec_fn=limit)


@pytest.mark.parametrize("name, extra", [("o.gpkg", ()), ("o.geojson", ()),
                                         ("o.parquet", ()), ("o.gpkg", ("label",))],
                         ids=["gpkg", "geojson", "parquet", "gpkg+label-raster"])
def test_disk_full(tmp_path, name, extra):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    raster = corpus.geotiff(inp / "in.tif")
    args = ["segment", raster, "-o", out / name, *FAST, "--scale", "none",
            "--workdir", tmp_path / "work"]
    if extra:
        args += ["--label-raster", out / "labels.tif"]
    proc = run_limited(args, out, fsize=20_000)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("terrasam: error: "), proc.stderr
    assert "disk full" in lines[0]
    assert listing(out) == []


def test_truncated_workdir_tile_is_recomputed_with_a_warning(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    raster = corpus.geotiff(inp / "in.tif", corpus.labels_of(height=256, width=256))
    work = tmp_path / "work"
    args = ["segment", raster, "-o", out / "o.gpkg", *FAST, "--scale", "none", "--workdir",
            work, "--keep-workdir"]
    first = run_limited(args, out)
    assert first.returncode == 0, first.stderr
    tiles = sorted(work.glob("tile_*.npz"))
    assert len(tiles) >= 2
    victim = tiles[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    second = run_limited([*args, "--overwrite"], out)
    assert second.returncode == 0, second.stderr
    warnings_ = [x for x in second.stderr.splitlines() if x.startswith("terrasam: warning")]
    assert len(warnings_) == 1 and "recomput" in warnings_[0], second.stderr
    assert "Traceback" not in second.stderr
    assert len(gpd.read_file(out / "o.gpkg")) == N
    assert listing(out) == ["o.gpkg"]


def test_killed_run_leaves_only_hidden_temporaries_that_the_next_run_removes(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    raster = corpus.geotiff(inp / "in.tif")
    args = ["segment", raster, "-o", out / "o.gpkg", "--label-raster", out / "labels.tif",
            *FAST, "--scale", "none", "--workdir", tmp_path / "work"]
    killed = run_limited(args, out, env={"CORPUS_KILL_AT_CLOSE": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert listing(out) and all(n.startswith(".") for n in listing(out)), listing(out)
    again = run_limited(args, out)
    assert again.returncode == 0, again.stderr
    assert listing(out) == ["labels.tif", "o.gpkg"]
    assert len(gpd.read_file(out / "o.gpkg")) == N


def test_a_read_error_under_stats_is_one_sentence_and_leaves_no_output(tmp_path, monkeypatch):
    # band 2 (only --stats reads it) has a corrupt block; the model reads band 1 alone
    src = corpus.geotiff(tmp_path / "whole.tif", interleave="band")
    bad = corpus.corrupt_tile(src, tmp_path / "bad.tif", tile=5)  # 4 blocks a band
    out = tmp_path / "out"
    out.mkdir()
    oracle = OracleAdapter(background=corpus.BLACK)
    monkeypatch.setattr(ModelRef, "for_run", classmethod(lambda cls, *a, **k: cls.of(oracle)))
    result = CliRunner().invoke(main, [*seg(Ctx(tmp_path, out, None), bad), "--bands", "1",
                                       "--stats", "mean", "--stats-bands", "2"])
    assert result.exit_code == 1, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith(
        f"terrasam: error: cannot read {bad} for --stats: bad.tif, band 2: "), lines
    assert "exactextract" not in lines[0].lower() and lines[0].endswith(".")
    # no output and no temporaries: only the work directory, to resume from
    names = listing(out)
    assert "o.gpkg.terrasam-work/" in names, names
    assert all(n.startswith("o.gpkg.terrasam-work/") for n in names), names
