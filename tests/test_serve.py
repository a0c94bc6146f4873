"""`terrasam serve`: the HTTP API over real sockets, the page in headless Chromium, the CLI.

The server runs in a thread on 127.0.0.1 with a free port; the model is the oracle (exact
answers) or a tiny random checkpoint. Nothing touches the network.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from pyproj import Transformer

import synth
from oracle import OracleAdapter

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from terrasam.serve.app import MAX_BODY, Server, create_app, is_loopback  # noqa: E402
from terrasam.serve.cache import LRUCache  # noqa: E402
from terrasam.serve.session import Session  # noqa: E402

SIZE = 256
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    # 10 px nodata frame; objects 1..5 of synth.default_shapes
    return synth.make_scene(SIZE, SIZE, path=tmp_path_factory.mktemp("serve") / "scene.tif",
                            nodata_border=10)


def lonlat(scene, i):
    """(lon, lat) of a pixel centre well inside object i."""
    c = scene.pixel_polygons[i].buffer(-1.5).representative_point()
    x, y = scene.transform @ (np.floor(c.x) + 0.5, np.floor(c.y) + 0.5)
    return Transformer.from_crs(scene.crs, synth.WGS84, always_xy=True).transform(x, y)


def bounds_of(info) -> dict:
    (s, w), (n, e) = info["bounds"]
    return {"west": w, "south": s, "east": e, "north": n}


class Client:
    """A tiny HTTP client (urllib) for one server."""

    def __init__(self, url: str, token: str | None = None):
        self.url = url.rstrip("/")
        self.token = token

    def request(self, method, path, body=None, headers=None, raw: bytes | None = None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        h = {"Content-Type": "application/json"}
        if self.token:
            h["X-Terrasam-Token"] = self.token
        h.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, content, hdrs = r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            status, content, hdrs = e.code, e.read(), dict(e.headers)
        if hdrs.get("content-type", "").startswith("application/json"):
            return status, json.loads(content), hdrs
        return status, content, hdrs

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def raw_path(self, path: str):
        """GET a path exactly as written (no client-side normalisation)."""
        host, port = self.url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        out = r.status, r.read(), dict(r.getheaders())
        conn.close()
        return out


@contextlib.contextmanager
def running(session: Session):
    app = create_app(session)
    server = Server(app, "127.0.0.1", 0).start()
    try:
        client = Client(server.url)
        client.token = client.get("/api/info")[1]["token"]
        client.server = server
        yield client
    finally:
        server.stop()
        session.close()


@pytest.fixture
def oracle_server(scene):
    session = Session(scene.path, adapter=OracleAdapter(background=scene.background),
                      amg={"points_per_side": 8})
    with running(session) as client:
        client.session = session
        yield client


def click(client, *points, box=None, expect=200):
    body = {"points": [{"lon": p[0], "lat": p[1], "label": p[2] if len(p) > 2 else 1}
                       for p in points], "box": box}
    status, out, _ = client.post("/api/segment", body)
    assert status == expect, out
    return out


def same(a, b, tol=1e-3) -> bool:
    """Equal up to ``tol`` map units (a polygon shown in EPSG:4326 and brought back)."""
    return (shapely.hausdorff_distance(a, b) < tol
            and shapely.area(shapely.symmetric_difference(a, b)) < tol * shapely.length(b))


def to_raster_crs(scene, feature):
    t = Transformer.from_crs(synth.WGS84, scene.crs, always_xy=True)
    geom = shapely.geometry.shape(feature["geometry"])
    return shapely.transform(geom, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))


# --------------------------------------------------------------------------- the API


def test_page_info_and_headers(oracle_server, scene):
    status, html, headers = oracle_server.get("/")
    assert status == 200 and b"/static/leaflet.js" in html and b"/static/app.js" in html
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    status, js, _ = oracle_server.get("/static/leaflet.js")
    assert status == 200 and b"Leaflet" in js[:2000]
    status, css, _ = oracle_server.get("/static/leaflet.css")
    assert status == 200 and b"url(images/" not in css  # images inlined: no other request
    info = oracle_server.get("/api/info")[1]
    assert info["crs"] == "EPSG:32614" and (info["width"], info["height"]) == (SIZE, SIZE)
    assert info["basemap"] == "none" and info["text"] is False and info["model"] == "oracle"
    lon, lat = lonlat(scene, 1)
    (s, w), (n, e) = info["bounds"]
    assert w < lon < e and s < lat < n


def test_click_keep_export_is_exact_and_matches_prompt(oracle_server, scene, tmp_path):
    from terrasam import prompt
    from terrasam.io import read_provenance

    lon, lat = lonlat(scene, 1)
    out = click(oracle_server, (lon, lat))
    feat = out["feature"]
    assert feat["properties"]["prompt_type"] == "point" and feat["properties"]["score"] > 0.9
    assert same(to_raster_crs(scene, feat), scene.polygons[1])
    status, kept, _ = oracle_server.post("/api/objects", {"candidates": [feat["id"]]})
    assert status == 200 and kept["features"][0]["properties"]["object"] == 1
    assert len(oracle_server.get("/api/objects")[1]["features"]) == 1

    status, data, headers = oracle_server.get("/api/export?format=gpkg")
    assert status == 200 and headers["content-disposition"].endswith('scene-objects.gpkg"')
    path = tmp_path / "objects.gpkg"
    path.write_bytes(data)
    gdf = gpd.read_file(path)
    assert gdf.crs.to_epsg() == 32614 and len(gdf) == 1
    assert gdf.geometry[0].equals(scene.polygons[1])  # exact pixel edges, raster CRS
    # the same attributes and geometry as `terrasam prompt` with the same click
    ref = prompt(scene.path, tmp_path / "ref.gpkg", points=[(lon, lat)], crs="EPSG:4326",
                 adapter=OracleAdapter(background=scene.background))
    assert list(gdf.columns) == list(ref.columns)
    assert gdf.geometry[0].equals(ref.geometry[0])
    for col in ("prompt_type", "prompt", "prompt_crs", "model", "area_m2", "perimeter_m"):
        assert gdf[col][0] == ref[col][0], col
    prov = read_provenance(path)
    assert prov["model"] == "oracle" and prov["input"]["name"] == "scene.tif"
    assert prov["parameters"]["command"] == "serve" and prov["output"]["features"] == 1

    status, data, _ = oracle_server.get("/api/export?format=geojson")
    doc = json.loads(data)
    # RFC 7946: WGS 84 lon/lat, no "crs" member; the source CRS is in the provenance
    assert "crs" not in doc and len(doc["features"]) == 1
    assert shapely.geometry.shape(doc["features"][0]["geometry"]).centroid.distance(
        shapely.Point(lon, lat)) < 1e-3
    assert "32614" in doc["terrasam"]["output"]["source_crs_wkt"]
    assert doc["terrasam"]["parameters"]["command"] == "serve"

    status, _, _ = oracle_server.request("DELETE", "/api/objects/1")
    assert status == 200 and oracle_server.get("/api/objects")[1]["features"] == []


def test_prompts_refine_one_object(oracle_server, scene):
    a, b = lonlat(scene, 1), lonlat(scene, 5)
    both = to_raster_crs(scene, click(oracle_server, a, b)["feature"])
    assert same(both, shapely.union(scene.polygons[1], scene.polygons[5]))
    negative = click(oracle_server, a, b, (*b, 0))["feature"]
    assert negative["properties"]["prompt_type"] == "points"
    assert same(to_raster_crs(scene, negative), scene.polygons[1])
    # a box around the diamond (object 4)
    t = Transformer.from_crs(scene.crs, synth.WGS84, always_xy=True)
    x0, y0, x1, y1 = scene.polygons[4].bounds
    (w, e), (s, n) = t.transform([x0, x1], [y0, y1])
    boxed = click(oracle_server, box={"west": w, "south": s, "east": e, "north": n})["feature"]
    assert boxed["properties"]["prompt_type"] == "box"
    assert same(to_raster_crs(scene, boxed), scene.polygons[4])


def test_errors_are_clear_json(oracle_server, scene):
    c = oracle_server
    out = click(c, (10.0, 10.0), expect=422)
    assert out["code"] == "outside" and "outside the raster" in out["error"]
    border = scene.transform @ (3.5, 3.5)
    nodata = Transformer.from_crs(scene.crs, synth.WGS84, always_xy=True).transform(*border)
    assert click(c, nodata, expect=422)["code"] == "nodata"
    lon, lat = lonlat(scene, 1)
    assert "negative" in click(c, (lon, lat, 0), expect=422)["error"]
    assert click(c, expect=422)["code"] == "empty"
    for body in ({"points": [{"lon": 500, "lat": lat}]},
                 {"points": [{"lon": lon, "lat": lat, "label": 2}]},
                 {"points": [{"lon": lon, "lat": lat}], "path": "/etc/passwd"},
                 {"points": [{"lon": lon, "lat": lat}] * 65},
                 {"box": {"west": 1, "south": 1, "east": 0, "north": 2}}):
        status, out, _ = c.post("/api/segment", body)
        assert status == 422 and out["code"] == "invalid_request", body
    status, out, _ = c.post("/api/segment", raw=b'{"points": [{"lon": NaN, "lat": 1}]}')
    assert status == 422
    status, out, _ = c.post("/api/segment", raw=b"x" * (MAX_BODY + 1))
    assert status == 413 and out["code"] == "too_large"
    status, out, _ = c.post("/api/segment", {"points": [{"lon": lon, "lat": lat}]},
                            headers={"X-Terrasam-Token": "wrong"})
    assert status == 403 and out["code"] == "token"
    status, out, _ = c.get("/api/info", headers={"Host": "evil.example:80"})
    assert status == 403 and out["code"] == "host"
    status, out, _ = c.post("/api/objects", {"candidates": [999]})
    assert status == 404 and out["code"] == "unknown"
    status, out, _ = c.get("/api/export?format=gpkg")
    assert status == 422 and "no object" in out["error"]
    status, out, _ = c.post("/api/text", {"text": "pool", "bounds": bounds_of(
        c.get("/api/info")[1])})
    assert status == 422 and out["code"] == "no_text"
    status, out, _ = c.post("/api/everything", {"bounds": {"west": 10, "south": 10,
                                                           "east": 11, "north": 11}})
    assert status == 422 and out["code"] == "outside"


def test_no_path_from_a_request_reaches_the_file_system(oracle_server):
    c = oracle_server
    for path in ("/static/../../../../etc/passwd", "/static/..%2f..%2f..%2fetc%2fpasswd",
                 "/static/%2e%2e/%2e%2e/etc/passwd", "/static/app.py", "/static/",
                 "/../../etc/passwd", "/static/..\\..\\session.py", "/api/../../etc/passwd",
                 "/tiles/../../../etc/passwd"):
        status, body, _ = c.raw_path(path)
        assert status in (400, 404, 422), path
        assert b"root:" not in body and b"import" not in body, path
    for path in ("/api/export?format=../../etc/passwd", "/api/export?format=shp",
                 "/tiles/1/5/0.png", "/tiles/99/0/0.png", "/tiles/-1/0/0.png",
                 "/tiles/0/0/0.jpg"):
        status, body, _ = c.get(path)
        assert status in (404, 422), path


def test_tiles_show_the_scaled_raster(oracle_server, scene):
    from PIL import Image

    from terrasam.raster import open_raster

    info = oracle_server.get("/api/info")[1]
    z = info["native_zoom"]
    lon, lat = lonlat(scene, 2)
    mx, my = Transformer.from_crs(synth.WGS84, "EPSG:3857", always_xy=True).transform(lon, lat)
    half = 20037508.342789244
    fx, fy = (mx + half) / (2 * half) * 2**z, (half - my) / (2 * half) * 2**z
    status, png, headers = oracle_server.get(f"/tiles/{z}/{int(fx)}/{int(fy)}.png")
    assert status == 200 and headers["content-type"] == "image/png"
    rgba = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))
    px, py = int((fx % 1) * 256), int((fy % 1) * 256)
    # the same 8-bit value the model sees (global scaling), not the file's raw value
    col, row = ~scene.transform @ Transformer.from_crs(
        synth.WGS84, scene.crs, always_xy=True).transform(lon, lat)
    with open_raster(scene.path) as reader:
        rgb, _ = reader.read((int(col), int(row), 1, 1))
    assert tuple(rgba[py, px]) == (*rgb[0, 0], 255)
    assert (rgba[..., 3] == 0).any() or z < 18  # the nodata frame or the raster's edge
    status, png, _ = oracle_server.get("/tiles/3/0/0.png")  # far away: transparent
    assert status == 200 and not np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))[
        ..., 3].any()


@pytest.mark.parametrize("rotated", [False, True])
def test_tile_mosaic_is_the_warped_raster(tmp_path, rotated):
    """Tiles put together are the whole raster warped to web mercator: no seams, no shift."""
    from affine import Affine
    from PIL import Image
    from rasterio.warp import Resampling, reproject

    from terrasam.raster import open_raster
    from terrasam.serve.tiles import MERC_HALF, TILE

    sc = synth.make_scene(SIZE, SIZE, nodata_border=10, path=tmp_path / "s.tif",
                          transform=synth.rotated_transform(30) if rotated else None)
    session = Session(sc.path, adapter=OracleAdapter(background=sc.background), prefetch=False)
    try:
        with open_raster(sc.path) as reader:
            rgb, valid = reader.read((0, 0, SIZE, SIZE))
        src = np.concatenate([rgb.transpose(2, 0, 1), (valid * np.uint8(255))[None]])
        for z in (session.tiles.native_zoom, session.tiles.native_zoom + 1):
            n, (left, bottom, right, top) = 2**z, session.tiles.merc_bounds
            x0, x1 = (int((v + MERC_HALF) / (2 * MERC_HALF) * n) for v in (left, right))
            y0, y1 = (int((MERC_HALF - v) / (2 * MERC_HALF) * n) for v in (top, bottom))
            mosaic = np.zeros(((y1 - y0 + 1) * TILE, (x1 - x0 + 1) * TILE, 4), np.uint8)
            for x in range(x0, x1 + 1):
                for y in range(y0, y1 + 1):
                    png = session.tiles.render(z, x, y)
                    if png:
                        mosaic[(y - y0) * TILE:(y - y0 + 1) * TILE,
                               (x - x0) * TILE:(x - x0 + 1) * TILE] = np.asarray(
                            Image.open(io.BytesIO(png)).convert("RGBA"))
            span = 2 * MERC_HALF / n
            expected = np.zeros((4, *mosaic.shape[:2]), np.uint8)
            reproject(src, expected, src_transform=sc.transform, src_crs=sc.crs,
                      dst_transform=Affine(span / TILE, 0, -MERC_HALF + x0 * span, 0,
                                           -span / TILE, MERC_HALF - y0 * span),
                      dst_crs="EPSG:3857", resampling=Resampling.nearest, src_nodata=None,
                      dst_nodata=0)
            mismatch = (expected.transpose(1, 2, 0) != mosaic).any(axis=-1)
            assert (expected[3] > 0).sum() > 10_000
            assert mismatch.sum() <= 4, (z, int(mismatch.sum()))
    finally:
        session.close()


def test_rotated_raster_click_is_exact(tmp_path):
    sc = synth.make_scene(SIZE, SIZE, transform=synth.rotated_transform(30),
                          path=tmp_path / "rot.tif")
    session = Session(sc.path, adapter=OracleAdapter(background=sc.background))
    with running(session) as c:
        out = click(c, lonlat(sc, 2))  # the ring: its hole is kept
        geom = to_raster_crs(sc, out["feature"])
        assert same(geom, sc.polygons[2]) and len(geom.interiors) == 1


def test_text_concepts_in_view_with_a_tiny_sam3(tmp_path):
    pytest.importorskip("terrasam.models.sam3")
    from terrasam.testing import random_checkpoint
    from test_prompts import tiny_tokenizer

    ckpt = random_checkpoint("sam3", tmp_path / "ckpt", size="tiny", seed=0)
    if not list(ckpt.glob("tokenizer*")):
        tiny_tokenizer(ckpt)
    sc = synth.make_scene(160, 160, path=tmp_path / "s.tif")
    session = Session(sc.path, checkpoint=ckpt, device="cpu", dtype="float32",
                      score_threshold=0.0, prefetch=False)
    with running(session) as c:
        info = c.get("/api/info")[1]
        assert info["text"] is True and info["family"] == "sam3"
        status, out, _ = c.post("/api/text", {"text": "swimming pool",
                                              "bounds": bounds_of(info)})
        assert status == 200 and len(out["features"]) > 0, out
        assert {f["properties"]["prompt_type"] for f in out["features"]} == {"text"}
        assert {f["properties"]["prompt"] for f in out["features"]} == {"swimming pool"}
        status, out, _ = c.post("/api/text", {"text": "x" * 201, "bounds": bounds_of(info)})
        assert status == 422


def test_everything_in_view_and_keep_all(oracle_server, scene, tmp_path):
    c = oracle_server
    info = c.get("/api/info")[1]
    status, out, _ = c.post("/api/everything", {"bounds": bounds_of(info)})
    assert status == 200 and len(out["features"]) >= len(scene.polygons)
    geoms = [to_raster_crs(scene, f) for f in out["features"]]
    for i, poly in scene.polygons.items():
        assert max(shapely.area(shapely.intersection(poly, g)) / shapely.area(
            shapely.union(poly, g)) for g in geoms) > 0.99, i
    status, kept, _ = c.post("/api/objects", {"candidates": [f["id"] for f in out["features"]]})
    assert status == 200 and len(kept["features"]) == len(out["features"])
    status, data, _ = c.get("/api/export?format=parquet")
    path = tmp_path / "auto.parquet"
    path.write_bytes(data)
    gdf = gpd.read_parquet(path)
    assert len(gdf) == len(out["features"]) and set(gdf.prompt_type) == {"auto"}
    assert gdf.crs.to_epsg() == 32614


def test_embedding_cache_prefetch_and_lru_bound(scene):
    oracle = OracleAdapter(background=scene.background, image_size=128)
    session = Session(scene.path, adapter=oracle, cache_mb=1)
    with running(session) as c:
        lon, lat = lonlat(scene, 1)
        first = click(c, (lon, lat))
        assert first["timing"]["embeddings_computed"] >= 1
        calls = oracle.embed_calls
        again = click(c, (lon, lat))  # same window: decoder only
        assert again["timing"]["embeddings_computed"] == 0 and oracle.embed_calls == calls
        assert again["feature"]["geometry"] == first["feature"]["geometry"]
        # the view around object 4: embedded in the background, then a click costs no embed
        t = Transformer.from_crs(scene.crs, synth.WGS84, always_xy=True)
        x0, y0, x1, y1 = scene.polygons[4].bounds
        (w, e), (s, n) = t.transform([x0, x1], [y0, y1])
        status, out, _ = c.post("/api/prefetch", {"bounds": {"west": w, "south": s, "east": e,
                                                             "north": n}})
        assert status == 200 and out["windows"] >= 1
        deadline = time.monotonic() + 20
        while c.get("/api/status")[1]["prefetch_pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        lon4, lat4 = lonlat(scene, 4)
        later = click(c, (lon4, lat4))
        assert later["timing"]["embeddings_computed"] == 0
        assert same(to_raster_crs(scene, later["feature"]), scene.polygons[4])
        stats = c.get("/api/status")[1]["embeddings"]
        assert stats["bytes"] <= 2**20 or stats["entries"] == 1  # the memory bound holds


def test_lru_cache_computes_each_key_once_and_evicts():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.2)
        return np.zeros(100, np.uint8)

    cache = LRUCache(max_bytes=250, max_items=10)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute("a", slow)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sum(computed for _, computed in results) == 1
    cache.put("b", np.zeros(100, np.uint8))
    cache.put("c", np.zeros(100, np.uint8))
    assert "a" not in cache and "b" in cache and "c" in cache and cache.bytes == 200
    cache.put("d", np.zeros(1000, np.uint8))  # bigger than the bound: only the newest stays
    assert len(cache) == 1 and "d" in cache


def test_tiny_random_model_over_http(scene, tmp_path):
    from terrasam.testing import random_checkpoint

    ckpt = random_checkpoint("sam-vit-b", tmp_path / "ckpt", size="tiny", seed=0,
                             prompt_sensitive=True)
    session = Session(scene.path, checkpoint=ckpt, device="cpu", dtype="float32")
    with running(session) as c:
        lon, lat = lonlat(scene, 2)
        out = click(c, (lon, lat))
        assert out["timing"]["embeddings_computed"] == 1
        inner = shapely.box(*scene.transform @ (10, SIZE - 10), *scene.transform @ (SIZE - 10, 10))
        if out["feature"] is not None:  # random weights may find nothing
            geom = to_raster_crs(scene, out["feature"])
            assert inner.buffer(0.01).contains(geom)  # inside the raster's valid pixels
            c.post("/api/objects", {"candidates": [out["feature"]["id"]]})
            status, data, _ = c.get("/api/export?format=gpkg")
            path = tmp_path / "tiny.gpkg"
            path.write_bytes(data)
            gdf = gpd.read_file(path)
            assert gdf.crs.to_epsg() == 32614 and gdf["model"][0] == session.adapter.model_id
        assert click(c, (lon, lat))["timing"]["embeddings_computed"] == 0


# --------------------------------------------------------------------------- the command line


def test_loopback_only_unless_asked():
    from terrasam.errors import TerrasamError
    from terrasam.serve.app import serve

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")
    with pytest.raises(TerrasamError, match="not a loopback address"):
        serve("never-read.tif", host="0.0.0.0")


def test_cli_serve_without_fastapi_says_what_to_install(monkeypatch, scene):
    import importlib.util

    from click.testing import CliRunner

    from terrasam.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fastapi" else real(name, *a))
    result = CliRunner().invoke(main, ["serve", str(scene.path)])
    assert result.exit_code == 1
    assert result.output.strip() == ('terrasam: error: terrasam serve needs FastAPI and '
                                     'uvicorn: pip install "terrasam[serve]".')


def test_cli_serve_help_and_port_in_use(scene):
    from click.testing import CliRunner

    from terrasam.cli import main

    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0 and "--port" in result.output and "--open" in result.output
    session = Session(scene.path, adapter=OracleAdapter(background=scene.background))
    with running(session) as c:
        result = CliRunner().invoke(main, ["serve", str(scene.path), "--port",
                                           str(c.server.port), "--checkpoint", "missing.pt"])
        assert result.exit_code == 1 and "terrasam: error:" in result.output


# --------------------------------------------------------------------------- the browser


def test_browser_click_polygon_keep_export(scene, tmp_path):
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    session = Session(scene.path, adapter=OracleAdapter(background=scene.background))
    with running(session) as c, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700},
                                    accept_downloads=True)
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(c.url + "/")
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            lon, lat = lonlat(scene, 1)
            xy = page.evaluate(f"(() => {{ const p = window.terrasam.map.latLngToContainerPoint("
                               f"[{lat}, {lon}]); return [p.x, p.y]; }})()")
            box = page.locator("#map").bounding_box()
            page.wait_for_load_state("networkidle")
            before = np.asarray(_png(page.locator("#map").screenshot())).astype(int)
            page.mouse.click(box["x"] + xy[0], box["y"] + xy[1])
            page.wait_for_selector("path.terrasam-current", timeout=30_000)
            assert "score" in page.inner_text("#score")
            # the drawn layer is on screen: what changed is object 1's outline, fill and score
            after = np.asarray(_png(page.locator("#map").screenshot())).astype(int)
            changed = np.abs(after - before).max(axis=-1) > 40
            magenta = changed & (after[..., 0] > 200) & (after[..., 1] < 80) & (after[..., 2] > 200)
            assert magenta.sum() > 200  # the outline
            ys, xs = np.nonzero(changed)
            corners = page.evaluate(_corners_js(scene, 1))
            (cx0, cy0), (cx1, cy1) = corners
            assert abs(xs.min() - min(cx0, cx1)) < 6 and abs(xs.max() - max(cx0, cx1)) < 6
            assert abs(ys.min() - min(cy0, cy1)) < 6 and abs(ys.max() - max(cy0, cy1)) < 6
            page.click("#keep")
            page.wait_for_selector("#kept li", timeout=10_000)
            page.wait_for_selector("path.terrasam-kept", timeout=10_000)
            with page.expect_download(timeout=30_000) as download:
                page.click("#export-gpkg")
            out = tmp_path / "browser.gpkg"
            download.value.save_as(out)
            gdf = gpd.read_file(out)
            assert gdf.crs.to_epsg() == 32614 and len(gdf) == 1
            assert gdf.geometry[0].equals(scene.polygons[1])
            # drag = box: around the diamond (object 4)
            (bx0, by0), (bx1, by1) = page.evaluate(_corners_js(scene, 4))
            page.mouse.move(box["x"] + bx0 - 4, box["y"] + by0 - 4)
            page.mouse.down()
            page.mouse.move(box["x"] + (bx0 + bx1) / 2, box["y"] + (by0 + by1) / 2, steps=4)
            page.mouse.move(box["x"] + bx1 + 4, box["y"] + by1 + 4, steps=4)
            page.mouse.up()
            page.wait_for_function("() => window.terrasam.state.current && window.terrasam"
                                   ".state.current.properties.prompt_type === 'box'",
                                   timeout=30_000)
            feature = page.evaluate("window.terrasam.state.current")
            assert same(to_raster_crs(scene, feature), scene.polygons[4])
            page.keyboard.press("Escape")
            assert page.evaluate("window.terrasam.state.current") is None
            assert all(u.startswith(c.url) or u.startswith(("blob:", "data:")) for u in requests)
        finally:
            browser.close()


def _png(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def _corners_js(scene, i) -> str:
    t = Transformer.from_crs(scene.crs, synth.WGS84, always_xy=True)
    x0, y0, x1, y1 = scene.polygons[i].bounds
    (w, e), (s, n) = t.transform([x0, x1], [y0, y1])
    return (f"(() => {{ const m = window.terrasam.map; const a = m.latLngToContainerPoint("
            f"[{n}, {w}]); const b = m.latLngToContainerPoint([{s}, {e}]); "
            f"return [[a.x, a.y], [b.x, b.y]]; }})()")
