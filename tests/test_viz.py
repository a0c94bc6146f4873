"""PNG previews and HTML maps: sizes, colours at truth objects, placement, offline rendering."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from PIL import Image
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds
from shapely.geometry import box, shape

from terrasam import viz
from terrasam.cli import main
from terrasam.errors import TerrasamError
from terrasam.raster import open_raster

BACKGROUND = (60, 120, 60)
# (x0, y0, x1, y1) in pixels (x1, y1 exclusive), flat colour
OBJECTS = [
    (20, 30, 80, 90, (200, 50, 50)),
    (120, 40, 180, 150, (50, 50, 200)),
    (200, 100, 240, 130, (230, 230, 60)),
]
NODATA_COL = 270  # columns from here on are nodata (0)
W, H = 300, 200
# far from the UTM zone's central meridian: grid north is ~4 degrees off true north, so an
# overlay that is not really warped to web mercator misses the corners of the objects
TRANSFORM = from_origin(800000.0, 6500000.0, 2.0, 2.0)
CRS = "EPSG:32633"


def make_raster(path: Path, width=W, height=H, transform=TRANSFORM, crs=CRS) -> Path:
    img = np.empty((3, height, width), np.uint8)
    img[:] = np.array(BACKGROUND, np.uint8)[:, None, None]
    for x0, y0, x1, y1, colour in OBJECTS:
        img[:, y0:y1, x0:x1] = np.array(colour, np.uint8)[:, None, None]
    img[:, :, NODATA_COL:] = 0
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3,
                       dtype="uint8", crs=crs, transform=transform, nodata=0) as ds:
        ds.write(img)
    return path


def truth_frame(transform=TRANSFORM, crs=CRS) -> gpd.GeoDataFrame:
    geoms = [box(*(transform @ (x0, y1)), *(transform @ (x1, y0)))
             for x0, y0, x1, y1, _ in OBJECTS]
    return gpd.GeoDataFrame(
        {"id": [11, 12, 13], "model": ["sam-vit-b"] * 3, "area_m2": [g.area for g in geoms],
         "predicted_iou": [0.91, 0.95, 0.88]},
        geometry=geoms, crs=crs)


@pytest.fixture
def scene(tmp_path):
    return make_raster(tmp_path / "scene.tif"), truth_frame()


def _centre(obj):
    x0, y0, x1, y1, _ = obj
    return (x0 + x1) // 2, (y0 + y1) // 2


def _layout(width, height):
    factor = max(1, viz._MIN_PREVIEW // max(width, height))
    band = viz.header_height(width * factor)
    return factor, band


def _expected_fill(image_rgb, obj_id):
    colour = viz.object_colours([obj_id])[0].astype(float)
    return (1 - viz.FILL_ALPHA) * np.asarray(image_rgb, float) + viz.FILL_ALPHA * colour


def test_object_colours_deterministic_and_distinct():
    a = viz.object_colours([1, 2, 3, 4, 5, 6])
    assert a.dtype == np.uint8 and a.shape == (6, 3)
    np.testing.assert_array_equal(a, viz.object_colours([1, 2, 3, 4, 5, 6]))
    np.testing.assert_array_equal(a[2], viz.object_colours([3])[0])
    dists = np.abs(a[:, None, :].astype(int) - a[None, :, :].astype(int)).sum(-1)
    assert dists[~np.eye(6, dtype=bool)].min() > 60


def test_preview_size_colours_nodata(scene, tmp_path):
    raster, gdf = scene
    out = viz.write_preview(raster, gdf, tmp_path / "p.png", scale="none")
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    factor, band = _layout(W, H)
    assert factor == 2
    assert img.shape == (H * factor + 2 * band, W * factor, 3)
    pic = img[band:band + H * factor]
    for obj, obj_id in zip(OBJECTS, gdf["id"]):
        cx, cy = _centre(obj)
        got = pic[cy * factor, cx * factor]
        np.testing.assert_allclose(got, _expected_fill(obj[4], obj_id), atol=1.5)
        # outline: the object's first row is drawn in its pure colour
        x0, y0 = obj[0], obj[1]
        edge = pic[y0 * factor, (x0 + 5) * factor]
        np.testing.assert_array_equal(edge, viz.object_colours([obj_id])[0])
    np.testing.assert_array_equal(pic[5, 5], BACKGROUND)  # no object: image untouched
    np.testing.assert_array_equal(pic[100 * factor, (NODATA_COL + 10) * factor], viz.NODATA_RGB)


def test_preview_title_and_scale_bar(scene, tmp_path):
    raster, gdf = scene
    out = viz.write_preview(raster, gdf, tmp_path / "p.png", scale="none")
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    factor, band = _layout(W, H)
    title, foot = img[:band], img[band + H * factor:]
    assert (title.sum(-1) < 300).sum() > 100  # dark text pixels in the title band
    # Scale bar: 2 m source pixels -> 1 m display pixels; 600 px wide -> target 150 m -> 100 m
    # bar = 100 px, its left half black.
    dark = (foot.sum(-1) < 100)
    row = dark[foot.shape[0] // 2]
    runs = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
    first_run = runs[1] - runs[0]
    assert abs(first_run - 50) <= 2
    bar_rows = np.flatnonzero(dark[:, runs[0] + 10])
    assert 3 <= len(bar_rows) < band


@pytest.fixture
def seen(monkeypatch):
    """The keyword arguments (title, footer) of the last compose_preview call."""
    kwargs = {}
    real = viz.compose_preview

    def spy(*args, **kw):
        kwargs.update(kw)
        return real(*args, **kw)

    monkeypatch.setattr(viz, "compose_preview", spy)
    return kwargs


def test_preview_title_counts_and_coverage(scene, tmp_path, seen):
    raster, gdf = scene
    viz.write_preview(raster, gdf, tmp_path / "p.png", scale="none")
    obj_px = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1, _ in OBJECTS)
    coverage = 100 * obj_px / (NODATA_COL * H)
    assert seen["footer"] == "EPSG:32633"
    assert seen["title"] == (f"scene.tif · model sam-vit-b · 3 objects · "
                             f"{coverage:.1f}% of valid pixels covered")


def test_preview_reprojects_vectors(scene, tmp_path):
    raster, gdf = scene
    a = np.asarray(Image.open(viz.write_preview(raster, gdf, tmp_path / "a.png", scale="none")))
    b = np.asarray(Image.open(viz.write_preview(raster, gdf.to_crs(4326), tmp_path / "b.png",
                                                scale="none")))
    assert a.shape == b.shape
    factor, band = _layout(W, H)
    for obj, obj_id in zip(OBJECTS, gdf["id"]):
        cx, cy = _centre(obj)
        np.testing.assert_allclose(b[band + cy * factor, cx * factor],
                                   _expected_fill(obj[4], obj_id), atol=1.5)
    # polygon edges may move by a sub-pixel after the round trip, nothing more
    pa, pb = a[band:-band].astype(int), b[band:-band].astype(int)
    assert (np.abs(pa - pb).sum(-1) > 0).mean() < 0.01


def test_preview_uses_overview_only(tmp_path):
    big = make_raster(tmp_path / "big.tif", width=1500, height=1000)
    calls = []

    class Spy:
        def __init__(self, reader):
            self._r = reader

        def __getattr__(self, name):
            calls.append(name)
            return getattr(self._r, name)

    reader = open_raster(big, scale="none")
    out = viz.write_preview(Spy(reader), truth_frame(), tmp_path / "p.png", max_size=700)
    assert "read" not in calls and "read_overview" in calls
    img = Image.open(out)
    assert img.width == 700
    assert img.height == 467 + 2 * viz.header_height(700)


def test_preview_geographic_raster(tmp_path):
    tr = from_origin(10.0, 60.3, 0.001, 0.001)
    raster = make_raster(tmp_path / "geo.tif", transform=tr, crs="EPSG:4326")
    mpp = viz.metres_per_pixel(tr, rasterio.crs.CRS.from_epsg(4326), W, H)
    assert mpp == pytest.approx(55.5, rel=0.01)  # 0.001 deg of longitude at 60.2 N
    gdf = truth_frame(tr, "EPSG:4326").to_crs(3857)
    out = viz.write_preview(raster, gdf, tmp_path / "p.png", scale="none")
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    factor, band = _layout(W, H)
    cx, cy = _centre(OBJECTS[1])
    np.testing.assert_allclose(img[band + cy * factor, cx * factor],
                               _expected_fill(OBJECTS[1][4], 12), atol=1.5)


def test_preview_and_map_without_objects_or_vector_crs(scene, tmp_path, seen):
    raster, gdf = scene
    empty = gdf.iloc[:0]
    out = viz.write_preview(raster, empty, tmp_path / "e.png", scale="none")
    assert seen["title"].endswith("0 objects · 0.0% of valid pixels covered")
    factor, band = _layout(W, H)
    img = np.asarray(Image.open(out).convert("RGB"))
    cx, cy = _centre(OBJECTS[0])
    np.testing.assert_array_equal(img[band + cy * factor, cx * factor], OBJECTS[0][4])
    html = viz.write_map(raster, empty, tmp_path / "e.html").read_text()
    assert "L.imageOverlay(" in html and "geo_json_" not in html

    # vectors without a CRS are taken to be in the raster's CRS
    nocrs = gpd.GeoDataFrame(gdf.drop(columns="geometry"), geometry=list(gdf.geometry))
    assert nocrs.crs is None
    img = np.asarray(Image.open(viz.write_preview(raster, nocrs, tmp_path / "n.png",
                                                  scale="none")).convert("RGB"))
    np.testing.assert_allclose(img[band + cy * factor, cx * factor],
                               _expected_fill(OBJECTS[0][4], 11), atol=1.5)
    _, _, features = _parse_map(viz.write_map(raster, nocrs, tmp_path / "n.html").read_text())
    lon, lat = features["features"][0]["geometry"]["coordinates"][0][0]
    assert 15 < lon < 25 and 55 < lat < 62


def test_preview_refuses_existing_and_bad_suffix(scene, tmp_path):
    raster, gdf = scene
    out = tmp_path / "p.png"
    out.write_bytes(b"keep")
    with pytest.raises(TerrasamError, match="exists"):
        viz.write_preview(raster, gdf, out)
    assert out.read_bytes() == b"keep"
    viz.write_preview(raster, gdf, out, overwrite=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TerrasamError, match=r"\.png"):
        viz.write_preview(raster, gdf, tmp_path / "p.jpg")
    with pytest.raises(TerrasamError, match="does not exist"):
        viz.write_preview(raster, tmp_path / "missing.gpkg", tmp_path / "q.png")
    (tmp_path / "bad.gpkg").write_text("not a geopackage")
    with pytest.raises(TerrasamError, match="bad.gpkg is not a readable vector file"):
        viz.write_preview(raster, tmp_path / "bad.gpkg", tmp_path / "q.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gpkg", "p.png", "scene.tif"]


# ---------------------------------------------------------------- HTML map


def _parse_map(html: str):
    m = re.search(r"L\.imageOverlay\(\s*\"(data:image/png;base64,[^\"]+)\",\s*(\[\[[^\]]*\],\s*"
                  r"\[[^\]]*\]\])", html)
    assert m, "no image overlay in the page"
    overlay = Image.open(io.BytesIO(base64.b64decode(m.group(1).split(",", 1)[1])))
    bounds = json.loads(m.group(2))
    start = re.search(r"geo_json_\w+_add\(\s*\{", html)
    assert start, "no GeoJSON layer in the page"
    features, _ = json.JSONDecoder().raw_decode(html, start.end() - 1)
    return np.asarray(overlay), bounds, features


def _lonlat_to_overlay_px(lon, lat, bounds, shape):
    (lat0, lon0), (lat1, lon1) = bounds
    xs, ys = warp_transform("EPSG:4326", "EPSG:3857", [lon0, lon1, lon], [lat1, lat0, lat])
    col = (xs[2] - xs[0]) / (xs[1] - xs[0]) * shape[1]
    row = (ys[2] - ys[0]) / (ys[1] - ys[0]) * shape[0]
    return int(col), int(row)


def test_map_holds_vectors_and_overlay(scene, tmp_path):
    raster, gdf = scene
    out = viz.write_map(raster, gdf, tmp_path / "m.html", scale="none")
    html = out.read_text()
    assert not re.search(r"<(script|link)[^>]+(src|href)=\"https?:", html), "page not offline"
    assert "Leaflet 1.9" in html  # inlined, not linked
    overlay, bounds, features = _parse_map(html)

    west, south, east, north = transform_bounds(CRS, "EPSG:4326", *(TRANSFORM @ (0, H)),
                                                *(TRANSFORM @ (W, 0)))
    # the warped overlay covers the raster (plus at most a pixel of the mercator grid)
    (lat0, lon0), (lat1, lon1) = bounds
    px_deg = (lon1 - lon0) / overlay.shape[1]
    assert lon0 == pytest.approx(west, abs=2 * px_deg) and lon1 >= east - 1e-9
    assert lat1 == pytest.approx(north, abs=2 * px_deg) and lat0 <= south + 1e-9
    assert overlay.shape[2] == 4 and max(overlay.shape[:2]) == W

    assert [f["properties"]["id"] for f in features["features"]] == [11, 12, 13]
    assert features["features"][1]["properties"]["model"] == "sam-vit-b"
    assert features["features"][1]["properties"]["predicted_iou"] == pytest.approx(0.95)
    truth4326 = gdf.to_crs(4326)
    for feat, truth in zip(features["features"], truth4326.geometry):
        geom = shape(feat["geometry"])
        assert geom.intersection(truth).area / geom.union(truth).area > 0.999
    # the overlay pixels just inside each object's corners have the object's colour
    for x0, y0, x1, y1, colour in OBJECTS:
        for px, py in ((x0 + 3, y0 + 3), (x1 - 3, y0 + 3), (x0 + 3, y1 - 3), (x1 - 3, y1 - 3)):
            lon, lat = warp_transform(CRS, "EPSG:4326", *[[v] for v in TRANSFORM @ (px, py)])
            col, row = _lonlat_to_overlay_px(lon[0], lat[0], bounds, overlay.shape)
            np.testing.assert_array_equal(overlay[row, col], (*colour, 255))
    # nodata is transparent
    lon, lat = warp_transform(CRS, "EPSG:4326", *[[v] for v in TRANSFORM @ (285, 100)])
    col, row = _lonlat_to_overlay_px(lon[0], lat[0], bounds, overlay.shape)
    assert overlay[row, col, 3] == 0


def test_map_basemaps_and_errors(scene, tmp_path):
    raster, gdf = scene
    html = viz.write_map(raster, gdf, tmp_path / "m.html", basemap="esri").read_text()
    for name in ("OpenStreetMap", "Esri World Imagery", "No base map", "objects (3)"):
        assert name in html
    assert "L.control.layers" in html
    assert "World_Imagery/MapServer/tile/{z}/{y}/{x}" in html
    with pytest.raises(TerrasamError, match="base map"):
        viz.write_map(raster, gdf, tmp_path / "n.html", basemap="google")
    with pytest.raises(TerrasamError, match="exists"):
        viz.write_map(raster, gdf, tmp_path / "m.html")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(tmp_path / "nocrs.tif", "w", driver="GTiff", width=8, height=8,
                           count=1, dtype="uint8") as ds:
            ds.write(np.ones((1, 8, 8), np.uint8))
    with pytest.raises(TerrasamError, match="no CRS"):
        viz.write_map(tmp_path / "nocrs.tif", gdf, tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


def test_cli_preview_and_map(scene, tmp_path):
    raster, gdf = scene
    vectors = tmp_path / "objects.gpkg"
    gdf.to_file(vectors, engine="pyogrio")
    runner = CliRunner()
    res = runner.invoke(main, ["preview", str(raster), str(vectors), "-o",
                               str(tmp_path / "p.png"), "--scale", "none", "--max-size", "150"])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "p.png").width == 600  # 150 px overview, enlarged 4x
    res = runner.invoke(main, ["map", str(raster), str(vectors), "-o", str(tmp_path / "m.html"),
                               "--basemap", "none", "--bands", "3,2,1"])
    assert res.exit_code == 0, res.output
    assert len(_parse_map((tmp_path / "m.html").read_text())[2]["features"]) == 3
    res = runner.invoke(main, ["map", str(raster), str(vectors), "-o", str(tmp_path / "m.html")])
    assert res.exit_code == 1
    assert "terrasam: error:" in res.output and "exists" in res.output


# ---------------------------------------------------------------- browser


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# --dump-dom and --screenshot give different viewports (800x457 vs 800x600 here): pin the page
# to a size that fits both so the probed map positions are the screenshot's.
HOOK = """<style>html, body { width: 800px !important; height: 420px !important; }</style>
<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message)); });
</script>"""
PROBE = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  var map = window[%(map)s], pts = %(points)s, rect = map.getContainer().getBoundingClientRect();
  var out = pts.map(function (p) { var c = map.latLngToContainerPoint(p);
    return [c.x + rect.left, c.y + rect.top]; });
  document.body.setAttribute('data-points', JSON.stringify(out));
  document.body.setAttribute('data-errors', JSON.stringify(window.__errors));
}, 300); });
</script>"""


