"""Smoothing natural outlines: area kept, neighbours still neighbours, no new overlaps."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from affine import Affine

from terrasam.smooth import smooth
from terrasam.vectorize import clean, labels_to_geometries

PIXEL = 0.5
TRANSFORM = Affine(PIXEL, 0, 500_000.0, 0, -PIXEL, 4_100_000.0)
AREA_TOLERANCE = 0.01  # the README's promise: area within 1 % at the default sigma (2 px)


def to_crs(geom):
    t = TRANSFORM
    return shapely.affinity.affine_transform(geom, [t.a, t.b, t.d, t.e, t.c, t.f])


def field_scene():
    """A disc, and an ellipse split by a wavy border into two fields, plus a pond inside
    the upper field that a third object fills (an island in a hole), on a 160 px grid."""
    yy, xx = np.mgrid[0:160, 0:160] + 0.5
    labels = np.zeros((160, 160), np.int32)
    labels[(xx - 40) ** 2 + (yy - 40) ** 2 < 25**2] = 1
    blob = (xx - 105) ** 2 / 45**2 + (yy - 105) ** 2 / 40**2 < 1
    upper = yy < 105 + 7 * np.sin(xx / 7)
    labels[blob & upper] = 2
    labels[blob & ~upper] = 3
    labels[(xx - 100) ** 2 + (yy - 85) ** 2 < 8**2] = 4
    geoms = labels_to_geometries(labels, TRANSFORM)
    return np.array([geoms[i] for i in (1, 2, 3, 4)], dtype=object)


@pytest.fixture(scope="module")
def fields():
    before = field_scene()
    after = clean(before, smooth=True, pixel_size=PIXEL, crs="EPSG:32614")
    return before, after


def test_a_traced_disc_gets_rounder_and_keeps_its_area(fields):
    before, after = fields
    disc = to_crs(shapely.Point(40, 40).buffer(25, quad_segs=128))
    assert after[0].is_valid and after[0].geom_type == "Polygon"
    assert abs(after[0].area / before[0].area - 1) < AREA_TOLERANCE
    iou = lambda a, b: a.intersection(b).area / a.union(b).area  # noqa: E731
    assert iou(after[0], disc) > iou(before[0], disc) + 0.005
    # within a fifth of a pixel of the true circle everywhere (the staircase: over half)
    assert shapely.hausdorff_distance(after[0].exterior, disc.exterior) < 0.2 * PIXEL
    assert shapely.hausdorff_distance(before[0].exterior, disc.exterior) > 0.5 * PIXEL
    # no staircase left: far fewer, shorter-turning vertices than the pixel outline
    assert shapely.length(after[0]) < shapely.length(before[0]) * 0.85


def test_every_object_keeps_its_area(fields):
    before, after = fields
    ratio = shapely.area(after) / shapely.area(before)
    assert np.all(np.abs(ratio - 1) < AREA_TOLERANCE), ratio


def test_neighbours_share_their_smoothed_border_without_overlap_or_gap(fields):
    before, after = fields
    for i, j in [(1, 2), (1, 3)]:
        assert before[i].intersection(before[j]).area == 0
        assert after[i].intersection(after[j]).area < 1e-9  # no overlap
        shared = after[i].boundary.intersection(after[j].boundary)
        assert shared.length > 0.6 * before[i].boundary.intersection(before[j].boundary).length
    # no gap either: the pieces still make up the same whole, as one polygon
    whole_before = shapely.union_all(before[1:])
    whole_after = shapely.union_all(after[1:])
    assert whole_after.geom_type == "Polygon"
    assert abs(whole_after.area - shapely.area(after[1:]).sum()) < 1e-6
    assert abs(whole_after.area / whole_before.area - 1) < AREA_TOLERANCE
    # the pond's island fills the hole of its field exactly
    assert len(after[1].interiors) == 1
    assert shapely.equals(shapely.Polygon(after[1].interiors[0]), after[3])


def test_objects_that_only_touch_or_are_apart_do_not_overlap_afterwards():
    a = to_crs(shapely.box(10, 10, 30, 30))
    b = to_crs(shapely.box(30, 30, 50, 50))  # touches a at one corner
    c = to_crs(shapely.box(31, 10, 51, 29))  # one pixel from both
    out = smooth(np.array([a, b, c], dtype=object), 2 * PIXEL, snap=PIXEL * 1e-6)
    for i in range(3):
        for j in range(i + 1, 3):
            assert out[i].intersection(out[j]).area < 1e-9


def test_objects_that_overlapped_still_overlap():
    a = to_crs(shapely.box(10, 10, 40, 40))
    b = to_crs(shapely.box(30, 30, 60, 60))
    out = smooth(np.array([a, b], dtype=object), 2 * PIXEL)
    assert out[0].intersection(out[1]).area > 0.8 * a.intersection(b).area


def test_small_objects_are_not_smoothed_away_and_none_stays_none():
    tiny = to_crs(shapely.box(5, 5, 7, 7))  # 2 x 2 pixels
    out = clean(np.array([tiny, None], dtype=object), smooth="4", pixel_size=PIXEL)
    assert out[1] is None
    assert abs(out[0].area / tiny.area - 1) < 0.05 and out[0].is_valid


def test_smoothing_is_the_same_whatever_the_order_of_the_objects():
    geoms = field_scene()
    a = smooth(geoms, 2 * PIXEL, snap=PIXEL * 1e-6)
    b = smooth(geoms[::-1], 2 * PIXEL, snap=PIXEL * 1e-6)[::-1]
    for x, y in zip(a, b):
        assert shapely.equals_exact(shapely.normalize(x), shapely.normalize(y), 1e-9)
