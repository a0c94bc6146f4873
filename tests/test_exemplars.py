"""SAM 3 beyond text, through the CLI: box exemplars found over the whole raster (tiled and
stitched like --text), points/boxes through the tracker, the automatic generator on SAM 3,
and the one-sentence errors. A tiny random checkpoint in facebook/sam3's layout."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely
from click.testing import CliRunner
from pyproj import Transformer

import synth
from terrasam.cli import main
from terrasam.models import sam3

TILE = ["--tile-size", "96", "--overlap", "32", "--score-threshold", "0"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from terrasam.testing import random_checkpoint
    from test_models_sam3 import tiny_tokenizer

    path = random_checkpoint("sam3", tmp_path_factory.mktemp("sam3") / "tiny", size="tiny",
                             prompt_sensitive=True)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return synth.make_scene(160, 160, path=tmp_path_factory.mktemp("scene") / "s.tif")


@pytest.fixture
def spy(monkeypatch):
    """Records every concept prompt made and every tile's detector run."""
    made, runs = [], []
    real_prompt, real_segment = sam3.Sam3Adapter.concept_prompt, sam3.Sam3Adapter.segment_concept

    def concept_prompt(self, text=None, exemplars=(), label=None):
        out = real_prompt(self, text, exemplars, label)
        made.append({"text": text, "prompt": out,
                     "groups": [(e.original_size, np.asarray(b), list(lab))
                                for e, b, lab in exemplars]})
        return out

    def segment_concept(self, image, prompt, **kw):
        out = real_segment(self, image, prompt, **kw)
        runs.append({"prompt": prompt, "shape": image.shape, "found": len(out)})
        return out

    monkeypatch.setattr(sam3.Sam3Adapter, "concept_prompt", concept_prompt)
    monkeypatch.setattr(sam3.Sam3Adapter, "segment_concept", segment_concept)
    return made, runs


def _run(*args):
    return CliRunner().invoke(main, ["prompt", *map(str, args), "--quiet"])


def _px_box(scene, geom):
    inv = ~scene.transform
    (c0, r0), (c1, r1) = inv @ geom.bounds[:2], inv @ geom.bounds[2:]
    return min(c0, c1), min(r0, r1), max(c0, c1), max(r0, r1)


def test_exemplar_in_one_tile_is_searched_for_in_every_tile(scene, ckpt, tmp_path, spy):
    made, runs = spy
    shape = scene.polygons[1]
    c0, r0, c1, r1 = _px_box(scene, shape)
    assert c1 < 96 and r1 < 96  # the exemplar lies in the first tile only
    # given in lon/lat: reprojected to the raster's CRS as --box is
    to_ll = Transformer.from_crs(scene.crs, "EPSG:4326", always_xy=True)
    lon, lat = to_ll.transform(*np.array(shape.exterior.coords).T)
    out = tmp_path / "ex.gpkg"
    result = _run(scene.path, "-o", out, "--checkpoint", ckpt, *TILE, "--crs", "EPSG:4326",
                  "--exemplar", f"{lon.min()},{lat.min()},{lon.max()},{lat.max()}")
    assert result.exit_code == 0, result.output
    # encoded once, on the window that holds it
    assert len(made) == 1 and made[0]["text"] is None
    (size, boxes, labels), = made[0]["groups"]
    assert size == (96, 96) and labels == [1]
    prompt = made[0]["prompt"]
    assert prompt.features.shape[1] == sam3.TEXT_LENGTH + 2  # "visual", the box, its CLS
    # the window's box is the exemplar's pixels (the window starts at the raster's corner)
    np.testing.assert_allclose(boxes[0], [c0, r0, c1, r1], atol=0.5)
    # the same prompt tokens on every tile of the grid, and every tile found instances
    assert len(runs) == 4 and all(r["prompt"] is prompt for r in runs)
    assert all(r["shape"] == (96, 96, 3) for r in runs) and all(r["found"] for r in runs)
    gdf = gpd.read_file(out)
    assert gdf.crs == scene.crs and len(gdf) > 0
    assert set(gdf.prompt_type) == {"exemplar"} and set(gdf.prompt) == {"exemplar"}
    assert set(gdf.prompt_id) == {1} and set(gdf.prompt_crs.fillna("")) == {""}
    assert gdf.score.between(0, 1).all() and gdf.stability_score.isna().all()
    first_tile = synth.pixel_to_crs(shapely.box(0, 0, 96, 96), scene.transform)
    assert any(not first_tile.contains(g) for g in gdf.geometry)  # found beyond its tile
    frame = synth.pixel_to_crs(shapely.box(0, 0, 160, 160), scene.transform)
    assert all(frame.buffer(1e-6).contains(g) for g in gdf.geometry)


