"""The sample raster shipped in the package and `terrasam sample`."""

from __future__ import annotations

import geopandas as gpd
import pytest
import rasterio
from click.testing import CliRunner

import terrasam
from terrasam.cli import main


def test_sample_raster_is_small_georeferenced_and_four_bands(sample_raster):
    assert terrasam.sample_raster() == sample_raster
    assert sample_raster.stat().st_size <= 1 << 20
    with rasterio.open(sample_raster) as ds:
        assert ds.crs.to_epsg() == 26914 and ds.res == (5.0, 5.0)
        assert (ds.count, ds.width, ds.height, ds.dtypes[0]) == (4, 512, 512, "uint8")
        assert ds.profile["tiled"] and ds.compression.value == "DEFLATE"
        assert ds.nodata == 0
        assert ds.read(1).std() > 10  # real imagery, not a flat fill


def test_sample_command_copies_then_info_reads_it(tmp_path, sample_raster):
    dest = tmp_path / "x.tif"
    result = CliRunner().invoke(main, ["sample", str(dest)])
    assert result.exit_code == 0, result.output
    assert dest.read_bytes() == sample_raster.read_bytes()
    assert f"wrote {dest} (" in result.output and "crs     EPSG:26914" in result.output
    assert "bounds  487999.0, 5205686.0, 490559.0, 5208246.0" in result.output
    assert "lon/lat -99.15794, 47.00459, -99.12419, 47.02767" in result.output
    info = CliRunner().invoke(main, ["info", str(dest)])
    assert info.exit_code == 0, info.output
    assert "512 x 512 px, 4 bands" in info.output and "EPSG:26914" in info.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tif"]  # no temporary left


def test_sample_refuses_an_existing_file_unless_overwrite(tmp_path):
    dest = tmp_path / "x.tif"
    dest.write_bytes(b"mine")
    result = CliRunner().invoke(main, ["sample", str(dest)])
    assert result.exit_code == 1
    assert result.output == f"terrasam: error: {dest} exists; use --overwrite to replace it.\n"
    assert dest.read_bytes() == b"mine"
    result = CliRunner().invoke(main, ["sample", str(dest), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert dest.stat().st_size > 100_000
    missing = CliRunner().invoke(main, ["sample", str(tmp_path / "no" / "x.tif")])
    assert missing.exit_code == 1 and "output folder" in missing.output


def test_sample_default_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["sample"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "naip_sample.tif").is_file()


@pytest.mark.slow
def test_segment_on_the_sample_with_a_random_model(tmp_path, sample_raster):
    from terrasam.testing import random_checkpoint

    ckpt = random_checkpoint("sam-vit-b", tmp_path / "ckpt", size="tiny", seed=0)
    out = tmp_path / "fields.gpkg"
    result = CliRunner().invoke(main, [
        "segment", str(sample_raster), "-o", str(out), "--checkpoint", str(ckpt),
        "--tile-size", "512", "--overlap", "64", "--points-per-side", "4",
        "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    gdf = gpd.read_file(out)
    assert len(gdf) >= 1 and gdf.crs.to_epsg() == 26914
    left, bottom, right, top = 487999.0, 5205686.0, 490559.0, 5208246.0
    x0, y0, x1, y1 = gdf.total_bounds
    assert left <= x0 and x1 <= right and bottom <= y0 and y1 <= top
    assert (gdf["area_m2"] > 0).all()
