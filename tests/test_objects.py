"""Objects for analysis end to end: statistics, shape measures, --where and outlines through
``api.segment`` / ``api.prompt`` (oracle model) and the real command line (random weights)."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely
from click.testing import CliRunner

import synth
from oracle import OracleAdapter
from terrasam import api
from terrasam.cli import main
from terrasam.errors import TerrasamError

FAST = {"tile_size": 128, "overlap": 32, "scale": "none", "points_per_side": 8, "quiet": True}
NIR = {0: 900}  # band 4 of the background; object i gets 1000 * i + 7


def nir_value(label: int) -> int:
    return NIR.get(label, 1000 * label + 7)


@pytest.fixture(scope="module")
def four_bands(tmp_path_factory):
    """The synthetic scene as 4 uint16 bands: RGB as 0..255 (what the model sees with
    --scale none) and a near-infrared band far beyond 8 bits, flat per object."""
    d = tmp_path_factory.mktemp("objects")
    scene = synth.make_scene(256, 256)
    nir = np.vectorize(nir_value)(scene.labels).astype(np.uint16)
    data = np.concatenate([scene.image.astype(np.uint16), nir[None]])
    path = synth.write_raster(d / "four.tif", data, transform=scene.transform, crs=scene.crs)
    return scene, path, d


def expected_ndvi(scene, label):
    red = scene.colours[label][0]
    return (nir_value(label) - red) / (nir_value(label) + red)


def run(four_bands, name, **kw):
    scene, path, d = four_bands
    return api.segment(path, d / f"{name}.gpkg", adapter=OracleAdapter(background=scene.background),
                       overwrite=True, **FAST, **kw)


def by_label(scene, gdf) -> dict:
    """truth label -> the row of the object that is it (pixel-exact outlines)."""
    out = {}
    for label, truth in scene.polygons.items():
        for i, g in enumerate(gdf.geometry):
            if shapely.equals(g, truth):
                out[label] = gdf.iloc[i]
    return out


@pytest.fixture(scope="module")
def every(four_bands):
    """Every object with all statistics of every band, the index and the shape measures."""
    return run(four_bands, "stats", stats="mean,std,min,max,median,count",
               index=["ndvi=(b4-b1)/(b4+b1)"], shape=True)


def test_statistics_and_shape_of_every_object_are_exact(four_bands, every):
    scene, gdf = four_bands[0], every
    rows = by_label(scene, gdf)
    assert len(rows) == len(scene.polygons) == len(gdf)
    for label, row in rows.items():
        pixels = int((scene.labels == label).sum())
        for b, value in enumerate([*scene.colours[label], nir_value(label)], start=1):
            # the input's own values (band 4 is far above 255), flat over the object
            assert row[f"b{b}_mean"] == row[f"b{b}_min"] == row[f"b{b}_max"] == value
            assert row[f"b{b}_median"] == value and row[f"b{b}_std"] == 0
            assert row[f"b{b}_count"] == pixels
        assert row["ndvi_mean"] == pytest.approx(expected_ndvi(scene, label), rel=1e-12)
        truth = scene.polygons[label]
        assert row["centroid_x"] == pytest.approx(truth.centroid.x)
        assert row["holes"] == len(truth.interiors)
        assert row["solidity"] == pytest.approx(truth.area / truth.convex_hull.area)
    # written as read
    written = gpd.read_file(four_bands[2] / "stats.gpkg")
    assert list(written.columns) == list(gdf.columns)
    assert written.columns[-1] == "geometry"
    assert {"b4_mean", "ndvi_median", "compactness", "orientation"} <= set(written.columns)


def test_where_keeps_exactly_the_objects_that_satisfy_it(four_bands, every):
    scene = four_bands[0]
    condition = "area_m2 > 300 and ndvi_mean < 0.9 or holes >= 1"
    kept = run(four_bands, "some", stats="mean,std,min,max,median,count",
               index=["ndvi=(b4-b1)/(b4+b1)"], shape=True, where=condition,
               label_raster=four_bands[2] / "some.tif")
    expected = every[((every.area_m2 > 300) & (every.ndvi_mean < 0.9)) | (every.holes >= 1)]
    assert 0 < len(kept) < len(every)
    assert [g.wkb for g in kept.geometry] == [g.wkb for g in expected.geometry]
    pd_cols = [c for c in every.columns if c not in ("id", "geometry")]
    assert kept[pd_cols].equals(expected[pd_cols].reset_index(drop=True))
    assert kept["id"].tolist() == list(range(1, len(kept) + 1))  # numbered without gaps
    assert kept.attrs["terrasam"]["objects"] == len(kept)
    import rasterio

    with rasterio.open(four_bands[2] / "some.tif") as ds:
        assert set(np.unique(ds.read(1))) - {0} == set(kept["id"])
    assert len(by_label(scene, kept)) == len(kept)


def test_outlines_change_before_areas_and_statistics_are_measured(four_bands, every):
    smooth = run(four_bands, "smooth", smooth=True, stats="count", stats_bands=[4])
    plain = every
    assert list(smooth.columns) == ["id", "area_m2", "perimeter_m", "predicted_iou",
                                    "stability_score", "model", "prompt", "tiles",
                                    "b4_count", "geometry"]
    # area and statistics follow the smoothed outline: partial pixels counted exactly
    np.testing.assert_allclose(smooth["b4_count"] * 0.25, smooth["area_m2"], rtol=1e-9)
    np.testing.assert_allclose(smooth["area_m2"] / plain["area_m2"], 1, atol=0.02)
    assert (smooth.geometry.apply(lambda g: len(shapely.get_coordinates(g))) !=
            plain.geometry.apply(lambda g: len(shapely.get_coordinates(g)))).any()
    reg = run(four_bands, "reg", regularize=True, regularize_45=True)
    assert reg.geometry.is_valid.all() and len(reg) == len(plain)


def test_prompts_get_the_same_columns_and_filter(four_bands):
    scene, path, d = four_bands
    centres = [scene.polygons[i].representative_point() for i in (1, 4, 5)]
    gdf = api.prompt(path, d / "prompts.gpkg", points=[(p.x, p.y) for p in centres],
                     adapter=OracleAdapter(background=scene.background), scale="none",
                     stats="mean", stats_bands=[4], shape=True, where="b4_mean > 2000")
    assert gdf["b4_mean"].tolist() == [nir_value(4), nir_value(5)]
    assert gdf["prompt_id"].tolist() == [2, 3] and gdf["id"].tolist() == [1, 2]
    assert "elongation" in gdf.columns
    # outlines too: the pixelated diamond (object 4) comes back as a square
    square = api.prompt(path, points=[(centres[1].x, centres[1].y)], scale="none",
                        adapter=OracleAdapter(background=scene.background), regularize=True)
    assert len(square.geometry[0].exterior.coords) == 5
    assert square.geometry[0].symmetric_difference(scene.polygons[4]).area < \
        0.1 * scene.polygons[4].area


def test_bad_options_are_refused_before_the_model_runs(four_bands, tmp_path):
    scene, path, _ = four_bands

    class Untouchable(OracleAdapter):
        def embed(self, image):
            raise AssertionError("the model ran")

    model = Untouchable(background=scene.background)
    cases = [
        ({"where": "area > 5"}, "unknown column 'area'; the known columns are: area_m2, "
                                "perimeter_m, predicted_iou"),
        ({"where": "ndvi_mean > 0"}, "unknown column 'ndvi_mean'"),
        ({"where": "area_m2 > 5", "stats": "mean", "stats_bands": [7]}, "band 7 is out of "
                                                                         "range"),
        ({"index": ["x=b5/b1"]}, "--index x: band 5 is out of range"),
        ({"stats": "mean,avg"}, "unknown statistic"),
        ({"regularize": True, "smooth": True}, "not both"),
        ({"smooth": "2 parsecs"}, "unknown unit"),
    ]
    for kw, message in cases:
        with pytest.raises(TerrasamError, match=message.replace("(", r"\(")):
            api.segment(path, tmp_path / "x.gpkg", adapter=model, **FAST, **kw)
    assert not (tmp_path / "x.gpkg").exists()
    # the command line: one line, exit 1, and no model is even loaded (this checkpoint
    # exists but would fail to load)
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    result = CliRunner().invoke(main, ["segment", str(path), "-o", str(tmp_path / "y.gpkg"),
                                       "--checkpoint", str(tmp_path / "garbage.pt"),
                                       "--where", "area_m2 > 5 and nvdi_mean < 0.2",
                                       "--index", "ndvi=(b4-b1)/(b4+b1)"])
    assert result.exit_code == 1
    assert "unknown column 'nvdi_mean'" in result.output and "ndvi_mean" in result.output
    assert "Traceback" not in result.output and "checkpoint" not in result.output


def test_cli_end_to_end_with_a_random_checkpoint(tmp_path):
    from terrasam.testing import random_checkpoint

    # a small scene keeps the random model's noisy masks cheap to trace
    scene = synth.make_scene(128, 128)
    nir = np.vectorize(nir_value)(scene.labels).astype(np.uint16)
    path = synth.write_raster(tmp_path / "four.tif",
                              np.concatenate([scene.image.astype(np.uint16), nir[None]]),
                              transform=scene.transform, crs=scene.crs)
    ckpt = random_checkpoint("sam-vit-b", tmp_path / "ckpt", size="tiny", seed=0)
    out = tmp_path / "objects.gpkg"
    args = ["segment", str(path), "-o", str(out), "--checkpoint", str(ckpt), "--bands",
            "1,2,3", "--scale", "none", "--tile-size", "128", "--points-per-side", "2",
            "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--box-nms-thresh",
            "1.0", "--min-mask-region-area", "100", "--min-area", "30", "--quiet",
            "--regularize", "--stats", "mean,count", "--stats-bands", "4",
            "--index", "ndvi=(b4-b1)/(b4+b1)", "--shape"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    every = gpd.read_file(out)
    assert len(every) > 3
    assert {"b4_mean", "b4_count", "ndvi_mean", "ndvi_count", "compactness", "centroid_y"} \
        <= set(every.columns) and "b1_mean" not in every.columns
    # statistics under the regularized polygons, from first principles: every pixel counts
    # by the exact fraction of it that the polygon covers
    inverse = ~scene.transform
    rows, cols = np.mgrid[0:128, 0:128]
    cells = shapely.box(cols.ravel(), rows.ravel(), cols.ravel() + 1, rows.ravel() + 1)
    nir = nir.ravel().astype(float)
    red = scene.rgb[0].ravel().astype(float)
    ndvi = (nir - red) / (nir + red)
    partial = 0
    for _, row in every.iterrows():
        px = shapely.affinity.affine_transform(
            row.geometry, [inverse.a, inverse.b, inverse.d, inverse.e, inverse.c, inverse.f])
        cover = shapely.area(shapely.intersection(cells, px))
        partial += int(((cover > 1e-9) & (cover < 1 - 1e-9)).sum())
        assert row["b4_count"] == pytest.approx(cover.sum(), rel=1e-9)
        assert row["b4_mean"] == pytest.approx((cover * nir).sum() / cover.sum(), rel=1e-9)
        assert row["ndvi_mean"] == pytest.approx((cover * ndvi).sum() / cover.sum(), rel=1e-9)
    assert partial > 0  # regularized edges do cut pixels
    # the same run filtered: exactly the rows that satisfy the condition, renumbered
    limit = float(np.median(every["area_m2"]))
    where = f"area_m2 > {limit} and ndvi_mean < 0.99"
    out2 = tmp_path / "some.gpkg"
    result = CliRunner().invoke(main, [*args[:3], str(out2), *args[4:], "--where", where])
    assert result.exit_code == 0, result.output
    some = gpd.read_file(out2)
    expected = every[(every.area_m2 > limit) & (every.ndvi_mean < 0.99)]
    assert 0 < len(some) < len(every)
    assert [g.wkb for g in some.geometry] == [g.wkb for g in expected.geometry]
    assert some["id"].tolist() == list(range(1, len(some) + 1))
