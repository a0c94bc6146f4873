"""The raster reader: bands, dtypes, nodata, global scaling, boundless and resampled reads."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from rasterio.windows import Window

import terrasam.raster as raster_mod
from synth import (
    UTM,
    make_scene,
    rect,
    utm_transform,
    write_large_raster,
    write_raster,
)
from terrasam.errors import TerrasamError
from terrasam.raster import Scaling, open_raster, parse_bands


def _gradient(h=200, w=300, bands=3, dtype="uint16", seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(100, 20000, size=(bands, h, w)).astype(dtype)


# -- scaling -------------------------------------------------------------------------------

def test_percentiles_match_numpy_over_valid_pixels(tmp_path):
    data = _gradient()
    data[:, :20, :] = 0  # a nodata band at the top: must not count
    path = write_raster(tmp_path / "a.tif", data, nodata=0)
    with open_raster(path) as r:
        s = r.scaling
        assert s.method == "percentile"
        for i in range(3):
            values = data[i][data.any(axis=0)]
            np.testing.assert_allclose([s.lo[i], s.hi[i]], np.percentile(values, [2, 98]))
    with open_raster(path, percentiles=(10, 90)) as r:
        values = data[1][data.any(axis=0)]
        np.testing.assert_allclose([r.scaling.lo[1], r.scaling.hi[1]],
                                   np.percentile(values, [10, 90]))
    with open_raster(path, scale="minmax") as r:
        values = data[2][data.any(axis=0)]
        assert (r.scaling.lo[2], r.scaling.hi[2]) == (values.min(), values.max())
    with open_raster(path, scale="none") as r:
        assert list(r.scaling.lo) == [0, 0, 0] and list(r.scaling.hi) == [255, 255, 255]


def test_scaling_formula_and_clipping():
    s = Scaling("minmax", np.array([100.0]), np.array([200.0]))
    out = s.apply(np.array([[[50, 100, 150, 200, 250, np.nan]]], dtype=np.float32))
    assert out.dtype == np.uint8
    assert out.tolist() == [[[0, 0, 128, 255, 255, 0]]]


def test_scaling_is_global_not_per_window(tmp_path):
    # Left half dark, right half bright: a per-window stretch would map 5000 differently.
    data = np.full((1, 256, 512), 5000, dtype=np.uint16)
    data[0, :, :256] = np.linspace(1000, 6000, 256, dtype=np.uint16)[None, :]
    data[0, :, 256:] = np.linspace(4000, 30000, 256, dtype=np.uint16)[None, :]
    data[0, 100, 10] = data[0, 100, 300] = 5000
    path = write_raster(tmp_path / "g.tif", data)
    with open_raster(path) as r:
        left, _ = r.read(Window(0, 0, 256, 256))
        right, _ = r.read(Window(256, 0, 256, 256))
        expected = r.scaling.apply(np.array([[[5000]]], dtype=np.float32))[0, 0, 0]
        lo, hi = np.percentile(data[0], [2, 98])
        assert r.scaling.lo[0] == pytest.approx(lo) and r.scaling.hi[0] == pytest.approx(hi)
    assert left[100, 10, 0] == right[100, 300 - 256, 0] == expected
    assert 0 < expected < 255


def test_statistics_from_a_sample_of_windows(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    data = rng.normal(3000, 500, size=(3, 600, 600)).clip(1, 60000).astype(np.uint16)
    path = write_raster(tmp_path / "s.tif", data, blocksize=128)
    monkeypatch.setattr(raster_mod, "SAMPLE_PIXELS", 128 * 128 * 4)
    with open_raster(path) as r:
        assert r.stats_source() == "sample"
        true = np.percentile(data[0], [2, 98])
        # a sample of 4 windows of 256 px: percentiles within 2 % of the whole raster's
        np.testing.assert_allclose([r.scaling.lo[0], r.scaling.hi[0]], true, rtol=0.02)


def test_statistics_from_overview(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    data = rng.normal(3000, 500, size=(3, 512, 512)).clip(1, 60000).astype(np.uint16)
    path = write_raster(tmp_path / "o.tif", data, overviews=[2, 4])
    monkeypatch.setattr(raster_mod, "SAMPLE_PIXELS", 256 * 256)
    with open_raster(path) as r:
        assert r.stats_source() == "overview"
        np.testing.assert_allclose([r.scaling.lo[1], r.scaling.hi[1]],
                                   np.percentile(data[1], [2, 98]), rtol=0.02)
        assert r.describe()["overviews"] == [2, 4]


# -- bands ---------------------------------------------------------------------------------

def _bands_raster(tmp_path, count=4, colorinterp=None, name="b.tif"):
    # band i holds the constant value 10 * i so channel order is visible after reading
    data = np.stack([np.full((32, 32), 10 * (i + 1), np.uint8) for i in range(count)])
    return write_raster(tmp_path / name, data, colorinterp=colorinterp)


def test_default_bands_from_colour_interpretation(tmp_path):
    path = _bands_raster(tmp_path, 4, ("blue", "green", "red", "undefined"))
    with open_raster(path, scale="none") as r:
        assert r.band_indexes == (3, 2, 1)
        rgb, _ = r.read(Window(0, 0, 8, 8))
    assert rgb[0, 0].tolist() == [30, 20, 10]


def test_default_bands_first_three_and_explicit_order(tmp_path):
    path = _bands_raster(tmp_path, 4)
    with open_raster(path, scale="none") as r:
        assert r.band_indexes == (1, 2, 3)
    with open_raster(path, bands=(4, 3, 2), scale="none") as r:
        rgb, _ = r.read(Window(0, 0, 8, 8))
        assert r.band_indexes == (4, 3, 2)
    assert rgb[3, 3].tolist() == [40, 30, 20]
    assert parse_bands("4,3,2") == (4, 3, 2) and parse_bands(None) is None


def test_one_band_repeated_and_two_bands_padded_with_mean(tmp_path):
    one = _bands_raster(tmp_path, 1, name="one.tif")
    with open_raster(one, scale="none") as r:
        rgb, valid = r.read(Window(0, 0, 4, 4))
        assert r.band_indexes == (1,) and r.describe()["rgb_channels"] == [1, 1, 1]
    assert rgb.shape == (4, 4, 3) and rgb[0, 0].tolist() == [10, 10, 10] and valid.all()
    two = _bands_raster(tmp_path, 2, name="two.tif")
    with open_raster(two, scale="none") as r:
        rgb, _ = r.read(Window(0, 0, 4, 4))
    assert rgb[0, 0].tolist() == [10, 20, 15]
    with open_raster(_bands_raster(tmp_path, 4, name="four.tif"), bands=(4,),
                     scale="none") as r:
        assert r.read(Window(0, 0, 2, 2))[0][0, 0].tolist() == [40, 40, 40]


# -- dtypes and nodata ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["uint16", "int16", "float32", "float64"])
def test_dtypes_scale_to_the_scene_colours(tmp_path, dtype):
    scene = make_scene(96, 96, dtype=dtype, nodata_border=3, path=tmp_path / f"{dtype}.tif")
    with open_raster(scene.path, scale="minmax") as r:
        assert r.dtype == dtype
        rgb, valid = r.read(Window(0, 0, 96, 96))
    np.testing.assert_array_equal(valid, scene.valid)
    # minmax maps the scene's darkest / brightest colour values to 0 / 255, linearly
    lo = scene.rgb[:, scene.valid].min(axis=1)
    hi = scene.rgb[:, scene.valid].max(axis=1)
    expected = (scene.rgb.astype(float) - lo[:, None, None]) / (hi - lo)[:, None, None] * 255
    expected = np.floor(np.clip(expected, 0, 255) + 0.5).transpose(1, 2, 0)
    expected[~scene.valid] = 0
    assert np.abs(rgb.astype(int) - expected).max() <= 1
    if dtype.startswith("float"):
        assert np.isnan(scene.image[:, ~scene.valid]).all()


def test_nan_in_one_band_is_invalid(tmp_path):
    data = np.ones((3, 10, 10), dtype=np.float32)
    data[1, 2, 3] = np.nan
    with open_raster(write_raster(tmp_path / "n.tif", data)) as r:
        assert r.nodata is None and r.describe()["nan_is_nodata"]
        _, valid = r.read(Window(0, 0, 10, 10))
    assert not valid[2, 3] and valid.sum() == 99


def test_nodata_from_file_needs_all_bands(tmp_path):
    data = np.full((3, 10, 10), 50, dtype=np.uint8)
    data[:, 0, :] = 0  # nodata row
    data[0, 5, 5] = 0  # only the red band is 0: a real dark-red pixel
    with open_raster(write_raster(tmp_path / "f.tif", data, nodata=0)) as r:
        assert (r.nodata, r.nodata_source) == (0.0, "file")
        rgb, valid = r.read(Window(0, 0, 10, 10))
    assert not valid[0].any() and valid[1:].all() and (rgb[0] == 0).all()


def test_nodata_override(tmp_path):
    scene = make_scene(64, 64, path=tmp_path / "o.tif")  # background (20, 20, 20), no nodata
    with open_raster(scene.path) as r:
        assert r.nodata is None and r.nodata_source is None and not r.may_have_nodata
    with open_raster(scene.path, nodata=20) as r:
        assert (r.nodata, r.nodata_source) == (20.0, "user")
        _, valid = r.read(Window(0, 0, 64, 64))
    np.testing.assert_array_equal(valid, scene.labels > 0)


def test_nodata_from_alpha_band(tmp_path):
    data = np.full((4, 16, 16), 90, dtype=np.uint8)
    data[3] = 255
    data[3, :, :4] = 0
    path = write_raster(tmp_path / "rgba.tif", data,
                        colorinterp=("red", "green", "blue", "alpha"))
    with open_raster(path) as r:
        assert r.band_indexes == (1, 2, 3) and r.nodata_source == "alpha band 4"
        _, valid = r.read(Window(0, 0, 16, 16))
        assert r.has_data(Window(4, 0, 4, 4)) and not r.has_data(Window(0, 0, 4, 16))
    assert not valid[:, :4].any() and valid[:, 4:].all()


def test_nodata_from_internal_mask(tmp_path):
    data = np.full((3, 16, 16), 90, dtype=np.uint8)
    mask = np.ones((16, 16), dtype=bool)
    mask[10:, :] = False
    path = write_raster(tmp_path / "m.tif", data, mask=mask)
    with open_raster(path) as r:
        assert r.nodata_source == "internal mask"
        _, valid = r.read(Window(0, 0, 16, 16))
    np.testing.assert_array_equal(valid, mask)


# -- windows -------------------------------------------------------------------------------

def test_boundless_reads(tmp_path):
    scene = make_scene(64, 48, path=tmp_path / "b.tif")
    with open_raster(scene.path, scale="none") as r:
        rgb, valid = r.read(Window(-10, -5, 40, 30))
        inner, _ = r.read(Window(0, 0, 30, 25))
        assert rgb.shape == (30, 40, 3)
        assert not valid[:5].any() and not valid[:, :10].any() and valid[5:, 10:].all()
        assert (rgb[:5] == 0).all() and (rgb[:, :10] == 0).all()
        np.testing.assert_array_equal(rgb[5:, 10:], inner)
        np.testing.assert_array_equal(inner, scene.rgb[:, :25, :30].transpose(1, 2, 0))
        # past the far edge, and entirely outside
        rgb, valid = r.read(Window(50, 40, 20, 20))
        assert valid[:8, :14].all() and not valid[8:].any() and not valid[:, 14:].any()
        rgb, valid = r.read((100, 100, 8, 8))
        assert rgb.shape == (8, 8, 3) and not valid.any() and not rgb.any()
        assert not r.has_data((100, 100, 8, 8))


def test_out_shape_resamples_for_gsd(tmp_path):
    big = rect(8, 8, 56, 56)
    scene = make_scene(128, 128, shapes=[big], nodata_border=4, path=tmp_path / "g.tif")
    with open_raster(scene.path, scale="none") as r:
        rgb, valid = r.read(Window(0, 0, 128, 128), out_shape=(64, 64))
        near, _ = r.read(Window(0, 0, 128, 128), out_shape=(64, 64), resampling="nearest")
    assert rgb.shape == (64, 64, 3) and valid.shape == (64, 64)
    assert not valid[:2].any() and not valid[:, :2].any() and valid[2:62, 2:62].all()
    assert rgb[10, 10].tolist() == list(scene.colours[1])  # inside the object
    assert rgb[40, 40].tolist() == list(scene.background)
    np.testing.assert_array_equal(near[valid], scene.rgb[:, 1::2, 1::2].transpose(1, 2, 0)[valid])


def test_fractional_window_upsamples(tmp_path):
    data = np.tile(np.arange(0, 200, 10, dtype=np.uint8), (3, 20, 1))
    with open_raster(write_raster(tmp_path / "f.tif", data), scale="none") as r:
        rgb, valid = r.read(Window(2.5, 0, 5, 4), out_shape=(8, 10), resampling="nearest")
    assert valid.all() and rgb[0, :, 0].tolist() == [20, 30, 30, 40, 40, 50, 50, 60, 60, 70]


def test_read_overview(tmp_path):
    scene = make_scene(300, 200, path=tmp_path / "p.tif")
    with open_raster(scene.path, scale="none") as r:
        rgb, valid, transform = r.read_overview(max_size=100)
    assert rgb.shape == (67, 100, 3) and valid.all()
    assert transform.a == pytest.approx(scene.transform.a * 3)
    assert transform @ (0, 0) == scene.transform @ (0, 0)


def test_has_data_skips_nodata_windows(tmp_path, monkeypatch):
    data = np.full((3, 300, 300), 80, dtype=np.uint8)
    data[:, :, :150] = 0
    data[:, 10, 5] = 99  # one valid pixel in the empty half
    path = write_raster(tmp_path / "h.tif", data, nodata=0)
    with open_raster(path) as r:
        assert r.has_data(Window(150, 0, 50, 50)) and not r.has_data(Window(0, 50, 150, 250))
        assert r.has_data(Window(0, 0, 50, 50))
    monkeypatch.setattr(raster_mod, "SAMPLE_PIXELS", 100 * 100)  # coarse map from a decimated read
    with open_raster(path) as r:
        assert r.has_data(Window(160, 0, 50, 50)) and not r.has_data(Window(0, 50, 120, 250))


# -- files: formats, CRS, errors, pickling ---------------------------------------------------

def test_other_extensions_and_no_epsg(tmp_path):
    lcc = ("+proj=lcc +lat_1=33 +lat_2=45 +lat_0=39 +lon_0=-96 +x_0=0 +y_0=0 "
           "+ellps=GRS80 +units=m +no_defs")
    data = np.full((3, 20, 30), 70, dtype=np.uint8)
    tiff = write_raster(tmp_path / "custom.tiff", data, crs=lcc)
    img = write_raster(tmp_path / "x.img", data, driver="HFA")
    vrt = tmp_path / "x.vrt"
    vrt.write_text(textwrap.dedent(f"""\
        <VRTDataset rasterXSize="30" rasterYSize="20">
          <GeoTransform>500000, 0.5, 0, 4100000, 0, -0.5</GeoTransform>
          <VRTRasterBand dataType="Byte" band="1">
            <SimpleSource><SourceFilename>{tiff}</SourceFilename><SourceBand>1</SourceBand>
            </SimpleSource>
          </VRTRasterBand>
        </VRTDataset>"""))
    with open_raster(tiff) as r:
        d = r.describe()
        assert d["crs"]["epsg"] is None and d["crs"]["units"] == "metre"
        assert "Lambert" in d["crs"]["name"] or "unknown" in d["crs"]["name"].lower()
        assert r.read((0, 0, 30, 20))[1].all()
    with open_raster(img) as r:
        assert r.crs.to_epsg() == 32614 and r.read((0, 0, 30, 20))[0].shape == (20, 30, 3)
    with open_raster(vrt, scale="none") as r:
        assert r.crs is None and r.band_indexes == (1,) and r.describe()["crs"] is None
        assert r.read((0, 0, 5, 5))[0][0, 0].tolist() == [70, 70, 70]


def test_errors_are_one_clear_sentence(tmp_path):
    with pytest.raises(TerrasamError, match=r"raster file '.*nope\.tif' does not exist\."):
        open_raster(tmp_path / "nope.tif")
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    with pytest.raises(TerrasamError, match=r"'.*notes\.tif' is not a raster GDAL can read"):
        open_raster(text)
    with pytest.raises(TerrasamError, match="is a folder, not a raster file"):
        open_raster(tmp_path)
    path = _bands_raster(tmp_path, 4)
    with pytest.raises(TerrasamError,
                       match=r"^band 5 is out of range: 'b\.tif' has 4 bands \(1-4\)\.$"):
        open_raster(path, bands=(4, 5, 1))
    with pytest.raises(TerrasamError, match="band 0 is out of range"):
        open_raster(path, bands=(0,))
    with pytest.raises(TerrasamError, match="--bands takes 1 to 3 band numbers, got 4"):
        open_raster(path, bands=(1, 2, 3, 4))
    with pytest.raises(TerrasamError, match="scale must be one of percentile, minmax, none"):
        open_raster(path, scale="gamma")
    with pytest.raises(TerrasamError, match="percentiles must be two numbers"):
        open_raster(path, percentiles=(98, 2))
    with pytest.raises(TerrasamError, match="--bands must be comma-separated"):
        parse_bands("4;3")


def test_reader_pickles_by_path_and_keeps_its_scaling(tmp_path):
    scene = make_scene(64, 64, dtype="uint16", path=tmp_path / "p.tif")
    r = open_raster(scene.path, bands=(3, 2, 1))
    lo = r.scaling.lo.copy()
    clone = pickle.loads(pickle.dumps(r))
    assert clone._ds is None and clone._scaling is not None
    np.testing.assert_array_equal(clone.scaling.lo, lo)
    a, _ = r.read((5, 5, 20, 20))
    b, _ = clone.read((5, 5, 20, 20))
    np.testing.assert_array_equal(a, b)
    r.close()
    clone.close()


def test_describe_is_json(tmp_path):
    scene = make_scene(64, 64, crs=UTM, transform=utm_transform(0.25), nodata_border=2,
                       path=tmp_path / "d.tif")
    with open_raster(scene.path) as r:
        d = json.loads(json.dumps(r.describe()))
    assert (d["width"], d["height"], d["count"], d["dtype"]) == (64, 64, 3, "uint8")
    assert d["crs"]["epsg"] == 32614 and d["res"] == [0.25, 0.25]
    assert d["nodata"] == 0 and d["scaling"]["source"] == "all pixels"


# -- memory: the whole raster is never read --------------------------------------------------

MEMORY_SCRIPT = """
import json, sys
from terrasam.raster import open_raster
from terrasam.tiling import make_grid

