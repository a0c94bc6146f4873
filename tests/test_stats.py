"""Per-object raster statistics: exact values, partial pixels, nodata, band expressions."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import shapely

import synth
from terrasam.errors import TerrasamError
from terrasam.stats import ZonalStats, parse_indexes, parse_stats

H, W = 40, 48
PIXEL = 0.5


@pytest.fixture(scope="module")
def raster(tmp_path_factory):
    """4 uint16 bands of random values; 65535 is nodata (in every band at (10, 10), in band
    2 alone at (12, 7)); band 1 equals band 4 at (14, 9) so that b4 - b1 = 0 there."""
    rng = np.random.default_rng(7)
    data = rng.integers(1, 4000, (4, H, W)).astype(np.uint16)
    data[:, 10, 10] = 65535
    data[1, 12, 7] = 65535
    data[0, 14, 9] = data[3, 14, 9]
    transform = synth.utm_transform(PIXEL)
    path = synth.write_raster(tmp_path_factory.mktemp("stats") / "bands.tif", data,
                              transform=transform, nodata=65535)
    return path, data.astype(np.float64), transform


def coverage(pixel_geom) -> np.ndarray:
    """Exact fraction of every pixel covered by a geometry in (col, row) coordinates."""
    rows, cols = np.mgrid[0:H, 0:W]
    cells = shapely.box(cols.ravel(), rows.ravel(), cols.ravel() + 1, rows.ravel() + 1)
    return shapely.area(shapely.intersection(cells, pixel_geom)).reshape(H, W)


def truth(values, weights):
    """Coverage-weighted statistics (what exactextract computes) from first principles."""
    w = weights.ravel()
    v = values.ravel()
    keep = w > 0
    w, v = w[keep], v[keep]
    mean = np.sum(w * v) / np.sum(w)
    return {"mean": mean, "std": np.sqrt(np.sum(w * (v - mean) ** 2) / np.sum(w)),
            "min": v.min(), "max": v.max(), "count": np.sum(w), "sum": np.sum(w * v),
            "median": weighted_quantile(v, w, 0.5)}


def weighted_quantile(v, w, q):
    """The weighted form of the usual (type 7) quantile over the distinct values (the weights
    of equal values summed): s_k = k w_k + (n - 1) sum_{i<k} w_i, interpolated linearly at
    q * s_n (with equal weights and distinct values this is numpy's quantile)."""
    v, group = np.unique(v, return_inverse=True)
    w = np.bincount(group, weights=w)
    n = len(v)
    s = np.arange(n) * w + (n - 1) * np.r_[0.0, np.cumsum(w)[:-1]]
    h = q * s[-1]
    k = int(np.searchsorted(s, h, side="right")) - 1
    if k >= n - 1:
        return v[-1]
    return v[k] + (h - s[k]) * (v[k + 1] - v[k]) / (s[k + 1] - s[k])


# a box over whole pixels, one cut through pixels on every side, and a rotated diamond
SHAPES = [shapely.box(2, 3, 9, 8), shapely.box(5.5, 8.0, 12.25, 15.5),
          shapely.affinity.rotate(shapely.box(20, 20, 30, 30), 30, origin=(25, 25))]


def test_statistics_equal_the_truth_including_partial_pixels(raster):
    path, data, transform = raster
    geoms = np.array([synth.pixel_to_crs(g, transform) for g in SHAPES], dtype=object)
    stats = ("mean", "std", "min", "max", "median", "count", "sum")
    zs = ZonalStats(path, bands=(1, 2, 3, 4), stats=stats)
    out = zs(geoms)
    assert zs.columns[:7] == [f"b1_{s}" for s in stats] and len(zs.columns) == 28
    for k, g in enumerate(SHAPES):
        cov = coverage(g)
        assert ((cov > 0) & (cov < 1)).any() == (k > 0)  # partial pixels in the last two
        for b in range(4):
            valid = data[b] != 65535
            expected = truth(data[b], cov * valid)
            for s in stats:
                assert out[f"b{b + 1}_{s}"][k] == pytest.approx(expected[s], rel=1e-8), (k, b, s)
    # the cut box covers 7 x 7.5 pixels minus the fully covered nodata pixel at (10, 10)
    assert out["b1_count"][1] == pytest.approx(6.75 * 7.5 - 1)
    assert out["b2_count"][1] == pytest.approx(6.75 * 7.5 - 2)  # and (12, 7) in band 2
    assert out["b1_count"][0] == 35.0  # whole pixels count whole


def test_a_band_expression_is_computed_per_pixel_then_summarised(raster):
    path, data, transform = raster
    indexes = parse_indexes(["ndvi=(b4-b1)/(b4+b1)", "ratio = b3 / (b4 - b1)"], 4)
    zs = ZonalStats(path, indexes=indexes, stats=("mean", "count", "max"))
    assert zs.columns == ["ndvi_mean", "ndvi_count", "ndvi_max", "ratio_mean", "ratio_count",
                          "ratio_max"]
    g = SHAPES[1]
    out = zs(np.array([synth.pixel_to_crs(g, transform)], dtype=object))
    cov = coverage(g)
    b1, b3, b4 = data[0], data[2], data[3]
    valid = (b1 != 65535) & (b4 != 65535)
    ndvi = np.where(valid, (b4 - b1) / (b4 + b1), 0)
    assert out["ndvi_mean"][0] == pytest.approx(truth(ndvi, cov * valid)["mean"], rel=1e-9)
    # b4 - b1 = 0 at (14, 9): division by zero is left out like nodata
    finite = valid & (b4 != b1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(finite, b3 / (b4 - b1), 0)
    assert cov[14, 9] == 1.0
    assert out["ratio_count"][0] == pytest.approx(np.sum(cov * finite))
    assert out["ratio_mean"][0] == pytest.approx(truth(ratio, cov * finite)["mean"], rel=1e-9)


def test_large_objects_are_read_in_pieces_with_the_same_result(raster):
    path, data, transform = raster
    g = np.array([synth.pixel_to_crs(shapely.box(0.5, 0.5, 47.5, 39.5), transform)], object)
    whole = ZonalStats(path, bands=(1,), stats=("mean", "count"))(g)
    pieces = ZonalStats(path, bands=(1,), stats=("mean", "count"), max_cells=128)
    reads = []
    original = pieces.window

    def spy(*window):
        reads.append(window)
        return original(*window)

    pieces.window = spy
    out = pieces(g)
    assert max(nx * ny for _, _, nx, ny in reads) <= 128 and len(reads) > 15
    assert out["b1_mean"][0] == pytest.approx(whole["b1_mean"][0], rel=1e-12)
    assert out["b1_count"][0] == pytest.approx(47 * 39 - 1)


def test_a_nodata_value_given_to_the_run_and_a_rotated_raster(tmp_path):
    data = np.arange(20 * 30, dtype=np.float32).reshape(1, 20, 30)
    data[0, 5, 5] = np.nan
    transform = synth.rotated_transform(angle=30.0, pixel_size=2.0)
    path = synth.write_raster(tmp_path / "rot.tif", data, transform=transform)
    g = shapely.box(3, 2, 9, 8)  # pixels (col 3..8, row 2..7): holds the NaN and value 127
    zs = ZonalStats(path, bands=(1,), stats=("count", "min", "max"), nodata=127)
    out = zs(np.array([synth.pixel_to_crs(g, transform), None], dtype=object))
    assert out["b1_count"][0] == pytest.approx(36 - 2)  # NaN and the user's nodata
    assert out["b1_min"][0] == 63 and out["b1_max"][0] == 7 * 30 + 8
    assert np.isnan(out["b1_count"][1])  # a removed object has no statistics


def test_an_object_over_nodata_only_gets_nan(raster):
    path, _, transform = raster
    g = synth.pixel_to_crs(shapely.box(10, 10, 11, 11), transform)
    out = ZonalStats(path, bands=(1,), stats=("mean", "count"))(np.array([g], object))
    assert np.isnan(out["b1_mean"][0])
    assert out["b1_count"][0] == 0 or np.isnan(out["b1_count"][0])


def test_statistic_names_and_expressions_are_checked():
    assert parse_stats("mean, STD,stdev,median") == ("mean", "std", "median")
    with pytest.raises(TerrasamError, match="unknown statistic 'avg'"):
        parse_stats("mean,avg")
    with pytest.raises(TerrasamError, match="NAME=EXPRESSION"):
        parse_indexes(["(b4-b1)/(b4+b1)"])
    with pytest.raises(TerrasamError, match="not a band name"):
        parse_indexes(["b2=b1*2"])
    with pytest.raises(TerrasamError, match="unknown column 'b5'"):
        parse_indexes(["ndvi=(b5-b1)/(b5+b1)"], 4)
    with pytest.raises(TerrasamError, match="attribute"):
        parse_indexes(["x=b1.__class__"], 4)
    with pytest.raises(TerrasamError, match="reads no band"):
        parse_indexes(["one=1+1"], 4)


def test_bands_out_of_range_are_refused(raster):
    path = raster[0]
    with pytest.raises(TerrasamError, match="band 5 is out of range"):
        ZonalStats(path, bands=(5,))
    with pytest.raises(TerrasamError, match="--index x: band 9 is out of range"):
        ZonalStats(path, indexes=parse_indexes(["x=b9+b1"]))


def test_an_alpha_band_and_a_nodata_value_both_mask(tmp_path):
    data = np.full((4, 10, 10), 100, np.uint8)
    data[3] = 255
    data[3, 2, 2:6] = 0  # four transparent pixels
    data[0, 5, 5] = 7  # nodata in band 1
    path = synth.write_raster(tmp_path / "rgba.tif", data, nodata=7,
                              colorinterp=("red", "green", "blue", "alpha"))
    transform = synth.utm_transform()
    g = synth.pixel_to_crs(shapely.box(0, 0, 10, 10), transform)
    out = ZonalStats(path, bands=(1, 2), stats=("count",))(np.array([g], object))
    assert out["b1_count"][0] == 100 - 4 - 1 and out["b2_count"][0] == 100 - 4


def test_a_read_error_is_one_sentence_naming_the_file(tmp_path):
    # blocks that GDAL cannot decode, met inside exactextract: one sentence, not its error
    import corpus

    src = corpus.geotiff(tmp_path / "whole.tif", corpus.labels_of(height=128, width=128))
    bad = corpus.corrupt_tile(src, tmp_path / "bad.tif", tile=1)  # blocks of 64 px: cols 64-128
    zs = ZonalStats(bad, bands=(1,), stats=("mean",))  # opening reads no block
    with rasterio.open(src) as ds:
        t = ds.transform
    left = synth.pixel_to_crs(shapely.box(2, 2, 30, 30), t)
    assert zs(np.array([left], dtype=object))["b1_mean"][0] >= 0  # a good block reads
    right = synth.pixel_to_crs(shapely.box(70, 2, 100, 30), t)
    with pytest.raises(TerrasamError) as e:
        zs(np.array([left, right], dtype=object))
    message = str(e.value)
    assert message.startswith(f"cannot read {bad} for --stats: ") and message.endswith(".")
    assert "\n" not in message and "exactextract" not in message.lower(), message
