"""Output CRS rules: GeoJSON/KML are WGS 84 (refused without a CRS), the sidecar records the
CRS, pixel-coordinate output from a raster with no georeferencing comes with one warning."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from click.testing import CliRunner
from pyproj import CRS, Transformer

import synth
from oracle import OracleAdapter
from terrasam import api
from terrasam import io as tio
from terrasam.errors import TerrasamError

FAST = {"tile_size": 128, "overlap": 32, "scale": "none", "points_per_side": 8, "quiet": True}
# a transverse Mercator of its own (no EPSG code): central meridian 100.5 W, false northing
CUSTOM = CRS.from_proj4("+proj=tmerc +lat_0=0 +lon_0=-100.5 +k=0.9996 +x_0=500000 "
                        "+y_0=-20000 +ellps=GRS80 +units=m +no_defs")
SHAPES = [synth.rect(20, 20, 60, 70), synth.rect(80, 90, 120, 150)]
NO_GEOREF = "the raster has no georeferencing: the objects are in pixel coordinates"


def no_crs_error(name: str) -> str:
    return (f"the raster has no CRS, so its objects cannot be written as {name} (always "
            "WGS 84); write .gpkg, .shp, .parquet or .fgb instead, or give the raster a CRS")


def plain_image(path: Path, scene) -> Path:
    """The scene as a PNG: no CRS, no geotransform."""
    with rasterio.open(path, "w", driver="PNG", width=scene.image.shape[2],
                       height=scene.image.shape[1], count=3, dtype="uint8") as dst:
        dst.write(scene.image)
    return path


class NoModel:
    """A model reference whose loading is a test failure: checks must come first."""

    def load(self):
        raise AssertionError("the model was loaded before the output was refused")


@pytest.fixture
def no_model(monkeypatch):
    from terrasam.models.ref import ModelRef

    monkeypatch.setattr(ModelRef, "for_run", classmethod(lambda cls, *a, **k: NoModel()))


def test_check_crs_for_refuses_wgs84_formats_without_a_crs():
    for ext, name in ((".geojson", "GeoJSON"), (".kml", "KML")):
        if ext == ".kml" and ".kml" not in tio._vector_formats():
            continue
        with pytest.raises(TerrasamError) as err:
            tio.check_crs_for({"vector": f"out{ext}"}, None, Affine.identity())
        assert str(err.value) == no_crs_error(name)
    said = []
    tio.check_crs_for({"vector": "out.gpkg"}, None, Affine.identity(), warn=said.append)
    tio.check_crs_for({"vector": "out.gpkg"}, None, Affine(2, 0, 10, 0, -2, 50),
                      warn=said.append)  # a geotransform but no CRS: no warning
    tio.check_crs_for({"vector": "out.geojson"}, CUSTOM, Affine.identity(), warn=said.append)
    assert len(said) == 1 and said[0].startswith(NO_GEOREF)


@pytest.mark.parametrize("ext", [".geojson", ".kml"])
def test_segment_refuses_geojson_from_a_raster_without_crs_before_the_model(
        tmp_path, no_model, ext):
    if ext == ".kml" and ".kml" not in tio._vector_formats():
        pytest.skip("this GDAL cannot write KML")
    scene = synth.make_scene(128, 128, crs=None, shapes=SHAPES, path=tmp_path / "in.tif")
    with pytest.raises(TerrasamError) as err:
        api.segment(scene.path, tmp_path / f"out{ext}", **FAST)
    assert str(err.value) == no_crs_error("GeoJSON" if ext == ".geojson" else "KML")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_prompt_refuses_geojson_without_crs_before_the_model(tmp_path, no_model):
    scene = synth.make_scene(128, 128, crs=None, shapes=SHAPES, path=tmp_path / "in.tif")
    with pytest.raises(TerrasamError) as err:
        api.prompt(scene.path, tmp_path / "out.geojson", points=[(500_020.0, 4_099_980.0)], quiet=True)
    assert str(err.value) == no_crs_error("GeoJSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_cli_refusal_is_one_line(tmp_path, no_model):
    from terrasam.cli import main

    scene = synth.make_scene(128, 128, crs=None, shapes=SHAPES, path=tmp_path / "in.tif")
    result = CliRunner().invoke(main, ["segment", str(scene.path), "-o",
                                       str(tmp_path / "out.geojson")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"terrasam: error: {no_crs_error('GeoJSON')}"]


def test_geojson_from_a_custom_crs_lies_at_the_right_lon_lat(tmp_path):
    scene = synth.make_scene(160, 160, crs=rasterio.crs.CRS.from_wkt(CUSTOM.to_wkt()),
                             shapes=SHAPES, path=tmp_path / "in.tif")
    with rasterio.open(scene.path) as ds:
        assert ds.crs.to_epsg() is None  # really no EPSG code
    oracle = OracleAdapter(background=scene.background)
    out = tmp_path / "out.geojson"
    api.segment(scene.path, out, adapter=oracle, **FAST)
    back = gpd.read_file(out)
    assert back.crs.to_epsg() == 4326 and len(back) == 2
    to_lonlat = Transformer.from_crs(CUSTOM, "EPSG:4326", always_xy=True)
    for truth in scene.polygons.values():
        expected = shapely.transform(
            truth, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1])))
        found = back.geometry[back.geometry.intersects(expected.centroid)]
        assert len(found) == 1
        got = found.iloc[0]
        # near the central meridian, 20 km north of where UTM would put it
        assert -100.51 < got.centroid.x < -100.49 and 37.1 < got.centroid.y < 37.4
        assert shapely.symmetric_difference(got, expected).area < 0.02 * expected.area
    # RFC 7946: no "crs" member; the sidecar keeps both CRSs
    assert "crs" not in json.loads(out.read_text())
    stored = tio.read_provenance(out)["output"]
    assert CRS.from_wkt(stored["source_crs_wkt"]).equals(CUSTOM)
    assert CRS.from_wkt(stored["crs_wkt"]).equals(CRS.from_epsg(4326))
    assert stored["crs"] == "EPSG:4326"


def test_gpkg_keeps_a_custom_crs_and_records_it(tmp_path):
    scene = synth.make_scene(128, 128, crs=rasterio.crs.CRS.from_wkt(CUSTOM.to_wkt()),
                             shapes=SHAPES, path=tmp_path / "in.tif")
    out = tmp_path / "out.gpkg"
    api.segment(scene.path, out, adapter=OracleAdapter(background=scene.background), **FAST)
    back = gpd.read_file(out)
    assert back.crs.equals(CUSTOM)
    stored = tio.read_provenance(out)["output"]
    assert CRS.from_wkt(stored["crs_wkt"]).equals(CUSTOM)


def test_write_vectors_refuses_geojson_without_crs(tmp_path):
    gdf = gpd.GeoDataFrame({"id": [1]}, geometry=[shapely.box(0, 0, 1, 1)], crs=None)
    with pytest.raises(TerrasamError, match="cannot be written without a CRS"):
        tio.write_vectors(gdf, tmp_path / "out.geojson", {})
    assert list(tmp_path.iterdir()) == []


def test_plain_image_gives_pixel_coordinates_with_one_warning(tmp_path):
    scene = synth.make_scene(128, 128, crs=None, shapes=SHAPES)
    src = plain_image(tmp_path / "photo.png", scene)
    out = tmp_path / "out.gpkg"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gdf = api.segment(src, out, adapter=OracleAdapter(background=scene.background), **FAST)
    ours = [str(w.message) for w in caught if NO_GEOREF in str(w.message)]
    assert len(ours) == 1
    back = pyogrio.read_dataframe(out)
    assert back.crs is None and len(back) == len(gdf) == 2
    # pixel (column, row) coordinates of the shapes
    for poly in scene.pixel_polygons.values():
        assert back.geometry.intersects(poly.centroid).sum() == 1
    assert back.total_bounds.max() <= 128


def test_cli_plain_image_warns_once(tmp_path, monkeypatch):
    from terrasam.cli import main
    from terrasam.models.ref import ModelRef

    scene = synth.make_scene(128, 128, crs=None, shapes=SHAPES)
    src = plain_image(tmp_path / "photo.png", scene)
    oracle = OracleAdapter(background=scene.background)
    monkeypatch.setattr(ModelRef, "for_run", classmethod(lambda cls, *a, **k: cls.of(oracle)))
    result = CliRunner().invoke(main, ["segment", str(src), "-o", str(tmp_path / "out.fgb"),
                                       "--tile-size", "128", "--scale", "none",
                                       "--points-per-side", "8"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "warning" in line]
    assert lines == [f"terrasam: warning: {NO_GEOREF} (column, row) with no CRS"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
