"""Masks and label images to exact pixel-edge polygons; cleaning and measuring them.

Polygons follow pixel edges (``rasterio.features.shapes`` applies the affine transform, so
rotated and sheared grids come out right), keep their holes and are made valid. Geometry
arrays are handled with vectorised shapely 2 operations; an object that was removed by
:func:`clean` comes back as ``None`` so that the caller's attributes stay aligned.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from itertools import chain

import numpy as np
import shapely
from affine import Affine
from rasterio import features

from terrasam.errors import TerrasamError

__all__ = [
    "mask_to_geometry",
    "mask_to_polygons",
    "labels_to_geometries",
    "clean",
    "measure",
    "to_frame",
    "parse_length",
    "parse_area",
]

_POLYGON, _MULTIPOLYGON, _COLLECTION = 3, 6, 7

# Units accepted after a number: factor to metres (lengths) or square metres (areas).
_LENGTH_UNITS = {"m": 1.0, "cm": 0.01, "mm": 0.001, "km": 1000.0, "ft": 0.3048}
_AREA_UNITS = {
    "m2": 1.0, "m²": 1.0, "sqm": 1.0, "cm2": 1e-4, "km2": 1e6, "km²": 1e6, "ha": 1e4,
    "ft2": 0.3048**2, "sqft": 0.3048**2,
}
_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([^\d\s.+-]\S*)?\s*$")


# --------------------------------------------------------------------------- units


def _parse(value, units: Mapping[str, float], what: str, example: str) -> tuple[float, str]:
    if isinstance(value, bool):
        raise TerrasamError(f"{what} must be a number, not {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        number, unit = float(value), "px"
    else:
        match = _NUMBER.match(str(value))
        if not match:
            raise TerrasamError(
                f"cannot read {value!r} as {what}; use a number of pixels or a value with a "
                f"unit such as {example}"
            )
        number, unit = float(match.group(1)), (match.group(2) or "px").lower()
        if unit not in units and unit != "px":
            raise TerrasamError(
                f"unknown unit {match.group(2)!r} in {value!r}; use px or one of "
                f"{', '.join(units)}"
            )
    if not math.isfinite(number) or number < 0:
        raise TerrasamError(f"{what} must be a non-negative number, got {value!r}")
    if unit == "px":
        return number, "px"
    return number * units[unit], "m" if units is _LENGTH_UNITS else "m2"


def parse_length(value) -> tuple[float, str]:
    """Read a length: a number (pixels), "3px", or a value with a unit ("0.5m", "50cm", "2ft").

    Returns ``(value, "px")`` or ``(metres, "m")``.
    """
    return _parse(value, _LENGTH_UNITS, "a length", "0.5m")


def parse_area(value) -> tuple[float, str]:
    """Read an area: a number (pixels), "20px", or a value with a unit ("20m2", "0.5ha", "1km2").

    Returns ``(value, "px")`` or ``(square metres, "m2")``.
    """
    return _parse(value, _AREA_UNITS, "an area", "20m2")


# --------------------------------------------------------------------------- CRS helpers


@lru_cache(maxsize=32)
def _crs_from_key(key):
    import pyproj

    return pyproj.CRS.from_user_input(key)


def _pyproj_crs(crs):
    """A pyproj CRS from anything describing one (rasterio CRS, pyproj CRS, "EPSG:n", WKT)."""
    if crs is None:
        return None
    import pyproj

    if isinstance(crs, pyproj.CRS):
        return crs
    key = crs.to_wkt() if hasattr(crs, "to_wkt") else crs
    try:
        return _crs_from_key(key)
    except pyproj.exceptions.CRSError as exc:
        raise TerrasamError(f"cannot understand the CRS {crs!r}") from exc


def _metres_per_unit(crs) -> float:
    """Metres in one linear unit of a projected CRS (1 for metres, 0.3048006 for US feet)."""
    for axis in crs.axis_info:
        if axis.unit_conversion_factor:
            return float(axis.unit_conversion_factor)
    return 1.0


def _is_geodesic(crs) -> bool:
    """True where areas must be measured on the ellipsoid rather than in the map plane.

    Geographic CRSs have no plane; Mercator-type projections (Web Mercator tiles) inflate
    areas by 1/cos²(latitude), far beyond any useful tolerance.
    """
    if crs.is_geographic:
        return True
    operation = crs.coordinate_operation
    method = (operation.method_name if operation is not None else "").lower()
    return "mercator" in method and "transverse" not in method


# --------------------------------------------------------------------------- geometry helpers


def _as_array(geoms) -> np.ndarray:
    if isinstance(geoms, np.ndarray) and geoms.dtype == object:
        return geoms.copy()
    if isinstance(geoms, shapely.Geometry) or geoms is None:
        return np.array([geoms], dtype=object)
    values = getattr(geoms, "values", geoms)  # GeoSeries
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _polygonal(geoms: np.ndarray) -> np.ndarray:
    """Keep only the polygonal parts of each geometry; empty results become None.

    Single-part MultiPolygons are returned as Polygons.
    """
    geoms = np.asarray(geoms, dtype=object).copy()
    types = shapely.get_type_id(geoms)
    other = ~np.isin(types, (_POLYGON, _MULTIPOLYGON))
    if other.any():
        idx = np.flatnonzero(other)
        rebuilt = np.full(len(idx), None, dtype=object)
        parts, owner = shapely.get_parts(geoms[idx], return_index=True)
        # A collection can hold MultiPolygons: explode those one level further.
        ptypes = shapely.get_type_id(parts)
        sub, sub_owner = shapely.get_parts(parts[ptypes == _MULTIPOLYGON], return_index=True)
        polys = np.concatenate([parts[ptypes == _POLYGON], sub])
        multi_owner = owner[ptypes == _MULTIPOLYGON][sub_owner]
        owners = np.concatenate([owner[ptypes == _POLYGON], multi_owner])
        keep = ~shapely.is_empty(polys)
        polys, owners = polys[keep], owners[keep]
        if len(polys):
            order = np.argsort(owners, kind="stable")
            shapely.multipolygons(polys[order], indices=owners[order], out=rebuilt)
        geoms[idx] = rebuilt
    geoms[shapely.is_empty(geoms)] = None
    types = shapely.get_type_id(geoms)
    single = (types == _MULTIPOLYGON) & (shapely.get_num_geometries(geoms) == 1)
    if single.any():
        geoms[single] = shapely.get_geometry(geoms[single], 0)
    return geoms


def _make_valid(geoms: np.ndarray) -> np.ndarray:
    """Valid, purely polygonal geometries (the "structure" method unions overlapping parts)."""
    geoms = np.asarray(geoms, dtype=object)
    invalid = ~shapely.is_valid(geoms) & ~shapely.is_missing(geoms)
    if invalid.any():
        geoms = geoms.copy()
        geoms[invalid] = shapely.make_valid(
            geoms[invalid], method="structure", keep_collapsed=False
        )
    return _polygonal(geoms)


def _regroup(parts: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Polygons with owner indices back into ``n`` MultiPolygons (None where nothing is left)."""
    out = np.full(n, None, dtype=object)
    if len(parts):
        order = np.argsort(owner, kind="stable")
        shapely.multipolygons(parts[order], indices=owner[order], out=out)
    return out