def peak_mb():
    # VmHWM is this process image's peak RSS (ru_maxrss would include the parent's at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

r = open_raster(sys.argv[1])
scaling = r.scaling
grid = make_grid(r.width, r.height, r.transform, tile_size=1024, overlap=256)
tiles = grid.with_data(r)
for t in tiles[:3] + tiles[-3:]:
    rgb, valid = t.read(r)
    assert rgb.shape == (1024, 1024, 3) and valid.any()
rgb, valid, _ = r.read_overview(max_size=512)
print(json.dumps({"tiles": len(grid.tiles), "with_data": len(tiles), "lo": list(scaling.lo),
                  "hi": list(scaling.hi), "overview_valid": float(valid.mean()),
                  "peak_mb": peak_mb()}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_large_raster_is_processed_at_bounded_memory(tmp_path):
    path = write_large_raster(tmp_path / "big.tif", 20_000, 20_000, empty_fraction=0.4)
    in_memory_mb = 20_000 * 20_000 * 3 / 2**20  # 1144 MB as uint8
    env = {**os.environ, "GDAL_CACHEMAX": "128"}  # GDAL's own block cache, in MB
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path)], env=env,
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # 26 x 26 tiles; the 9 left tile columns lie wholly in the unwritten 7680 px
    assert (res["tiles"], res["with_data"]) == (676, 17 * 26)
    assert res["lo"] == [30, 30, 30] and res["hi"] == [205, 205, 205]
    assert 0.55 < res["overview_valid"] < 0.65
    assert res["peak_mb"] < in_memory_mb / 3, res