def _chromium(args, tmp_path, tag):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--no-first-run",
           "--disable-quic", "--disable-sync", f"--user-data-dir={tmp_path / ('ud-' + tag)}",
           "--host-resolver-rules=MAP * ~NOTFOUND",  # the page must work with no network
           "--window-size=800,600", "--force-device-scale-factor=1", "--hide-scrollbars",
           "--virtual-time-budget=4000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_map_renders_offline_in_chromium(scene, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    raster, gdf = scene
    html = viz.write_map(raster, gdf, tmp_path / "m.html", basemap="none", scale="none"
                         ).read_text()
    map_name = re.search(r"var (map_\w+) = L\.map\(", html).group(1)
    truth = gdf.to_crs(4326)
    inside = [[g.centroid.y, g.centroid.x] for g in truth.geometry]
    lon, lat = warp_transform(CRS, "EPSG:4326", *[[v] for v in TRANSFORM @ (100, 180)])
    points = inside + [[lat[0], lon[0]]]  # last point: raster background, no object
    html = html.replace("<head>", "<head>" + HOOK, 1)
    html = html.replace("</html>", PROBE % {"map": json.dumps(map_name),
                                            "points": json.dumps(points)} + "</html>")
    page = tmp_path / "probe.html"
    page.write_text(html)

    dom = _chromium(["--dump-dom", page.as_uri()], tmp_path, "dom").stdout
    assert 'data-errors="[]"' in dom, "JavaScript errors: " + dom[:2000]
    assert re.search(r'<img[^>]+leaflet-image-layer', dom), "image overlay not rendered"
    assert len(re.findall(r'<path[^>]+leaflet-interactive', dom)) == 3, "vectors not rendered"
    xy = json.loads(re.search(r'data-points="([^"]+)"', dom).group(1).replace("&quot;", '"'))

    shot = tmp_path / "shot.png"
    _chromium([f"--screenshot={shot}", page.as_uri()], tmp_path, "shot")
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (600, 800)
    for (x, y), obj, obj_id in zip(xy, OBJECTS, gdf["id"]):
        np.testing.assert_allclose(img[int(y), int(x)], _expected_fill(obj[4], obj_id), atol=6)
    x, y = xy[-1]
    np.testing.assert_allclose(img[int(y), int(x)], BACKGROUND, atol=3)