def _shapes(source, mask, transform, connectivity) -> tuple[np.ndarray, np.ndarray]:
    """Polygons (not yet validated) and their values from one ``rasterio.features.shapes`` pass."""
    if connectivity not in (4, 8):
        raise TerrasamError(f"connectivity must be 4 or 8, got {connectivity!r}")
    rings: list = []
    ring_owner: list[int] = []
    values: list = []
    for i, (geom, value) in enumerate(
        features.shapes(source, mask=mask, connectivity=connectivity, transform=transform)
    ):
        values.append(value)
        rings.extend(geom["coordinates"])
        ring_owner.extend([i] * len(geom["coordinates"]))
    if not values:
        return np.empty(0, dtype=object), np.empty(0)
    lengths = np.fromiter((len(r) for r in rings), dtype=np.int64, count=len(rings))
    coords = np.array(list(chain.from_iterable(rings)), dtype=np.float64)
    ring_geoms = shapely.linearrings(coords, indices=np.repeat(np.arange(len(rings)), lengths))
    polys = shapely.polygons(ring_geoms, indices=np.asarray(ring_owner))
    return polys, np.asarray(values)


def _crop(mask: np.ndarray, transform: Affine) -> tuple[np.ndarray, Affine] | None:
    """The mask cut to the bounding box of its True pixels, with the matching transform."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    a, b, c, d, e, f = transform[:6]
    shifted = Affine(a, b, c + a * c0 + b * r0, d, e, f + d * c0 + e * r0)
    return mask[r0:r1, c0:c1], shifted


def _check_2d(array, name) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise TerrasamError(f"{name} must be a 2-D array, got shape {array.shape}")
    return array


# --------------------------------------------------------------------------- masks -> polygons


def pixels_to_crs(geoms, transform: Affine) -> np.ndarray:
    """Geometries in pixel coordinates (col, row) -> CRS coordinates (exact affine, vectorised)."""
    t = transform

    def forward(xy):
        x, y = xy[:, 0], xy[:, 1]
        return np.column_stack([t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f])

    return shapely.transform(_as_array(geoms), forward)


def raster_footprint(transform: Affine, width: int, height: int):
    """The outline of a ``width`` x ``height`` raster in its CRS (a parallelogram for rotated
    transforms), its corners computed as rasterio computes the raster's bounds."""
    corners = [transform @ (c, r) for c, r in ((0, 0), (width, 0), (width, height), (0, height))]
    return shapely.orient_polygons(shapely.Polygon(corners))


