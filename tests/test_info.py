"""`terrasam info`: what it prints, as text and JSON, through click and the console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from synth import WGS84, make_scene, write_raster
from terrasam.cli import main
from terrasam.raster import open_raster


def _info(*args):
    return CliRunner().invoke(main, ["info", *map(str, args)])


@pytest.fixture
def uint16_scene(tmp_path):
    return make_scene(300, 200, dtype="uint16", nodata_border=5, path=tmp_path / "s16.tif")


def test_info_text(uint16_scene):
    result = _info(uint16_scene.path, "--tile-size", 128, "--overlap", 32)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "300 x 200 px, 3 bands" in out
    assert "dtype       uint16" in out
    assert "nodata      0 (from: file)" in out
    assert "crs         EPSG:32614 (WGS 84 / UTM zone 14N)" in out
    assert "resolution  0.5 x 0.5 m" in out
    assert "percentile 2-98 % (global, from all pixels)" in out
    with open_raster(uint16_scene.path) as r:
        lo, hi = r.scaling.lo, r.scaling.hi
    for b in range(3):
        assert f"band {b + 1}: {lo[b]:.10g} .. {hi[b]:.10g} -> 0 .. 255" in out
    # 300 x 200 with 128 px tiles, step 96: columns 0, 96, 172; rows 0, 72
    assert "128 px tiles, 32 px overlap: 2 x 3 = 6 tiles, 6 with data" in out
    assert "memory      ~" in out


def test_info_json_and_options(uint16_scene):
    result = _info(uint16_scene.path, "--bands", "3,1", "--nodata", "1800", "--scale",
                   "minmax", "--gsd", "1.0", "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert d["band_indexes"] == [3, 1] and d["rgb_channels"] == [3, 1, "mean"]
    assert (d["nodata"], d["nodata_source"]) == (1800.0, "user")
    assert d["crs"]["epsg"] == 32614 and d["res"] == [0.5, 0.5]
    assert d["scaling"]["method"] == "minmax"
    valid = uint16_scene.image[2] != 1800  # --nodata overrides the file's 0
    assert d["scaling"]["lo"][0] == uint16_scene.image[2][valid].min()
    t = d["tiling"]
    assert (t["scale"], t["width"], t["height"], t["tiles"], t["tiles_with_data"]) == \
        (2.0, 150, 100, 1, 1)
    assert t["read_bytes_per_tile"] > 150 * 100 * 3


def test_info_counts_tiles_with_data(tmp_path):
    data = np.zeros((1, 600, 600), dtype=np.float32)
    data[:, :, :300] = np.nan
    path = write_raster(tmp_path / "f.tif", data, crs=WGS84)
    result = _info(path, "--tile-size", 200, "--overlap", 0, "--scale", "none")
    assert result.exit_code == 0, result.output
    assert "3 x 3 = 9 tiles, 6 with data" in result.output
    assert "nodata      none; NaN pixels are nodata" in result.output
    assert "crs         EPSG:4326 (WGS 84)" in result.output
    assert "degrees (~" in result.output
    assert "none: values clipped to 0..255" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["{missing}"], "does not exist."),
    (["{scene}", "--bands", "1,2,7"], "band 7 is out of range: 's16.tif' has 3 bands (1-3)."),
    (["{scene}", "--overlap", "2000"], "overlap must be at least 0 and smaller than"),
    (["{scene}", "--percentiles", "2"], "percentiles must be two numbers"),
])
def test_info_errors(uint16_scene, tmp_path, args, message):
    args = [a.format(scene=uint16_scene.path, missing=tmp_path / "missing.tif") for a in args]
    result = _info(*args)
    assert result.exit_code == 1
    assert result.stderr.startswith("terrasam: error: ") and message in result.stderr
    assert "Traceback" not in result.output


def _console_script() -> str:
    found = Path(sys.executable).with_name("terrasam")
    if found.exists():
        return str(found)
    found = shutil.which("terrasam")
    if not found:
        pytest.skip("the terrasam console script is not installed")
    return found


def test_console_script(uint16_scene, tmp_path):
    out = subprocess.run([_console_script(), "info", str(uint16_scene.path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "300 x 200 px, 3 bands" in out.stdout and "EPSG:32614" in out.stdout
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"\x00" * 64)
    out = subprocess.run([_console_script(), "info", str(bad)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().startswith("terrasam: error: ")
    assert "is not a raster GDAL can read" in out.stderr and len(out.stderr.splitlines()) == 1


def test_info_on_shared_rasters(shared_data):
    naip = _info(shared_data / "naip_2020_5m.tif")
    assert naip.exit_code == 0, naip.output
    for fact in ("934 x 723 px, 4 bands", "dtype       uint8", "nodata      0 (from: file)",
                 "crs         EPSG:26914 (NAD83 / UTM zone 14N)", "resolution  5 x 5 m",
                 "rgb from    bands 1, 2, 3", "1 x 1 = 1 tiles, 1 with data"):
        assert fact in naip.output, fact
    landsat = _info(shared_data / "landsat_2020.tif", "--json")
    assert landsat.exit_code == 0, landsat.output
    d = json.loads(landsat.stdout)
    assert (d["width"], d["height"], d["count"], d["dtype"]) == (697, 377, 4, "uint8")
    assert d["crs"]["epsg"] == 4326 and d["nodata"] == 0
    assert d["res"][0] == pytest.approx(0.000808484, rel=1e-6)
    assert 85 < d["ground_res_m"][0] < 95  # ~89 m pixels at 8.4 degrees south
