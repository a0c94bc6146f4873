"""Building regularization: traced staircases back to straight walls at right angles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
from affine import Affine
from rasterio import features
from shapely import affinity

from terrasam.errors import TerrasamError
from terrasam.regularize import dominant_angle, regularize
from terrasam.vectorize import clean, mask_to_geometry

PIXEL = 0.5
TRANSFORM = Affine(PIXEL, 0, 500_000.0, 0, -PIXEL, 4_100_000.0)


def traced(truth):
    """``truth`` (CRS) burned into pixels and traced back: what the model's mask gives."""
    mask = features.rasterize([truth], out_shape=(260, 260), transform=TRANSFORM).astype(bool)
    return mask_to_geometry(mask, TRANSFORM)


def building(shape, angle, size=1.0):
    """A footprint in metres, rotated by ``angle`` degrees, placed inside the grid."""
    geom = affinity.scale(shape, size, size, origin=(0, 0))
    geom = affinity.rotate(geom, angle, origin=(0, 0))
    c = geom.centroid
    return affinity.translate(geom, 500_065.3 - c.x, 4_099_935.7 - c.y)


def iou(a, b) -> float:
    return shapely.area(shapely.intersection(a, b)) / shapely.area(shapely.union(a, b))


def corner_angles(poly) -> np.ndarray:
    pts = np.asarray(poly.exterior.coords)[:-1]
    prev, nxt = np.roll(pts, 1, axis=0) - pts, np.roll(pts, -1, axis=0) - pts
    cos = np.sum(prev * nxt, axis=1) / np.hypot(*prev.T) / np.hypot(*nxt.T)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


RECT = shapely.box(0, 0, 30, 15)  # 60 x 30 pixels
L_SHAPE = shapely.Polygon([(0, 0), (30, 0), (30, 10), (12, 10), (12, 25), (0, 25)])


@pytest.mark.parametrize("angle", [7.0, 23.0, 37.0, 61.0, 80.0])
def test_a_rotated_rectangle_comes_back_as_a_rectangle(angle):
    truth = building(RECT, angle)
    stairs = traced(truth)
    assert len(stairs.exterior.coords) > 40  # a real staircase
    out = clean([stairs], regularize=True, pixel_size=PIXEL)[0]
    assert out.geom_type == "Polygon" and out.is_valid
    assert len(out.exterior.coords) - 1 == 4
    np.testing.assert_allclose(corner_angles(out), 90.0, atol=1e-6)
    assert iou(out, truth) >= 0.98
    assert iou(out, truth) > iou(stairs, truth)  # better than the pixels themselves
    # its walls run along the building's own orientation
    edge = np.diff(np.asarray(out.exterior.coords)[:2], axis=0)[0]
    found = math.degrees(math.atan2(edge[1], edge[0])) % 90
    assert min(abs(found - angle % 90), 90 - abs(found - angle % 90)) < 1.0


def test_an_l_shaped_building_keeps_its_six_right_angles():
    truth = building(L_SHAPE, 17.0)
    out = clean([traced(truth)], regularize=True, pixel_size=PIXEL)[0]
    assert len(out.exterior.coords) - 1 == 6
    np.testing.assert_allclose(corner_angles(out), 90.0, atol=1e-6)  # the inner one too
    assert iou(out, truth) >= 0.98


def test_45_degree_edges_only_when_asked():
    octagon = shapely.Polygon([(8, 0), (22, 0), (30, 8), (30, 22), (22, 30), (8, 30), (0, 22),
                               (0, 8)])
    truth = building(octagon, 12.0)
    stairs = traced(truth)
    plain = clean([stairs], regularize=True, pixel_size=PIXEL)[0]
    assert set(np.round(corner_angles(plain), 6)) == {90.0}
    diag = clean([stairs], regularize=True, regularize_45=True, pixel_size=PIXEL)[0]
    assert len(diag.exterior.coords) - 1 == 8
    np.testing.assert_allclose(corner_angles(diag), 135.0, atol=1e-6)
    assert iou(diag, truth) >= 0.98 > iou(plain, truth)


def test_holes_and_parts_are_regularized_and_kept():
    courtyard = shapely.box(0, 0, 30, 20).difference(shapely.box(8, 6, 22, 14))
    ring = traced(building(courtyard, 25.0))
    two = shapely.union(traced(building(RECT, 30.0)),
                        affinity.translate(traced(building(RECT, 30.0)), 0, -60))
    out = clean(np.array([ring, two, None], dtype=object), regularize=True, pixel_size=PIXEL)
    assert len(out[0].interiors) == 1
    np.testing.assert_allclose(corner_angles(shapely.Polygon(out[0].interiors[0])), 90,
                               atol=1e-6)
    assert iou(out[0], building(courtyard, 25.0)) >= 0.97
    assert out[1].geom_type == "MultiPolygon" and len(out[1].geoms) == 2
    assert out[2] is None


def test_pixel_aligned_outlines_stay_exactly_as_traced():
    truth = shapely.box(500_010, 4_099_990, 500_030, 4_099_995)
    stairs = traced(truth)
    out = clean([stairs], regularize=True, pixel_size=PIXEL)[0]
    assert shapely.equals(shapely.normalize(out), shapely.normalize(truth))


def test_tolerance_in_metres_and_in_pixels_is_the_same():
    stairs = traced(building(L_SHAPE, 33.0))
    px = clean([stairs], regularize="2", pixel_size=PIXEL, crs="EPSG:32614")[0]
    metres = clean([stairs], regularize="1m", pixel_size=PIXEL, crs="EPSG:32614")[0]
    assert shapely.equals_exact(px, metres, 1e-9)


def test_dominant_angle_of_edges():
    ring = np.asarray(affinity.rotate(shapely.box(0, 0, 10, 4), 30, origin=(0, 0))
                      .exterior.coords)
    assert math.degrees(dominant_angle(ring)) == pytest.approx(30.0)


def test_regularize_and_smooth_together_are_refused():
    with pytest.raises(TerrasamError, match="not both"):
        clean([shapely.box(0, 0, 4, 4)], regularize=True, smooth=True)


def test_regularize_returns_an_array_of_the_same_length_with_none_kept():
    out = regularize(np.array([None, shapely.box(0, 0, 10, 5)], dtype=object), 1.0)
    assert out[0] is None and shapely.equals(out[1], shapely.box(0, 0, 10, 5))
