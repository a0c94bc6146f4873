"""Vectorizer: exact pixel-edge polygons, holes, connectivity, cleaning, metres, tables."""

from __future__ import annotations

import time

import numpy as np
import pyproj
import pytest
import shapely
from affine import Affine

from corpus import lonlat_box_area
from terrasam.errors import TerrasamError
from terrasam.vectorize import (
    clean,
    labels_to_geometries,
    mask_to_geometry,
    mask_to_polygons,
    measure,
    parse_area,
    parse_length,
    raster_footprint,
    to_frame,
)

UTM = Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 4_000_000.0)  # EPSG:32614, 0.5 m pixels
GEO = Affine(1e-4, 0.0, -99.0, 0.0, -1e-4, 35.0)  # EPSG:4326, ~10 m pixels at 35° N
ROTATED = Affine.translation(300_000.0, 5_000_000.0) @ Affine.rotation(30) @ Affine.scale(2, -2)
SHEARED = Affine.translation(1000.0, 2000.0) @ Affine.shear(15, 5) @ Affine.scale(1.5, -1.0)


def iou(a, b) -> float:
    return shapely.intersection(a, b).area / shapely.union(a, b).area


def quad(transform, c0, r0, c1, r1):
    """The exact CRS polygon of the pixel block [c0, c1) x [r0, r1): its four corners mapped."""
    return shapely.Polygon([transform @ (c0, r0), transform @ (c1, r0), transform @ (c1, r1),
                            transform @ (c0, r1)])


def pixel_union(mask, transform):
    """Truth for any mask: the union of each True pixel's square, corners mapped analytically."""
    rows, cols = np.nonzero(mask)
    squares = [quad(transform, c, r, c + 1, r + 1) for r, c in zip(rows, cols)]
    return shapely.union_all(squares)


def holes(geom) -> int:
    return sum(len(p.interiors) for p in shapely.get_parts(geom))


def ring_mask(shape=(60, 80), outer=(10, 10, 70, 50), inner=(25, 20, 45, 35)):
    mask = np.zeros(shape, bool)
    c0, r0, c1, r1 = outer
    mask[r0:r1, c0:c1] = True
    c0, r0, c1, r1 = inner
    mask[r0:r1, c0:c1] = False
    return mask


