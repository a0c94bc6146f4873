"""Shape measures of objects against shapes whose values are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
from shapely import affinity

from terrasam.measures import COLUMNS, shape_measures


def test_a_rectangle_a_disc_and_a_ring():
    rect = shapely.box(500_000, 4_100_000, 500_040, 4_100_010)  # 40 m east-west, 10 m high
    disc = shapely.Point(500_100, 4_100_000).buffer(10, quad_segs=256)
    ring = shapely.box(0, 0, 30, 30).difference(shapely.box(10, 10, 20, 20))
    out = shape_measures(np.array([rect, disc, ring, None], dtype=object), "EPSG:32614")
    assert list(out) == list(COLUMNS)
    # Polsby-Popper 4 pi A / P^2
    assert out["compactness"][0] == pytest.approx(4 * math.pi * 400 / 100**2)
    assert out["compactness"][1] == pytest.approx(1.0, abs=1e-4)
    assert out["compactness"][2] == pytest.approx(4 * math.pi * 800 / 160**2)  # holes count
    assert out["elongation"][0] == pytest.approx(4.0)
    assert out["elongation"][1] == pytest.approx(1.0, abs=1e-3)
    assert out["solidity"][0] == pytest.approx(1.0)
    assert out["solidity"][2] == pytest.approx(800 / 900)
    assert out["orientation"][0] == pytest.approx(90.0)  # long axis east-west
    assert out["holes"].tolist() == [0, 0, 1, 0]
    assert (out["centroid_x"][0], out["centroid_y"][0]) == (500_020, 4_100_005)
    assert np.isnan(out["compactness"][3]) and np.isnan(out["centroid_x"][3])


@pytest.mark.parametrize("angle", [0.0, 30.0, 60.0, 100.0, 135.0])
def test_orientation_is_the_long_axis_azimuth_clockwise_from_north(angle):
    # a 20 x 4 bar along north, turned clockwise by ``angle``
    bar = shapely.box(-2, -10, 2, 10)
    turned = affinity.rotate(bar, -angle, origin=(0, 0))
    out = shape_measures(np.array([turned], dtype=object))
    assert out["orientation"][0] == pytest.approx(angle % 180, abs=1e-6)
    assert out["elongation"][0] == pytest.approx(5.0)


def test_an_l_shape_is_less_solid_and_multipolygon_holes_add_up():
    el = shapely.Polygon([(0, 0), (30, 0), (30, 10), (10, 10), (10, 30), (0, 30)])
    rings = shapely.union(shapely.box(0, 0, 10, 10).difference(shapely.box(2, 2, 4, 4)),
                          shapely.box(20, 0, 30, 10).difference(shapely.box(22, 2, 24, 4))
                          .difference(shapely.box(26, 6, 28, 8)))
    out = shape_measures(np.array([el, rings], dtype=object))
    hull = shapely.convex_hull(el).area
    assert out["solidity"][0] == pytest.approx(500 / hull)
    assert out["holes"][1] == 3


def test_given_ground_areas_and_perimeters_are_used_for_compactness():
    sq = shapely.box(0, 0, 1, 1)
    out = shape_measures(np.array([sq], dtype=object), area=[100.0], perimeter=[40.0])
    assert out["compactness"][0] == pytest.approx(4 * math.pi * 100 / 1600)


def test_geographic_shapes_are_measured_with_equal_axes():
    # 0.002 deg of longitude at 60 N is as long as 0.001 deg of latitude: a square on the ground
    lat = 60.0
    sq = shapely.box(10.0, lat - 0.0005, 10.002, lat + 0.0005)
    out = shape_measures(np.array([sq], dtype=object), "EPSG:4326")
    assert out["elongation"][0] == pytest.approx(1.0, abs=2e-3)
    assert out["centroid_x"][0] == pytest.approx(10.001)