def clip_to_footprint(geoms, footprint) -> np.ndarray:
    """Geometries cut to ``footprint`` (a polygon in their CRS; None: unchanged).

    Only geometries that reach past it are touched; what is left of them is valid and
    polygonal (None where nothing is). Smoothing and regularizing can push an outline past
    the raster's edge, a point prompt's window read at ``--gsd`` can reach past it, and a
    resampled grid's corner can land a rounding error outside.
    """
    geoms = _as_array(geoms)
    if footprint is None or not len(geoms):
        return geoms
    present = np.flatnonzero(~shapely.is_missing(geoms))
    items = geoms[present]
    fx0, fy0, fx1, fy1 = footprint.bounds
    b = shapely.bounds(items)
    past = (b[:, 0] < fx0) | (b[:, 1] < fy0) | (b[:, 2] > fx1) | (b[:, 3] > fy1)
    if not bool(shapely.equals(footprint, shapely.box(fx0, fy0, fx1, fy1))):
        shapely.prepare(footprint)
        past |= ~shapely.covers(footprint, items)  # a rotated raster: its corners are empty
    idx = present[past]
    if len(idx):
        geoms = geoms.copy()
        geoms[idx] = _make_valid(shapely.intersection(geoms[idx], footprint))
    return geoms


def mask_to_geometry(mask, transform: Affine, connectivity: int = 8):
    """One valid (Multi)Polygon tracing the pixel edges of a boolean mask; None when empty."""
    mask = _check_2d(mask, "mask").astype(bool, copy=False)
    cropped = _crop(mask, transform)
    if cropped is None:
        return None
    sub, sub_transform = cropped
    polys, _ = _shapes(sub.view(np.uint8), sub, sub_transform, connectivity)
    geom = polys[0] if len(polys) == 1 else shapely.multipolygons(polys)
    return _make_valid(np.array([geom], dtype=object))[0]


def mask_to_polygons(mask, transform: Affine, connectivity: int = 8) -> np.ndarray:
    """One valid geometry per connected region of a boolean mask (objects from a thresholded band).

    With 8-connectivity pixels that touch only at a corner belong to the same region (which
    is then a MultiPolygon whose parts touch at that corner); with 4-connectivity they are
    separate regions.
    """
    mask = _check_2d(mask, "mask").astype(bool, copy=False)
    cropped = _crop(mask, transform)
    if cropped is None:
        return np.empty(0, dtype=object)
    sub, sub_transform = cropped
    polys, _ = _shapes(sub.view(np.uint8), sub, sub_transform, connectivity)
    return _make_valid(polys)