# ---------------------------------------------------------------- prompt marks (issue 14)


def prompt_frame() -> gpd.GeoDataFrame:
    """Rows as `terrasam prompt` writes them: a point prompt in WGS 84 and a box in UTM."""
    gdf = truth_frame().iloc[:2].copy()
    cx, cy = _centre(OBJECTS[0])
    px, py = TRANSFORM @ (cx + 0.5, cy + 0.5)
    (lon,), (lat,) = warp_transform(CRS, "EPSG:4326", [px], [py])
    bx0, by0, bx1, by1, _ = OBJECTS[1]
    (x0, y1), (x1, y0) = TRANSFORM @ (bx0 - 5, by0 - 5), TRANSFORM @ (bx1 + 5, by1 + 5)
    gdf["prompt_id"] = [1, 2]
    gdf["prompt_type"] = ["point", "box"]
    gdf["prompt"] = [f"POINT ({lon} {lat})", box(x0, y0, x1, y1).wkt]
    gdf["prompt_crs"] = ["EPSG:4326", CRS]
    return gdf


def test_preview_marks_point_and_box_prompts(scene, tmp_path):
    raster, _ = scene
    out = viz.write_preview(raster, prompt_frame(), tmp_path / "p.png", scale="none")
    pic_all = np.asarray(Image.open(out).convert("RGB")).astype(int)
    factor, band = _layout(W, H)
    pic = pic_all[band:band + H * factor]
    cx, cy = _centre(OBJECTS[0])
    np.testing.assert_array_equal(pic[cy * factor + 1, cx * factor + 1], viz.MARK_RGB)
    # the box's outline, 5 px outside object 2, on its left edge half way down
    bx0, by0, bx1, by1, _ = OBJECTS[1]
    row = (by0 + by1) // 2 * factor
    edge = pic[row, (bx0 - 5) * factor - 1:(bx0 - 5) * factor + 2]
    assert any((px == viz.MARK_RGB).all() for px in edge), edge
    assert not (pic[row, (bx0 - 12) * factor] == viz.MARK_RGB).all()  # plain image beside it
    # a segment output (no prompt columns) has no marks
    plain = viz.write_preview(raster, truth_frame(), tmp_path / "q.png", scale="none")
    plain_pic = np.asarray(Image.open(plain).convert("RGB")).astype(int)[band:band + H * factor]
    assert not (plain_pic == np.array(viz.MARK_RGB)).all(axis=-1).any()


def test_map_marks_point_and_box_prompts(scene, tmp_path):
    raster, _ = scene
    gdf = prompt_frame()
    html = viz.write_map(raster, gdf, tmp_path / "m.html").read_text()
    assert "prompts (2)" in html
    assert html.count("L.circleMarker(") == 1 and "point prompt" in html
    lon, lat = (float(v) for v in gdf.prompt.iloc[0][7:-1].split())
    marker = re.search(r"L\.circleMarker\(\s*\[([-\d.]+),\s*([-\d.]+)\]", html)
    assert float(marker.group(1)) == pytest.approx(lat) and \
        float(marker.group(2)) == pytest.approx(lon)
    assert "L.polygon(" in html and "box prompt" in html
    plain = viz.write_map(raster, truth_frame(), tmp_path / "n.html").read_text()
    assert "L.circleMarker(" not in plain and "prompts (" not in plain


def test_titles_say_1_object(scene, tmp_path):
    raster, gdf = scene
    one = gdf.iloc[:1]
    html = viz.write_map(raster, one, tmp_path / "m.html").read_text()
    assert "sam-vit-b · 1 object</div>" in html and "1 objects" not in html
