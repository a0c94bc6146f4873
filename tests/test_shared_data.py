"""Smoke tests on the real rasters in ../shared/data (skipped when the folder is absent)."""

from __future__ import annotations

import numpy as np
import pyogrio
import pytest
import rasterio
from rasterio.windows import Window

from terrasam import io, vectorize
from terrasam.raster import open_raster


@pytest.mark.parametrize("name, band, epsg", [("naip_2020_5m.tif", 4, 26914),
                                               ("landsat_2020.tif", 1, 4326)])
def test_thresholded_band_vectorizes_to_the_same_area(shared_data, tmp_path, name, band, epsg):
    path = shared_data / name
    with rasterio.open(path) as ds:
        data = ds.read(band, window=Window(0, 0, ds.width, ds.height))
        transform, crs = ds.transform, ds.crs
        valid = data != ds.nodata
    # dark pixels of the band (water in NIR / the river in Landsat's first band)
    mask = valid & (data < np.percentile(data[valid], 10))
    polys = vectorize.mask_to_polygons(mask, transform)
    assert len(polys) > 0 and all(p.is_valid for p in polys)
    # exact pixel-edge polygons: their area is the pixel count times the pixel area
    pixel_area = abs(transform.a * transform.e - transform.b * transform.d)
    total = sum(p.area for p in polys)
    assert total == pytest.approx(mask.sum() * pixel_area, rel=1e-9)
    gdf = vectorize.to_frame(polys, crs)
    if epsg == 26914:  # metres already
        assert gdf.area_m2.sum() == pytest.approx(mask.sum() * 25.0, rel=1e-9)
    else:  # geodesic: 30 m-ish Landsat pixels near the equator
        per_pixel = gdf.area_m2.sum() / mask.sum()
        assert 100 < per_pixel < 10_000
    out = io.write_vectors(gdf, tmp_path / "dark.gpkg", io.make_provenance(input=path))
    back = pyogrio.read_dataframe(out)
    assert back.crs.to_epsg() == epsg and len(back) == len(gdf)
    assert io.read_provenance(out)["input"]["name"] == name


def test_reader_matches_rasterio_on_naip(shared_data):
    with open_raster(shared_data / "naip_2020_5m.tif") as reader, \
            rasterio.open(shared_data / "naip_2020_5m.tif") as ds:
        rgb, valid = reader.read(Window(100, 200, 256, 256))
        raw = ds.read([1, 2, 3], window=Window(100, 200, 256, 256))
        assert rgb.shape == (256, 256, 3) and valid.shape == (256, 256)
        assert np.array_equal(valid, ~np.all(raw == 0, axis=0))
        # global percentile scaling is monotone per band: ordering of raw values is kept
        lo, hi = reader.scaling.lo[0], reader.scaling.hi[0]
        expected = np.clip((raw[0].astype(float) - lo) / (hi - lo) * 255, 0, 255)
        assert np.abs(rgb[..., 0][valid].astype(float) - expected[valid]).max() <= 1.0