def local_equal_area(geom_lonlat):
    """Area and perimeter in a Lambert azimuthal equal-area projection centred on the shape."""
    c = geom_lonlat.centroid
    laea = pyproj.CRS.from_proj4(f"+proj=laea +lat_0={c.y} +lon_0={c.x} +datum=WGS84 +units=m")
    tr = pyproj.Transformer.from_crs("EPSG:4326", laea, always_xy=True)
    projected = shapely.transform(shapely.segmentize(geom_lonlat, 1e-5),
                                  lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
    return projected.area, projected.length


# --------------------------------------------------------------------------- geometry


TRANSFORMS = pytest.mark.parametrize(
    "transform", [UTM, GEO, ROTATED, SHEARED], ids=["utm", "4326", "rot", "shear"]
)


@TRANSFORMS
def test_rectangle_is_exact_pixel_edges(transform):
    mask = np.zeros((40, 50), bool)
    mask[10:30, 5:45] = True
    geom = mask_to_geometry(mask, transform)
    truth = quad(transform, 5, 10, 45, 30)
    assert geom.geom_type == "Polygon" and geom.is_valid
    assert iou(geom, truth) >= 0.999
    assert geom.area == pytest.approx(truth.area, rel=1e-9)
    assert shapely.hausdorff_distance(geom, truth) < 1e-6 * max(abs(transform.a), 1)


@TRANSFORMS
def test_ring_keeps_its_hole(transform):
    mask = ring_mask()
    geom = mask_to_geometry(mask, transform)
    truth = quad(transform, 10, 10, 70, 50).difference(quad(transform, 25, 20, 45, 35))
    assert geom.geom_type == "Polygon" and geom.is_valid
    assert holes(geom) == 1
    assert iou(geom, truth) >= 0.999
    assert geom.area == pytest.approx(truth.area, rel=1e-9)


def test_diagonal_staircase_matches_pixel_squares():
    rows, cols = np.mgrid[0:64, 0:64]
    mask = (cols > rows) & (cols < rows + 20)  # a diagonal band one staircase wide
    for transform in (UTM, ROTATED):
        geom = mask_to_geometry(mask, transform)
        truth = pixel_union(mask, transform)
        assert geom.is_valid
        assert iou(geom, truth) >= 0.999
        assert geom.area == pytest.approx(mask.sum() * abs(transform.determinant), rel=1e-9)


def test_nested_rings_and_island_in_hole():
    mask = ring_mask(shape=(80, 80), outer=(5, 5, 75, 75), inner=(20, 20, 60, 60))
    mask[30:50, 30:50] = True  # island inside the hole
    mask[38:42, 38:42] = False  # with its own hole
    geom = mask_to_geometry(mask, UTM)
    assert geom.geom_type == "MultiPolygon" and len(geom.geoms) == 2
    assert holes(geom) == 2
    assert iou(geom, pixel_union(mask, UTM)) >= 0.999


def test_empty_mask_gives_none():
    assert mask_to_geometry(np.zeros((10, 10), bool), UTM) is None
    assert len(mask_to_polygons(np.zeros((10, 10), bool), UTM)) == 0


def test_connectivity_4_vs_8():
    mask = np.zeros((10, 10), bool)
    mask[2, 2] = mask[3, 3] = mask[4, 4] = True  # a diagonal chain touching at corners
    mask[7:9, 7:9] = True  # and a separate block
    eight = mask_to_polygons(mask, UTM, connectivity=8)
    four = mask_to_polygons(mask, UTM, connectivity=4)
    assert len(eight) == 2 and len(four) == 4
    assert all(g.is_valid for g in np.concatenate([eight, four]))
    assert sorted(shapely.area(eight)) == pytest.approx([0.75, 1.0])
    # one object: the same pixels whatever the connectivity
    a, b = mask_to_geometry(mask, UTM, 4), mask_to_geometry(mask, UTM, 8)
    assert a.is_valid and b.is_valid and a.symmetric_difference(b).area == 0
    with pytest.raises(TerrasamError, match="connectivity must be 4 or 8"):
        mask_to_geometry(mask, UTM, connectivity=6)


def test_labels_to_geometries_multi_part_and_background():
    labels = np.zeros((40, 40), np.uint32)
    labels[0:10, 0:10] = 1
    labels[30:40, 30:40] = 1  # second part of label 1
    labels[0:10, 10:20] = 2  # touches label 1 along an edge
    labels[20, 20] = labels[21, 21] = 7  # corner-touching pixels
    geoms = labels_to_geometries(labels, UTM)
    assert sorted(geoms) == [1, 2, 7]
    assert geoms[1].geom_type == "MultiPolygon" and len(geoms[1].geoms) == 2
    assert all(g.is_valid for g in geoms.values())
    for value, geom in geoms.items():
        assert iou(geom, pixel_union(labels == value, UTM)) >= 0.999
    four = labels_to_geometries(labels, UTM, connectivity=4)
    assert four[7].symmetric_difference(geoms[7]).area == 0


def test_labels_beyond_int32_and_non_integer_rejected():
    labels = np.zeros((8, 8), np.uint32)
    labels[1:3, 1:3] = 3_000_000_000
    labels[5:7, 5:7] = 5
    geoms = labels_to_geometries(labels, UTM)
    assert sorted(geoms) == [5, 3_000_000_000]
    assert geoms[3_000_000_000].area == pytest.approx(4 * 0.25)
    with pytest.raises(TerrasamError, match="labels must be integers"):
        labels_to_geometries(labels.astype(np.float32), UTM)


def test_thousands_of_labels_in_one_pass():
    # 3,000 labels of 4x5 pixels, some split in two parts, over a 240x250 image
    block = np.arange(1, 3001, dtype=np.int64).reshape(60, 50)
    labels = np.kron(block, np.ones((4, 5), np.int64))
    labels[labels % 97 == 0] = 0
    labels[0:2, :] = 0
    labels[200:240, 0:5] = labels[0, 0] or 1  # a far-away part of label 1
    labels[2:4, 0:5] = 1
    t0 = time.perf_counter()
    geoms = labels_to_geometries(labels, UTM)
    elapsed = time.perf_counter() - t0
    values, counts = np.unique(labels[labels != 0], return_counts=True)
    assert sorted(geoms) == values.tolist()
    areas = np.array([geoms[v].area for v in values])
    np.testing.assert_allclose(areas, counts * 0.25)
    assert geoms[1].geom_type == "MultiPolygon"
    assert elapsed < 5.0


# --------------------------------------------------------------------------- measuring


def test_measure_utm_exact():
    geom = mask_to_geometry(ring_mask(), UTM)  # 60x40 minus 15x20 pixels of 0.5 m
    area, perimeter = measure([geom, None], "EPSG:32614")
    assert area[0] == pytest.approx((60 * 40 - 15 * 20) * 0.25, rel=1e-12)
    assert perimeter[0] == pytest.approx(2 * (30 + 20) + 2 * (7.5 + 10), rel=1e-12)
    assert np.isnan(area[1]) and np.isnan(perimeter[1])


def test_measure_us_survey_feet():
    transform = Affine(2.0, 0.0, 2_000_000.0, 0.0, -2.0, 10_000_000.0)
    mask = np.zeros((60, 110), bool)
    mask[5:55, 5:105] = True  # 200 x 100 US survey feet
    geom = mask_to_geometry(mask, transform)
    area, perimeter = measure([geom], "EPSG:2277")  # NAD83 / Texas Central (ftUS)
    foot = 1200 / 3937
    assert area[0] == pytest.approx(200 * 100 * foot**2, rel=1e-9)
    assert perimeter[0] == pytest.approx(600 * foot, rel=1e-9)


def test_measure_geographic_against_local_equal_area():
    geom = mask_to_geometry(ring_mask(), GEO)
    truth = quad(GEO, 10, 10, 70, 50).difference(quad(GEO, 25, 20, 45, 35))
    area, perimeter = measure([geom], "EPSG:4326")
    true_area, true_perimeter = local_equal_area(truth)
    assert area[0] == pytest.approx(true_area, rel=1e-3)
    assert perimeter[0] == pytest.approx(true_perimeter, rel=1e-3)
    outer_only = measure([shapely.Polygon(geom.exterior)], "EPSG:4326")[0][0]
    assert outer_only > area[0] * 1.1  # the hole is subtracted


def test_measure_web_mercator_is_geodesic():
    t = Affine(10.0, 0.0, 1_000_000.0, 0.0, -10.0, 8_400_000.0)  # ~60° N: scale 2
    mask = np.zeros((30, 30), bool)
    mask[5:25, 5:25] = True
    geom = mask_to_geometry(mask, t)
    area, _ = measure([geom], "EPSG:3857")
    to_lonlat = pyproj.Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
    lonlat = shapely.transform(geom, lambda xy: np.column_stack(to_lonlat.transform(*xy.T)))
    assert area[0] == pytest.approx(local_equal_area(lonlat)[0], rel=1e-3)
    assert area[0] < 0.3 * geom.area  # planar Mercator area would be ~4x too big


@pytest.mark.parametrize("bounds", [
    (0, 40, 10, 50),  # edges along parallels, not geodesics
    (-170, 10, 170, 60),  # wider than half the globe: as one geodesic ring it came out small
    (0, -90, 10, -80),  # down to the pole
    (175, -2.8, 187.8, 10),  # across the antimeridian (longitudes past 180)
    (-180, -90, 180, 90),  # the whole ellipsoid
])
def test_measure_large_lonlat_rectangles_exactly(bounds):
    area, _ = measure([shapely.box(*bounds)], "EPSG:4326")
    assert area[0] == pytest.approx(lonlat_box_area(*bounds), rel=1e-6)


def test_a_wide_object_with_a_hole_never_has_a_negative_area():
    # before: the exterior's edges, over 180 degrees long, were taken the short way round the
    # globe, and the area came out at -2.2e14 m2
    outer, hole = (-179, -80, 179, 80), (-100, -70, 100, 70)
    geom = shapely.Polygon(shapely.box(*outer).exterior.coords,
                           [shapely.box(*hole).exterior.coords])
    area, perimeter = measure([geom], "EPSG:4326")
    assert area[0] == pytest.approx(lonlat_box_area(*outer) - lonlat_box_area(*hole), rel=1e-6)
    assert perimeter[0] > 0
    # a ring one hair past the pole ends at the pole instead of giving NaN
    assert measure([shapely.box(0, -90.0000001, 10, -80)], "EPSG:4326")[0][0] == \
        pytest.approx(lonlat_box_area(0, -90, 10, -80), rel=1e-6)


def test_small_geographic_areas_equal_pyproj_geodesic_areas():
    geom = mask_to_geometry(ring_mask(), GEO)
    area, perimeter = measure([geom], "EPSG:4326")
    geod = pyproj.Geod(ellps="WGS84")
    assert area[0] == pytest.approx(abs(geod.geometry_area_perimeter(geom)[0]), rel=1e-9)
    rings = [geom.exterior, *geom.interiors]  # pyproj leaves the holes out of the perimeter
    assert perimeter[0] == pytest.approx(
        sum(geod.geometry_area_perimeter(shapely.Polygon(r))[1] for r in rings), rel=1e-9)


@pytest.mark.parametrize("transform", [GEO, ROTATED], ids=["north-up", "rotated"])
def test_clean_cuts_objects_to_the_raster_footprint(transform):
    # a 40 x 30 raster; the object reaches 5 pixels past its right and bottom edges (a
    # resampled grid's last pixel does), and smoothing pushes outlines outward as well
    footprint = raster_footprint(transform, 40, 30)
    mask = np.zeros((40, 50), bool)
    mask[10:35, 20:45] = True
    geom = mask_to_geometry(mask, transform)
    for options in ({}, {"smooth": "3px"}, {"regularize": True}, {"simplify": 2}):
        out = clean([geom, None], footprint=footprint, pixel_size=(2.0, 2.0), **options)
        assert out[1] is None and out[0].is_valid
        xy = shapely.get_coordinates(out[0])
        x0, y0, x1, y1 = footprint.bounds
        if transform is GEO:  # exactly: no coordinate past the raster's bounds
            assert xy[:, 0].min() >= x0 and xy[:, 0].max() <= x1, options
            assert xy[:, 1].min() >= y0 and xy[:, 1].max() <= y1, options
        else:
            assert footprint.buffer(1e-6).covers(out[0]), options
        if not options:  # the part inside is kept whole: 20 x 20 pixels
            assert out[0].area == pytest.approx(20 * 20 * abs(transform.determinant), rel=1e-9)
    inside = mask_to_geometry(mask[:25, :35], transform)
    assert clean([inside], footprint=footprint)[0].equals_exact(inside, 0)  # untouched


# --------------------------------------------------------------------------- cleaning


def test_parse_units():
    assert parse_length(3) == (3.0, "px")
    assert parse_length("2px") == (2.0, "px")
    assert parse_length("0.5m") == (0.5, "m")
    assert parse_length("50cm") == (0.5, "m")
    assert parse_area("20m2") == (20.0, "m2")
    assert parse_area("0.5ha") == (5000.0, "m2")
    assert parse_area("1e3 m²") == (1000.0, "m2")
    with pytest.raises(TerrasamError, match=r"unknown unit 'parsecs' in '3parsecs'"):
        parse_length("3parsecs")
    with pytest.raises(TerrasamError, match="cannot read 'big' as an area"):
        parse_area("big")
    with pytest.raises(TerrasamError, match="non-negative"):
        parse_length(-1)


def test_simplify_pixels_and_metres_agree_and_stay_valid():
    rows, cols = np.mgrid[0:80, 0:80]
    mask = (cols + rows < 90) & (cols > 5) & (rows > 5)  # a triangle with a staircase edge
    geom = mask_to_geometry(mask, UTM)
    smooth = shapely.Polygon([UTM @ (6, 6), UTM @ (84, 6), UTM @ (6, 84)])
    in_pixels = clean([geom], simplify=2, pixel_size=(0.5, -0.5), crs="EPSG:32614")[0]
    in_metres = clean([geom], simplify="1m", pixel_size=0.5, crs="EPSG:32614")[0]
    assert in_pixels.equals(in_metres)
    assert in_pixels.is_valid
    assert shapely.get_num_coordinates(in_pixels) < shapely.get_num_coordinates(geom) / 10
    assert iou(in_pixels, smooth) > 0.97
    assert iou(in_pixels, geom) > 0.98


def test_simplify_adjacent_labels_keeps_shared_edges():
    rows, cols = np.mgrid[0:60, 0:60]
    labels = np.where(cols > rows, 1, 2).astype(np.int32)  # two objects meeting on a diagonal
    labels[(cols - 30) ** 2 + (rows - 30) ** 2 < 100] = 3  # a disc over both
    geoms = np.array(list(labels_to_geometries(labels, UTM).values()))
    simplified = clean(geoms, simplify=1.5, pixel_size=0.5)
    assert all(g.is_valid for g in simplified)
    vertices_before = shapely.get_num_coordinates(geoms).sum()
    assert shapely.get_num_coordinates(simplified).sum() < vertices_before / 3
    overlaps = [shapely.intersection(a, b).area for i, a in enumerate(simplified)
                for b in simplified[i + 1:]]
    assert max(overlaps) < 1e-9
    union = shapely.union_all(simplified)
    assert union.geom_type == "Polygon" and len(union.interiors) == 0  # no gaps between them


def test_simplify_metres_on_geographic_crs():
    geom = mask_to_geometry(ring_mask(), GEO)
    simplified = clean([geom], simplify="20m", crs="EPSG:4326")[0]
    assert simplified.is_valid and holes(simplified) == 1
    with pytest.raises(TerrasamError, match="needs a raster with a CRS"):
        clean([geom], simplify="1m")


def test_min_area_drops_parts_and_objects():
    mask = np.zeros((50, 50), bool)
    mask[5:25, 5:25] = True  # 400 px
    mask[40:42, 40:42] = True  # a 4 px speck of the same object
    big = mask_to_geometry(mask, UTM)
    small = quad(UTM, 30, 5, 33, 8)  # 9 px object
    out = clean([big, small, None], min_area=10, pixel_size=0.5)
    assert out[0].geom_type == "Polygon" and out[0].area == pytest.approx(100.0)
    assert out[1] is None and out[2] is None
    in_m2 = clean([big, small], min_area="2.5m2", crs="EPSG:32614", pixel_size=0.5)
    assert in_m2[0].equals(out[0]) and in_m2[1] is None
    kept = clean([big, small], min_area="2m2", crs="EPSG:32614")
    assert kept[1] is not None and kept[0].geom_type == "Polygon"


def test_fill_holes_by_size():
    mask = np.zeros((60, 60), bool)
    mask[5:55, 5:55] = True
    mask[10:12, 10:12] = False  # 4 px hole
    mask[30:40, 30:40] = False  # 100 px hole
    geom = mask_to_geometry(mask, UTM)
    assert holes(geom) == 2
    out = clean([geom], fill_holes=10, pixel_size=0.5)[0]
    assert holes(out) == 1 and out.area == pytest.approx((2500 - 100) * 0.25)
    assert holes(clean([geom], fill_holes="30m2", crs="EPSG:32614")[0]) == 0
    assert holes(clean([geom], fill_holes="0.5m2", crs="EPSG:32614")[0]) == 2


def test_fill_hole_around_island_stays_valid():
    mask = ring_mask(shape=(60, 60), outer=(5, 5, 55, 55), inner=(15, 15, 45, 45))
    mask[25:35, 25:35] = True  # island in the hole
    geom = mask_to_geometry(mask, UTM)
    out = clean([geom], fill_holes=10_000, pixel_size=0.5)[0]
    assert out.is_valid and out.geom_type == "Polygon" and holes(out) == 0
    assert out.area == pytest.approx(2500 * 0.25)


def test_fill_holes_geographic_measures_in_m2():
    geom = mask_to_geometry(ring_mask(), GEO)  # hole 15x20 px of ~9x11 m
    hole_m2 = measure([shapely.Polygon(geom.interiors[0])], "EPSG:4326")[0][0]
    assert holes(clean([geom], fill_holes=f"{hole_m2 * 1.01}m2", crs="EPSG:4326")[0]) == 0
    assert holes(clean([geom], fill_holes=f"{hole_m2 * 0.99}m2", crs="EPSG:4326")[0]) == 1


# --------------------------------------------------------------------------- table


def test_to_frame_columns_ids_crs_and_alignment():
    a = mask_to_geometry(ring_mask(), UTM)
    b = quad(UTM, 0, 0, 4, 4)
    gdf = to_frame([a, None, b], "EPSG:32614",
                   {"predicted_iou": [0.9, 0.1, 0.7], "model": ["sam", "x", "sam"]})
    assert list(gdf.columns) == ["id", "area_m2", "perimeter_m", "predicted_iou", "model",
                                 "geometry"]
    assert gdf["id"].tolist() == [1, 2]
    assert gdf["predicted_iou"].tolist() == [0.9, 0.7]
    assert gdf.crs.to_epsg() == 32614
    assert gdf["area_m2"].tolist() == pytest.approx([2100 * 0.25, 4.0])
    assert gdf["perimeter_m"].iloc[1] == pytest.approx(8.0)
    own_ids = to_frame([a, b], "EPSG:32614", {"id": [10, 20]})
    assert own_ids["id"].tolist() == [10, 20]
    with pytest.raises(ValueError, match="has 1 values for 2 geometries"):
        to_frame([a, b], "EPSG:32614", {"score": [1.0]})


def _small_parts_and_holes(geoms, limit):
    parts = shapely.get_parts(geoms[~shapely.is_missing(geoms)])
    rings, owner = shapely.get_rings(parts, return_index=True)
    exterior = np.r_[True, owner[1:] != owner[:-1]] if len(rings) else np.zeros(0, bool)
    holes = shapely.area(shapely.polygons(rings[~exterior]))
    return int((shapely.area(parts) < limit).sum()), int((holes < limit).sum())


def test_min_area_and_fill_holes_hold_after_simplify():
    from scipy import ndimage

    from terrasam.vectorize import clean, labels_to_geometries

    noise = ndimage.gaussian_filter(np.random.default_rng(3).random((200, 200)), 3)
    labels = np.digitize(noise, np.quantile(noise, [0.2, 0.4, 0.6, 0.8])).astype(np.int32) + 1
    geoms = np.array(list(labels_to_geometries(labels, Affine.identity()).values()), object)
    assert _small_parts_and_holes(geoms, 40) != (0, 0)  # the input has both
    out = clean(geoms, simplify=3, min_area=40, fill_holes=40, pixel_size=1)
    assert _small_parts_and_holes(out, 40) == (0, 0)
    assert shapely.area(out[~shapely.is_missing(out)]).sum() > 0.8 * labels.size


def test_min_area_and_fill_holes_hold_on_the_real_raster(shared_data):
    import rasterio
    from scipy import ndimage

    from terrasam.vectorize import clean, labels_to_geometries

    with rasterio.open(shared_data / "naip_2020_5m.tif") as ds:
        band = ds.read(1, window=rasterio.windows.Window(0, 0, 300, 300)).astype(float)
    labels = np.digitize(ndimage.gaussian_filter(band, 1),
                         np.quantile(band, [0.25, 0.5, 0.75])).astype(np.int32) + 1
    geoms = np.array(list(labels_to_geometries(labels, Affine.identity()).values()), object)
    out = clean(geoms, simplify=2, min_area=25, fill_holes=25, pixel_size=1)
    assert _small_parts_and_holes(out, 25) == (0, 0)