# -- the synthetic scenes themselves (other modules' tests rely on their truth) --------------

@pytest.mark.parametrize("kind", ["utm", "wgs84", "rotated"])
def test_synth_scene_truth_is_consistent(tmp_path, kind):
    from synth import WGS84, rotated_transform

    kwargs = {"utm": {}, "wgs84": {"crs": WGS84},
              "rotated": {"transform": rotated_transform(30.0, 0.5)}}[kind]
    scene = make_scene(160, 120, nodata_border=2, path=tmp_path / f"{kind}.tif", **kwargs)
    assert len(set(scene.colours.values()) | {scene.background}) == len(scene.colours) + 1
    pixel_area = abs(scene.transform.determinant)
    for label, poly in scene.pixel_polygons.items():
        assert poly.area == (scene.labels == label).sum()
        assert scene.polygons[label].area == pytest.approx(poly.area * pixel_area)
    assert len(scene.pixel_polygons[2].interiors) == 1  # the ring keeps its hole
    with open_raster(scene.path, scale="none") as r:
        assert r.res == pytest.approx((abs(scene.transform.a) if kind != "rotated" else 0.5,) * 2)
        assert r.crs.to_epsg() == (4326 if kind == "wgs84" else 32614)
        rgb, valid = r.read((0, 0, 160, 120))
    np.testing.assert_array_equal(valid, scene.valid)
    np.testing.assert_array_equal(rgb, scene.rgb.transpose(1, 2, 0))


