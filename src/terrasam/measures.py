"""Shape measures of objects, vectorised over arrays of geometries (shapely 2).

Columns (:data:`COLUMNS`):

* ``compactness``: Polsby-Popper, 4π·area / perimeter² (1 for a disc, → 0 for slivers);
  from the frame's ``area_m2`` and ``perimeter_m``, so holes count in the perimeter;
* ``elongation``: long / short side of the minimum rotated rectangle (1 for a square or a
  disc, ≥ 1);
* ``solidity``: area / area of the convex hull (1 for convex shapes);
* ``orientation``: azimuth of the long side of the minimum rotated rectangle, degrees
  clockwise from grid north, in [0, 180) (0: north-south, 90: east-west);
* ``holes``: number of holes (over all parts);
* ``centroid_x``, ``centroid_y``: the centroid in the frame's CRS.

Ratios and angles are measured in the map plane; in a geographic CRS, longitudes are first
scaled by cos(latitude) at each object so that degrees of x and y have the same length.
"""

from __future__ import annotations

import math

import numpy as np
import shapely

__all__ = ["shape_measures", "COLUMNS"]

COLUMNS = ("compactness", "elongation", "solidity", "orientation", "holes", "centroid_x",
           "centroid_y")


def shape_measures(geoms, crs=None, area=None, perimeter=None) -> dict[str, np.ndarray]:
    """The :data:`COLUMNS` of each geometry (NaN / 0 for None).

    ``area`` and ``perimeter`` (m² and m, e.g. the frame's columns) give compactness its
    true size on the ground; without them the map-plane measures are used.
    """
    from terrasam.vectorize import _as_array, _pyproj_crs

    geoms = _as_array(geoms)
    n = len(geoms)
    out = {name: np.full(n, np.nan) for name in COLUMNS}
    out["holes"] = np.zeros(n, dtype=np.int64)
    present = np.flatnonzero(~(shapely.is_missing(geoms) | shapely.is_empty(geoms)))
    if not len(present):
        return out
    items = geoms[present]
    centroids = shapely.centroid(items)
    out["centroid_x"][present] = shapely.get_x(centroids)
    out["centroid_y"][present] = shapely.get_y(centroids)
    crs = _pyproj_crs(crs)
    if crs is not None and crs.is_geographic:
        items = _equal_axes(items, shapely.get_y(centroids))
    plane_area = shapely.area(items)
    if area is None or perimeter is None:
        a, p = plane_area, shapely.length(items)
    else:
        a, p = np.asarray(area, float)[present], np.asarray(perimeter, float)[present]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["compactness"][present] = np.where(p > 0, 4.0 * math.pi * a / p**2, np.nan)
        hull = shapely.area(shapely.convex_hull(items))
        out["solidity"][present] = np.where(hull > 0, plane_area / hull, np.nan)
    long_side, short_side, azimuth = _rectangle(items)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["elongation"][present] = np.where(short_side > 0, long_side / short_side, np.inf)
    out["orientation"][present] = azimuth
    parts, owner = shapely.get_parts(items, return_index=True)
    out["holes"][present] = np.bincount(owner, weights=shapely.get_num_interior_rings(parts),
                                        minlength=len(items)).astype(np.int64)
    return out


def _equal_axes(geoms: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Longitudes scaled by cos(latitude) of each object's centroid (around its centroid)."""
    coords, owner = shapely.get_coordinates(geoms, return_index=True)
    scale = np.cos(np.radians(lat))[owner]
    x0 = shapely.get_x(shapely.centroid(geoms))[owner]
    coords[:, 0] = x0 + (coords[:, 0] - x0) * scale
    return shapely.set_coordinates(geoms.copy(), coords)


def _rectangle(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Long side, short side and the long side's azimuth (degrees, [0, 180)) of the minimum
    rotated rectangle of each geometry."""
    rects = shapely.minimum_rotated_rectangle(geoms)
    coords, owner = shapely.get_coordinates(rects, return_index=True)
    first = np.searchsorted(owner, np.arange(len(geoms)))
    count = np.bincount(owner, minlength=len(geoms))
    long_side = np.zeros(len(geoms))
    short_side = np.zeros(len(geoms))
    azimuth = np.zeros(len(geoms))
    ok = count >= 3  # a polygon (degenerate inputs give a line or a point)
    i0 = first[ok]
    p0, p1, p2 = coords[i0], coords[i0 + 1], coords[i0 + 2]
    e1, e2 = p1 - p0, p2 - p1
    l1, l2 = np.hypot(*e1.T), np.hypot(*e2.T)
    longer = np.where((l1 >= l2)[:, None], e1, e2)
    long_side[ok], short_side[ok] = np.maximum(l1, l2), np.minimum(l1, l2)
    # azimuth: clockwise from north (+y), folded into [0, 180)
    azimuth[ok] = np.degrees(np.arctan2(longer[:, 0], longer[:, 1])) % 180.0
    line = (count == 2)  # a degenerate line: its length, zero width
    if line.any():
        j = first[line]
        d = coords[j + 1] - coords[j]
        long_side[line] = np.hypot(*d.T)
        azimuth[line] = np.degrees(np.arctan2(d[:, 0], d[:, 1])) % 180.0
    azimuth = np.where(np.isclose(azimuth, 180.0), 0.0, azimuth)
    return long_side, short_side, azimuth