def join_blocks(pieces: dict, block: int):
    """One (Multi)Polygon from the pieces of a mask vectorised block by block.

    ``pieces``: ``{(bx, by): geometry}``, each the :func:`mask_to_geometry` of the mask's pixels
    in block ``[bx*block, (bx+1)*block) x [by*block, (by+1)*block)`` (pixel coordinates, the
    blocks disjoint). The result covers the same pixels as vectorising the whole mask at once.

    A single union of all pieces re-processes every ring at each level of GEOS's cascade, and
    an object with tens of thousands of holes then costs more per block the larger it grows.
    Here blocks are joined four at a time up a quadtree, and before each step every ring that
    lies strictly inside its block (a hole or a part that nothing outside the block can touch)
    is set aside, so each step sees only what touches its block's edges: the work is close to
    linear in the pieces, and no single GEOS call grows with the whole object. Set-aside holes
    go back to the polygon holding them at the end.
    """
    free: list = []  # parts that nothing outside their block touches: final as they are
    holes: list = []  # rings set aside, per polygon they were taken from ...
    seeds: list = []  # ... and a point inside that polygon's pixels, to find its final owner
    level: dict = {}
    for (bx, by), geom in sorted(pieces.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if geom is not None and not geom.is_empty:
            rect = (bx * block, by * block, (bx + 1) * block, (by + 1) * block)
            level[(bx, by)] = _set_aside(shapely.get_parts(geom), rect, free, holes, seeds)
    size = block
    while len(level) > 1:
        size *= 2
        parents: dict = {}
        for (bx, by), polys in level.items():
            parents.setdefault((bx // 2, by // 2), []).extend(polys)
        level = {}
        for (px, py), polys in parents.items():
            if len(polys) > 1:
                # pieces share exact integer pixel edges, so the union is exact; simplify at
                # tolerance 0 drops the collinear vertices left on the seams
                union = shapely.simplify(shapely.union_all(polys), 0.0, preserve_topology=False)
                polys = list(shapely.get_parts(union))
            rect = (px * size, py * size, (px + 1) * size, (py + 1) * size)
            level[(px, py)] = _set_aside(polys, rect, free, holes, seeds)
    out = free + [p for polys in level.values() for p in polys]
    if not out:
        return None
    if holes:
        out = _restore_holes(out, holes, seeds)
    return out[0] if len(out) == 1 else shapely.multipolygons(out)


def _inside(bounds, rect) -> np.ndarray:
    bounds = np.atleast_2d(bounds)
    return ((bounds[:, 0] > rect[0]) & (bounds[:, 1] > rect[1])
            & (bounds[:, 2] < rect[2]) & (bounds[:, 3] < rect[3]))


def _set_aside(polys, rect, free: list, holes: list, seeds: list) -> list:
    """The polygons that touch ``rect``'s edges, without their holes strictly inside it; the
    others go to ``free``, the holes to ``holes`` (with a seed point of their polygon)."""
    polys = np.asarray(polys, dtype=object)
    if not len(polys):
        return []
    inside = _inside(shapely.bounds(polys), rect)
    free.extend(polys[inside])
    kept = []
    for p in polys[~inside]:
        n = shapely.get_num_interior_rings(p)
        if n:
            rings = shapely.get_interior_ring(p, np.arange(n))
            inner = _inside(shapely.bounds(rings), rect)
            if inner.any():
                # a point of the polygon's own pixels (not of a hole, not of a part in a hole)
                seeds.append(shapely.point_on_surface(p))
                holes.append(rings[inner])
                p = shapely.polygons(shapely.get_exterior_ring(p), holes=rings[~inner])
        kept.append(p)
    return kept


def _restore_holes(polys: list, holes: list, seeds: list) -> list:
    """Give each set of set-aside holes back to the final polygon that holds its seed."""
    polys = np.asarray(polys, dtype=object)
    tree = shapely.STRtree(np.asarray(seeds, dtype=object))
    # each polygon is prepared once and tests the seeds in its envelope
    pi, si = tree.query(polys, predicate="contains")
    owner = np.full(len(seeds), -1)
    areas = shapely.area(polys)
    for p, s in zip(pi.tolist(), si.tolist()):
        # a polygon whose holes were set aside contains the seeds of the parts inside those
        # holes too; the true owner is the innermost (smallest) one
        if owner[s] < 0 or areas[p] < areas[owner[s]]:
            owner[s] = p
    extra: dict = {}
    for s, p in enumerate(owner.tolist()):
        extra.setdefault(p, []).append(holes[s])
    out = list(polys)
    for p, groups in extra.items():
        if p < 0:
            continue  # cannot happen for a seed inside pixels that exist
        poly = polys[p]
        n = shapely.get_num_interior_rings(poly)
        rings = np.concatenate([shapely.get_interior_ring(poly, np.arange(n)), *groups])
        out[p] = shapely.polygons(shapely.get_exterior_ring(poly), holes=rings)
    return out


def labels_to_geometries(labels, transform: Affine, connectivity: int = 8) -> dict:
    """``{label: (Multi)Polygon}`` for every non-zero label of an integer label image.

    One ``shapes`` pass over the whole image; the connected parts of a label are disjoint,
    so multi-part labels are assembled directly instead of unioned.
    """
    labels = _check_2d(labels, "labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TerrasamError(f"labels must be integers, got {labels.dtype}")
    if labels.size == 0:
        return {}
    valid = labels != 0
    lo, hi = int(labels.min()), int(labels.max())
    if -(2**31) <= lo and hi < 2**31:
        source = labels.astype(np.int32, copy=False)
    elif -(2**53) <= lo and hi <= 2**53:
        source = labels.astype(np.float64)  # exact for these integers
    else:
        raise TerrasamError("label values must lie within ±2**53")
    polys, values = _shapes(source, valid, transform, connectivity)
    if not len(polys):
        return {}
    values = values.astype(np.int64)
    order = np.argsort(values, kind="stable")
    uniq, group = np.unique(values[order], return_inverse=True)
    counts = np.bincount(group)
    geoms = np.empty(len(uniq), dtype=object)
    single = counts[group] == 1
    geoms[group[single]] = polys[order][single]
    multi = ~single
    if multi.any():
        multi_labels, multi_group = np.unique(group[multi], return_inverse=True)
        geoms[multi_labels] = shapely.multipolygons(polys[order][multi], indices=multi_group)
    geoms = _make_valid(geoms)
    return {int(k): g for k, g in zip(uniq, geoms) if g is not None}


# --------------------------------------------------------------------------- cleaning


def _pixel_scale(pixel_size) -> tuple[float, float]:
    """Map units per pixel (length) and map units² per pixel (area)."""
    if pixel_size is None:
        return 1.0, 1.0
    if isinstance(pixel_size, Sequence) or np.ndim(pixel_size) == 1:
        xres, yres = (abs(float(v)) for v in pixel_size)
    else:
        xres = yres = abs(float(pixel_size))
    return math.sqrt(xres * yres), xres * yres


def _length_in_map_units(value, crs, pixel_length, geoms) -> float:
    number, unit = parse_length(value)
    if unit == "px":
        return number * pixel_length
    if crs is None:
        raise TerrasamError(f"a length in metres ({value!r}) needs a raster with a CRS")
    if not crs.is_geographic:
        if _is_geodesic(crs):
            # Mercator scale grows with latitude: convert at the data's mean latitude.
            lat = _mean_latitude(geoms, crs)
            return number / math.cos(math.radians(lat)) / _metres_per_unit(crs)
        return number / _metres_per_unit(crs)
    lat = _mean_latitude(geoms, crs)
    # Metres per degree at that latitude: geometric mean of the meridian and parallel scales.
    metres_per_degree = 111_320.0 * math.sqrt(max(math.cos(math.radians(lat)), 1e-6))
    return number / metres_per_degree


def _mean_latitude(geoms, crs) -> float:
    present = geoms[~shapely.is_missing(geoms)]
    if not len(present):
        return 0.0
    x0, y0, x1, y1 = shapely.total_bounds(present)
    if crs.is_geographic:
        return (y0 + y1) / 2
    lonlat = _to_lonlat(np.array([shapely.points((x0 + x1) / 2, (y0 + y1) / 2)]), crs)
    return float(shapely.get_y(lonlat[0]))


def _areas(polys: np.ndarray, unit: str, crs, pixel_area: float) -> np.ndarray:
    """Areas of polygons in pixels or in square metres, to compare with a threshold."""
    if unit == "px":
        return shapely.area(polys) / pixel_area
    if crs is None:
        raise TerrasamError("an area in square metres needs a raster with a CRS")
    return measure(polys, crs)[0]


def _drop_small_parts(geoms: np.ndarray, threshold: float, unit, crs, pixel_area) -> np.ndarray:
    parts, owner = shapely.get_parts(geoms, return_index=True)
    keep = _areas(parts, unit, crs, pixel_area) >= threshold
    return _polygonal(_regroup(parts[keep], owner[keep], len(geoms)))


def _fill_small_holes(geoms: np.ndarray, threshold: float, unit, crs, pixel_area) -> np.ndarray:
    parts, owner = shapely.get_parts(geoms, return_index=True)
    rings, ring_owner = shapely.get_rings(parts, return_index=True)
    if not len(rings):
        return geoms
    exterior = np.r_[True, ring_owner[1:] != ring_owner[:-1]]
    keep = exterior.copy()
    holes = ~exterior
    if holes.any():
        keep[holes] = _areas(shapely.polygons(rings[holes]), unit, crs, pixel_area) >= threshold
    new_parts = shapely.polygons(rings[keep], indices=ring_owner[keep])
    # Filling a hole can cover an island of the same object: structure-valid unions them.
    return _make_valid(_regroup(new_parts, owner, len(geoms)))


def _node_neighbours(geoms: np.ndarray, tolerance: float) -> np.ndarray:
    """Insert into each polygon the vertices its neighbours have on their shared edges.

    Polygons traced from one label image share edges, but a straight edge on one side can
    face a corner on the other; once both carry the same vertices they form an edge-matched
    coverage.
    """
    coords, owner = shapely.get_coordinates(geoms, return_index=True)
    # x + iy makes each vertex one sortable number: much faster than np.unique(axis=0)
    keys, vertex_id = np.unique(coords[:, 0] + 1j * coords[:, 1], return_inverse=True)
    vertices = np.column_stack([keys.real, keys.imag])
    point_idx, poly_idx = shapely.STRtree(geoms).query(
        shapely.points(vertices), predicate="dwithin", distance=tolerance
    )
    # keep only the vertices that lie on a polygon's boundary without being one of its own
    n = np.int64(len(vertices))
    extra = ~np.isin(poly_idx * n + point_idx, owner.astype(np.int64) * n + vertex_id)
    poly_idx, point_idx = poly_idx[extra], point_idx[extra]
    if not len(poly_idx):
        return geoms
    order = np.argsort(poly_idx, kind="stable")
    poly_idx, point_idx = poly_idx[order], point_idx[order]
    references = np.full(len(geoms), None, dtype=object)
    shapely.multipoints(vertices[point_idx], indices=poly_idx, out=references)
    snapped = geoms.copy()
    has = ~shapely.is_missing(references)
    snapped[has] = shapely.snap(geoms[has], references[has], tolerance)
    return snapped


def _simplify(geoms: np.ndarray, tolerance: float, pixel_length: float) -> np.ndarray:
    present = ~shapely.is_missing(geoms)
    out = geoms.copy()
    items = geoms[present]
    # Objects from a label image tile the plane without overlaps: simplify them as a coverage
    # so that neighbours keep their shared edges (no slivers, no gaps).
    if len(items) > 1:
        noded = _node_neighbours(items, pixel_length * 1e-6)
        if bool(shapely.coverage_is_valid(noded)):
            out[present] = shapely.coverage_simplify(noded, tolerance)
            return _make_valid(out)
    out[present] = shapely.simplify(items, tolerance, preserve_topology=True)
    return _make_valid(out)


def clean(
    geoms,
    *,
    simplify=None,
    min_area=None,
    fill_holes=None,
    crs=None,
    pixel_size=None,
    regularize=None,
    regularize_45: bool = False,
    smooth=None,
    footprint=None,
) -> np.ndarray:
    """Simplify, drop small parts and fill small holes; returns an array of the same length.

    ``simplify`` (a distance), ``min_area`` and ``fill_holes`` (areas) are numbers of pixels
    or strings with units ("0.5m", "20m2", "0.1ha"). ``pixel_size`` is the pixel size in map
    units (a number or ``(xres, yres)``); without it plain numbers are map units. Holes smaller
    than ``fill_holes`` are filled, polygon parts smaller than ``min_area`` removed, and an
    object with nothing left becomes ``None``. Results are valid (Multi)Polygons. Objects
    that tile without overlaps (from a label image) are simplified as a coverage, so
    neighbours keep their shared edges; otherwise each is simplified on its own
    (Douglas-Peucker, topology preserved).

    ``regularize`` (True for the default tolerance, or a length) straightens building
    outlines to right angles (with ``regularize_45`` also 45° edges,
    :mod:`terrasam.regularize`); ``smooth`` (True or a length, the Gaussian's sigma) smooths
    natural outlines without moving neighbours into each other (:mod:`terrasam.smooth`).
    Both run after hole filling and small-part removal, before simplification; hole filling
    and small-part removal run again at the end, so that no part or hole below those limits
    is left in the result.

    ``footprint`` (the raster's outline in the CRS, :func:`raster_footprint`) cuts every
    object to the raster, first and again after any reshaping, so that no coordinate lies
    outside it.
    """
    regularize = None if regularize is False else regularize
    smooth = None if smooth is False else smooth
    if regularize is None and regularize_45:
        regularize = True
    if regularize is not None and smooth is not None:
        raise TerrasamError("give regularize (buildings) or smooth (natural boundaries), "
                            "not both.")
    geoms = clip_to_footprint(_make_valid(_as_array(geoms)), footprint)
    crs = _pyproj_crs(crs)
    pixel_length, pixel_area = _pixel_scale(pixel_size)

    def small_holes_and_parts(geoms):
        if fill_holes is not None:
            threshold, unit = parse_area(fill_holes)
            geoms = _fill_small_holes(geoms, threshold, unit, crs, pixel_area)
        if min_area is not None:
            threshold, unit = parse_area(min_area)
            geoms = _drop_small_parts(geoms, threshold, unit, crs, pixel_area)
        return geoms

    geoms = small_holes_and_parts(geoms)
    if regularize is not None:
        from terrasam import regularize as reg

        value = f"{reg.DEFAULT_TOLERANCE}px" if regularize is True else regularize
        tolerance = _length_in_map_units(value, crs, pixel_length, geoms)
        geoms = _make_valid(reg.regularize(geoms, tolerance, diagonals=regularize_45))
    if smooth is not None:
        from terrasam import smooth as smo

        value = f"{smo.DEFAULT_TOLERANCE}px" if smooth is True else smooth
        sigma = _length_in_map_units(value, crs, pixel_length, geoms)
        geoms = _make_valid(smo.smooth(geoms, sigma, snap=pixel_length * 1e-6))
    if simplify is not None:
        tolerance = _length_in_map_units(simplify, crs, pixel_length, geoms)
        if tolerance > 0:
            geoms = _simplify(geoms, tolerance, pixel_length)
    if simplify is not None or regularize is not None or smooth is not None:
        # reshaping shrinks parts and holes (and its repairs split off slivers): the limits
        # hold on the final geometry, which stays inside the raster
        geoms = small_holes_and_parts(clip_to_footprint(geoms, footprint))
    return geoms


# --------------------------------------------------------------------------- measuring


def _to_lonlat(geoms: np.ndarray, crs) -> np.ndarray:
    if crs.is_geographic:
        return geoms
    import pyproj

    transformer = pyproj.Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)

    def forward(xy):
        x, y = transformer.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geoms, forward)


# longest edge measured as one geodesic: a pixel edge runs along a parallel, a geodesic does
# not (it bends towards the pole, and one over 180 degrees of longitude goes the other way round
# the globe); 0.1 degree edges keep the area of a lon/lat rectangle within 5e-7 of the exact one,
# even at 89 degrees
GEODESIC_STEP_DEG = 0.1
_GEODESIC_STEP_M = GEODESIC_STEP_DEG * 111_000.0  # the same along a Mercator map's metres
# objects wider than this (degrees of longitude) have their area measured in strips this wide:
# pyproj folds a polygon's area into [-A/2, A/2] (A: the ellipsoid's area), so a piece must stay
# well under half the globe for the size of its area to be right
_STRIP_DEG = 90.0


def _ring_sums(geoms: np.ndarray, geod) -> tuple[np.ndarray, np.ndarray]:
    """Area (holes subtracted) and perimeter (holes included) of lon/lat geometries, each edge
    a geodesic."""
    parts, part_owner = shapely.get_parts(geoms, return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    coords, coord_ring = shapely.get_coordinates(rings, return_index=True)
    bounds = np.searchsorted(coord_ring, np.arange(len(rings) + 1))
    ring_area = np.empty(len(rings))
    ring_perimeter = np.empty(len(rings))
    for i in range(len(rings)):  # pyproj measures one ring per call
        lon, lat = coords[bounds[i]: bounds[i + 1]].T
        # a raster's edge a hair past a pole ends there (beyond it the ellipsoid has no point)
        ring_area[i], ring_perimeter[i] = geod.polygon_area_perimeter(
            lon, np.clip(lat, -90.0, 90.0))
    exterior = np.r_[True, ring_part[1:] != ring_part[:-1]] if len(rings) else np.zeros(0, bool)
    signed = np.where(exterior, 1.0, -1.0) * np.abs(ring_area)
    owner = part_owner[ring_part]
    area = np.bincount(owner, weights=signed, minlength=len(geoms))
    perimeter = np.bincount(owner, weights=ring_perimeter, minlength=len(geoms))
    return area, perimeter


def _geodesic(geoms: np.ndarray, crs) -> tuple[np.ndarray, np.ndarray]:
    """Ellipsoidal area (holes subtracted, never negative) and perimeter (holes included) of
    each geometry, its long edges followed in steps of :data:`GEODESIC_STEP_DEG`."""
    geod = crs.get_geod()
    if crs.is_geographic:
        lonlat = shapely.segmentize(geoms, GEODESIC_STEP_DEG)
    else:  # Mercator-type: straight lines of the map, densified where they are drawn
        lonlat = _to_lonlat(shapely.segmentize(geoms, _GEODESIC_STEP_M / _metres_per_unit(crs)),
                            crs)
    area, perimeter = _ring_sums(lonlat, geod)
    box_bounds = shapely.bounds(lonlat)
    wide = np.flatnonzero(box_bounds[:, 2] - box_bounds[:, 0] > _STRIP_DEG)
    if len(wide):
        pieces, owner = [], []
        for i in wide:
            x0, _, x1, _ = box_bounds[i]
            edges = np.arange(np.floor(x0 / _STRIP_DEG), np.ceil(x1 / _STRIP_DEG) + 1) * _STRIP_DEG
            strips = shapely.box(edges[:-1], -1e3, edges[1:], 1e3)
            pieces.append(_polygonal(shapely.intersection(lonlat[i], strips)))
            owner.append(np.full(len(strips), i))
        pieces, owner = np.concatenate(pieces), np.concatenate(owner)
        present = ~shapely.is_missing(pieces)
        piece_area, _ = _ring_sums(pieces[present], geod)
        area[wide] = 0.0
        np.add.at(area, owner[present], piece_area)
    # holes lie inside their exterior, so only rounding could take the sum below zero
    return np.maximum(area, 0.0), perimeter


def measure(geoms, crs) -> tuple[np.ndarray, np.ndarray]:
    """Area in m² and perimeter in m of each geometry (NaN for None).

    Projected CRSs are measured in the map plane with their unit converted to metres;
    geographic CRSs (and Mercator-type projections) on the ellipsoid with pyproj.Geod.
    Without a CRS the values are in the raw units of the coordinates.
    """
    geoms = _as_array(geoms)
    area = np.full(len(geoms), np.nan)
    perimeter = np.full(len(geoms), np.nan)
    present = ~shapely.is_missing(geoms)
    items = geoms[present]
    crs = _pyproj_crs(crs)
    if crs is None:
        area[present], perimeter[present] = shapely.area(items), shapely.length(items)
    elif _is_geodesic(crs):
        area[present], perimeter[present] = _geodesic(items, crs)
    else:
        factor = _metres_per_unit(crs)
        area[present] = shapely.area(items) * factor**2
        perimeter[present] = shapely.length(items) * factor
    return area, perimeter


# --------------------------------------------------------------------------- table


def to_frame(geoms, crs, attrs: Mapping | None = None):
    """A GeoDataFrame: id (1..n unless ``attrs`` has one), area_m2, perimeter_m, attrs, geometry.

    ``attrs`` holds one array-like per column, aligned with ``geoms``; rows whose geometry is
    None or empty (removed by :func:`clean`) are dropped together with their attributes.
    """
    import geopandas as gpd

    geoms = _as_array(geoms)
    keep = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    attrs = dict(attrs or {})
    for name, values in attrs.items():
        if name in ("geometry", "area_m2", "perimeter_m"):
            raise ValueError(f"attribute {name!r} is computed by to_frame")
        if len(values) != len(geoms):
            raise ValueError(
                f"attribute {name!r} has {len(values)} values for {len(geoms)} geometries"
            )
    kept = geoms[keep]
    area, perimeter = measure(kept, crs)
    columns: dict = {}
    if "id" not in attrs:
        columns["id"] = np.arange(1, len(kept) + 1, dtype=np.int64)
    else:
        columns["id"] = _column(attrs.pop("id"))[keep]
    columns["area_m2"] = area
    columns["perimeter_m"] = perimeter
    for name, values in attrs.items():
        columns[name] = _column(values)[keep]
    crs = _pyproj_crs(crs)
    return gpd.GeoDataFrame(columns, geometry=gpd.GeoSeries(kept, crs=crs), crs=crs)


def _column(values) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:  # e.g. a list of tuples: keep the items whole
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
    return array