# -- read errors and --gsd ----------------------------------------------------------------
@pytest.fixture
def cut_cog(tmp_path, sample_raster):
    """A COG (header first) cut short: it opens, but its tiles cannot be read."""
    import rasterio

    whole = tmp_path / "whole.tif"
    with rasterio.open(sample_raster) as ds:
        profile = {"driver": "COG", "width": ds.width, "height": ds.height, "count": ds.count,
                   "dtype": "uint8", "crs": ds.crs, "transform": ds.transform,
                   "compress": "deflate", "blocksize": 256}
        with rasterio.open(whole, "w", **profile) as dst:
            dst.write(ds.read())
    data = whole.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 3])
    whole.unlink()
    return cut


def test_a_read_error_names_the_file_and_the_window(cut_cog):
    reader = open_raster(cut_cog, scale="none")
    with pytest.raises(TerrasamError) as err:
        reader.read(Window(256, 256, 256, 256))
    text = str(err.value)
    assert text.startswith(f"cannot read the window cols 256-512, rows 256-512 of {cut_cog}: ")
    assert "IReadBlock failed" in text and "\n" not in text
    with pytest.raises(TerrasamError, match=r"cannot read the window .* of .*cut\.tif"):
        open_raster(cut_cog).scaling  # noqa: B018 - the statistics read