def test_text_and_exemplars_from_a_file_are_one_concept(scene, ckpt, tmp_path, spy):
    made, runs = spy
    polygons = gpd.GeoDataFrame(geometry=[scene.polygons[1], scene.polygons[3]], crs=scene.crs)
    polygons.to_file(tmp_path / "examples.gpkg")
    x0, y0, x1, y1 = scene.polygons[2].bounds
    out = tmp_path / "both.gpkg"
    result = _run(scene.path, "-o", out, "--checkpoint", ckpt, *TILE, "--text", "pool",
                  "--exemplars", tmp_path / "examples.gpkg",
                  "--negative-exemplar", f"{x0},{y0},{x1},{y1}")
    assert result.exit_code == 0, result.output
    assert len(made) == 1 and made[0]["text"] == "pool"
    groups = made[0]["groups"]
    # three exemplars far apart: each encoded on its own 96 px window (as a --box prompt's:
    # centred on it, clamped inside the raster; origins (0, 0), (0, 62), (64, 0)), boxes in
    # that window's pixels
    assert [(size, lab) for size, _, lab in groups] == [((96, 96), [1]), ((96, 96), [1]),
                                                       ((96, 96), [0])]
    offsets = [(0, 0), (0, 62), (64, 0)]
    for (_, got, _), key, (dc, dr) in zip(groups, (1, 3, 2), offsets):
        c0, r0, c1, r1 = _px_box(scene, scene.polygons[key])
        np.testing.assert_allclose(got[0], [c0 - dc, r0 - dr, c1 - dc, r1 - dr], atol=1e-6)
    # tokens: the text's, then a box and a CLS token per window
    assert made[0]["prompt"].features.shape[1] == sam3.TEXT_LENGTH + 3 * 2
    assert len(runs) == 4 and all(r["prompt"] is made[0]["prompt"] for r in runs)
    gdf = gpd.read_file(out)
    assert set(gdf.prompt_type) == {"text+exemplar"} and set(gdf.prompt) == {"pool"}