def test_info_and_segment_on_a_truncated_file_are_one_sentence(cut_cog, tmp_path):
    from click.testing import CliRunner

    from terrasam.cli import main

    result = CliRunner().invoke(main, ["info", str(cut_cog)])
    assert result.exit_code == 1
    assert result.output.startswith("terrasam: error: cannot read the window ")
    assert str(cut_cog) in result.output and len(result.output.splitlines()) == 1
    from oracle import OracleAdapter
    from terrasam import api

    out = tmp_path / "out.gpkg"
    with pytest.raises(TerrasamError, match=r"cannot read .* of .*cut\.tif"):
        api.segment(cut_cog, out, adapter=OracleAdapter(), tile_size=128, overlap=32,
                    scale="none", quiet=True)
    assert not out.exists()
    # only the resumable work directory stays (by design, for a rerun), no partial output
    # the first tile failed: no finished tile, so no work directory is left to resume from
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tif"]


def test_gsd_is_refused_on_a_raster_without_crs(tmp_path):
    from click.testing import CliRunner

    from terrasam.cli import main

    path = write_raster(tmp_path / "nocrs.tif", np.zeros((3, 32, 32), np.uint8), crs=None,
                        transform=None)
    result = CliRunner().invoke(main, ["info", str(path), "--gsd", "1"])
    assert result.exit_code == 1
    assert result.output == ("terrasam: error: --gsd is in metres, but nocrs.tif has no CRS, "
                             "so its pixels have no ground size; leave out --gsd (or give the "
                             "raster a CRS).\n")
    assert CliRunner().invoke(main, ["info", str(path)]).exit_code == 0
    from oracle import OracleAdapter
    from terrasam import api

    with pytest.raises(TerrasamError, match="--gsd is in metres, but nocrs.tif has no CRS"):
        api.segment(path, tmp_path / "o.gpkg", adapter=OracleAdapter(), gsd=1.0, quiet=True)
    assert not (tmp_path / "o.gpkg").exists()