def test_points_boxes_and_segment_everything_on_sam3(scene, ckpt, tmp_path):
    shape = scene.polygons[1]
    cx, cy = shape.centroid.x, shape.centroid.y
    x0, y0, x1, y1 = scene.polygons[2].bounds
    out = tmp_path / "pts.gpkg"
    result = _run(scene.path, "-o", out, "--checkpoint", ckpt, "--point", f"{cx},{cy}",
                  "--box", f"{x0},{y0},{x1},{y1}")
    assert result.exit_code == 0, result.output
    gdf = gpd.read_file(out)
    assert list(gdf.prompt_type) == ["point", "box"] and set(gdf.model) == {"sam3"}
    assert gdf.predicted_iou.notna().all() and gdf.stability_score.between(0, 1).all()
    assert not gdf.geometry.iloc[0].equals(gdf.geometry.iloc[1])
    seg = tmp_path / "seg.gpkg"
    result = CliRunner().invoke(main, [
        "segment", str(scene.path), "-o", str(seg), "--checkpoint", str(ckpt),
        "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
        "--quiet"])
    assert result.exit_code == 0, result.output
    objects = gpd.read_file(seg)
    assert len(objects) > 0 and set(objects.model) == {"sam3"} and set(objects.prompt) == {"auto"}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a model is loaded: the error must come before."""
    import terrasam.models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(terrasam.models, "load_model", refuse)


def test_exemplar_errors_are_one_sentence_before_the_model_loads(scene, ckpt, tmp_path,
                                                                 no_model_load):
    left, top = scene.transform @ (0, 0)
    x0, y0, x1, y1 = scene.polygons[1].bounds
    box = f"{x0},{y0},{x1},{y1}"
    gpd.GeoDataFrame(geometry=[shapely.Point(x0, y0)], crs=scene.crs).to_file(
        tmp_path / "points.gpkg")
    cases = [
        (["--exemplar", f"{left - 500},{top + 100},{left - 400},{top + 200}"],
         "exemplar 1 falls outside the raster ("),
        (["--exemplar", f"{x1},{y0},{x0},{y1}"], "is an empty box"),
        (["--exemplar", "1,2,3"], "--exemplar takes MINX,MINY,MAXX,MAXY"),
        (["--exemplar", box, "--model", "sam2.1-hiera-tiny"], "does not take exemplars"),
        (["--negative-exemplar", box], "negative exemplars need a positive --exemplar"),
        (["--exemplar", box, "--text", "pool", "--text", "tree"], "at most one --text"),
        (["--exemplar", box, "--exemplars", tmp_path / "points.gpkg"], "not both"),
        (["--exemplars", tmp_path / "points.gpkg"], "exemplars must be polygons"),
    ]
    for args, message in cases:
        out = tmp_path / "e.gpkg"
        model = [] if "--model" in args else ["--checkpoint", ckpt]
        result = _run(scene.path, "-o", out, *model, *args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("terrasam: error: "), result.output
        assert message in lines[0], (message, lines[0])
        assert not out.exists()


def test_exemplar_with_a_checkpoint_of_another_family_is_refused(scene, tmp_path):
    from terrasam.testing import random_checkpoint

    other = random_checkpoint("sam2.1-hiera-tiny", tmp_path / "sam2", format="meta")
    x0, y0, x1, y1 = scene.polygons[1].bounds
    result = _run(scene.path, "-o", tmp_path / "x.gpkg", "--checkpoint", other,
                  "--exemplar", f"{x0},{y0},{x1},{y1}")
    assert result.exit_code == 1
    assert result.output.strip() == ("terrasam: error: model sam2.1-hiera-tiny does not take "
                                      "exemplars; exemplars are a SAM 3 prompt: use --model sam3.")


def test_exemplars_on_the_dask_engine_equal_the_local_engine(scene, ckpt, tmp_path):
    pytest.importorskip("distributed")

    def crs_box(geom):  # in the raster's CRS
        return ",".join(str(v) for v in geom.bounds)

    runs = {}
    for engine in ("local", "dask-local"):
        out = tmp_path / f"{engine}.gpkg"
        extra = ["--engine", "dask-local", "--workers", "2"] if engine != "local" else []
        result = _run(scene.path, "-o", out, "--checkpoint", ckpt, *TILE, *extra,
                      "--exemplar", crs_box(scene.polygons[1]),
                      "--negative-exemplar", crs_box(scene.polygons[2]))
        assert result.exit_code == 0, result.output
        runs[engine] = gpd.read_file(out)
    local, dask = runs["local"], runs["dask-local"]
    assert len(local) > 0 and len(local) == len(dask)
    assert set(dask.prompt_type) == {"exemplar"} and dask.crs == scene.crs
    # the same objects (the workers run one thread each, so scores may differ in the last bits)
    for a, b in zip(local.geometry, dask.geometry):
        assert a.symmetric_difference(b).area <= 1e-6 * a.area
    np.testing.assert_allclose(local.score, dask.score, atol=1e-4)
