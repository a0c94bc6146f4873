"""Orthogonal regularization of building footprints: straight edges at right angles.

A traced footprint is a pixel staircase. Each polygon is regularized in its own frame:

1. the ring is simplified (Douglas-Peucker, ``tolerance``) to find its straight runs;
2. the dominant orientation is the length-weighted mean direction of those runs, modulo 90°,
   refined on the traced vertices of the long walls; that estimate, the unrefined one and the
   minimum rotated rectangle's are each tried, and the result that overlaps the traced
   outline best is kept (small footprints have too few steps for one estimate to be safe);
3. each run is snapped to the dominant direction or its perpendicular (or, with
   ``diagonals``, also to ±45°); consecutive runs of one direction are merged, short runs
   between two parallel ones are absorbed, and short corner cuts dropped;
4. each run becomes a line fitted to *all* traced vertices it covers (the offset that keeps
   the area between staircase and line balanced, so edges land between the pixel steps
   rather than on their outer corners);
5. consecutive lines are intersected into the new corners; holes use the polygon's own
   orientation.

A result that is not a sensible stand-in for the traced shape (too few runs, or an overlap
with it below :data:`MIN_IOU`) falls back to the traced polygon. Works on arrays of
geometries in map units; one Python loop over footprints (a few milliseconds each), with
rectangles and specks smaller than (2 x tolerance)² left as traced.
"""

from __future__ import annotations

import math

import numpy as np
import shapely

__all__ = ["regularize", "dominant_angle", "DEFAULT_TOLERANCE"]

DEFAULT_TOLERANCE = 1.5  # pixels: how far a straight run may stray from the traced outline
MIN_IOU = 0.5  # below this overlap with the traced part, the traced part is kept
_DIAGONAL_WINDOW = 15.0  # degrees around 45° that snap to a diagonal (when allowed)


def regularize(geoms, tolerance: float, *, diagonals: bool = False) -> np.ndarray:
    """Regularize an array of (Multi)Polygons; ``tolerance`` in map units.

    Returns an array of the same length (None stays None); every output is made valid by
    the caller's cleaning step.
    """
    geoms = np.asarray(geoms, dtype=object)
    out = np.full(len(geoms), None, dtype=object)
    present = np.flatnonzero(~shapely.is_missing(geoms))
    if not len(present) or tolerance <= 0:
        out[present] = geoms[present]
        return out
    parts, owner = shapely.get_parts(geoms[present], return_index=True)
    # parts that are already rectangles (4 corners, no hole) or too small to have walls
    # (under (2 x tolerance)²) stay as traced: most of the specks a noisy mask leaves
    rectangle = (shapely.get_num_coordinates(parts) <= 5) & \
        (shapely.get_num_interior_rings(parts) == 0)
    plain = rectangle | (shapely.area(parts) < (2 * tolerance) ** 2)
    done = parts.copy()
    work = np.flatnonzero(~plain)
    done[work] = [_polygon(p, tolerance, diagonals) for p in parts[work]]
    # a regularized part can fall apart into several (made valid): flatten before regrouping
    done, sub = shapely.get_parts(done, return_index=True)
    owner = owner[sub]
    order = np.argsort(owner, kind="stable")
    regrouped = np.full(len(present), None, dtype=object)
    shapely.multipolygons(done[order], indices=owner[order], out=regrouped)
    single = shapely.get_num_geometries(regrouped) == 1
    regrouped[single] = shapely.get_geometry(regrouped[single], 0)
    out[present] = regrouped
    return out


def dominant_angle(ring_xy: np.ndarray) -> float:
    """Dominant edge direction of a (simplified) closed ring, radians in [0, π/2).

    Length-weighted circular mean of the edge directions modulo 90°, refined on the edges
    within 15° of it (so diagonal walls do not pull the main axes).
    """
    d = np.diff(ring_xy, axis=0)
    length = np.hypot(d[:, 0], d[:, 1])
    alpha = np.arctan2(d[:, 1], d[:, 0])
    theta = _mean_mod90(alpha, length)
    near = np.abs(_wrap(4 * (alpha - theta))) < 4 * math.radians(15.0)
    if near.any() and length[near].sum() > 0:
        theta = _mean_mod90(alpha[near], length[near])
    return theta % (math.pi / 2)


def _mean_mod90(alpha, weight) -> float:
    # squares weight long runs more: a footprint's walls, not its short jogs
    w = weight**2
    return math.atan2(float(np.sum(w * np.sin(4 * alpha))),
                      float(np.sum(w * np.cos(4 * alpha)))) / 4


def _wrap(a):
    return (a + math.pi) % (2 * math.pi) - math.pi


def _polygon(poly, tol: float, diagonals: bool):
    """One Polygon regularized; the traced polygon itself when no candidate fits it."""
    exterior = np.asarray(poly.exterior.coords)
    simple = np.asarray(shapely.simplify(poly.exterior, tol).coords)
    if len(simple) < 4:
        return poly
    # candidate orientations: the runs' mean, refined on the walls' vertices, and the
    # minimum rotated rectangle's (small objects have too few steps to estimate well);
    # the one whose result overlaps the traced polygon best wins
    first = dominant_angle(simple)
    candidates = [_refine(exterior, tol, first, diagonals), first, _rectangle_angle(poly)]
    best, best_iou = poly, MIN_IOU
    tried: list[float] = []
    for theta in candidates:
        if any(abs(_wrap(4 * (theta - t))) < 4 * math.radians(0.2) for t in tried):
            continue
        tried.append(theta)
        result = _with_angle(poly, exterior, tol, theta, diagonals)
        if result is None:
            continue
        union = shapely.area(shapely.union(result, poly))
        iou = shapely.area(shapely.intersection(result, poly)) / union if union > 0 else 0.0
        if iou > best_iou:
            best, best_iou = result, iou
    return best


def _with_angle(poly, exterior, tol: float, theta: float, diagonals: bool):
    shell = _ring(exterior, tol, theta, diagonals)
    if shell is None:
        return None
    holes = []
    for interior in poly.interiors:
        traced = np.asarray(interior.coords)
        hole = _ring(traced, tol, theta, diagonals)
        holes.append(traced if hole is None else hole)  # a hole too small to square stays
    result = shapely.make_valid(shapely.Polygon(shell, holes), method="structure",
                                keep_collapsed=False)
    return None if result.is_empty else result


def _rectangle_angle(poly) -> float:
    """Orientation of the minimum rotated rectangle, radians in [0, π/2)."""
    coords = np.asarray(shapely.minimum_rotated_rectangle(poly).exterior.coords)
    if len(coords) < 3:
        return 0.0
    d = coords[1] - coords[0]
    return math.atan2(d[1], d[0]) % (math.pi / 2)


def _directions(diagonals: bool) -> np.ndarray:
    return np.radians([0.0, 45.0, 90.0, 135.0] if diagonals else [0.0, 90.0])


def _classify(beta: np.ndarray, diagonals: bool) -> np.ndarray:
    """Direction class of edges at angles ``beta`` (rotated frame): index into _directions."""
    deg = np.degrees(beta) % 180.0
    if not diagonals:
        return np.where((deg >= 45.0) & (deg < 135.0), 1, 0)
    cls = np.where((deg >= 45.0) & (deg < 135.0), 2, 0)
    cls = np.where(np.abs(deg - 45.0) < _DIAGONAL_WINDOW, 1, cls)
    return np.where(np.abs(deg - 135.0) < _DIAGONAL_WINDOW, 3, cls)


def _frame(coords: np.ndarray, theta: float):
    """Ring vertices (unclosed) rotated so that ``theta`` is the x axis, and the way back."""
    pts = coords[:-1]
    origin = pts.mean(axis=0)
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, s], [-s, c]])
    return (pts - origin) @ rot.T, rot, origin


def _runs(local: np.ndarray, tol: float, diagonals: bool, dirs) -> list | None:
    """Straight runs of a ring in its rotated frame: [class, offset, length, first, last]."""
    n = len(local)
    if n < 3:
        return None
    simple = np.asarray(shapely.simplify(shapely.LinearRing(local), tol).coords)[:-1]
    if len(simple) < 3:
        return None
    # indices of the simplified vertices in the traced ring (a subset of it, in ring order)
    keys = local[:, 0] + 1j * local[:, 1]
    order = np.argsort(keys)
    pos = np.clip(np.searchsorted(keys[order], simple[:, 0] + 1j * simple[:, 1]), 0, n - 1)
    idx = order[pos]
    if not np.array_equal(local[idx], simple):
        return None
    d = np.diff(np.vstack([simple, simple[:1]]), axis=0)
    cls = _classify(np.arctan2(d[:, 1], d[:, 0]), diagonals)
    m = len(cls)
    change = np.flatnonzero(cls != np.roll(cls, 1))
    if not len(change):
        return None
    runs: list = []
    for k in range(m):
        e = (change[0] + k) % m
        a, b = int(idx[e]), int(idx[(e + 1) % m])
        if runs and runs[-1][0] == cls[e]:
            runs[-1][2] = b
        else:
            runs.append([int(cls[e]), a, b])
    return [_fit(local, c, a, b, dirs) for c, a, b in runs]


def _refine(coords: np.ndarray, tol: float, theta: float, diagonals: bool) -> float:
    """The dominant angle refined on the traced vertices of the long walls (principal axes)."""
    dirs = _directions(diagonals)
    local, _, _ = _frame(coords, theta)
    runs = _runs(local, tol, diagonals, dirs)
    if not runs:
        return theta
    angles, weights = [], []
    for cls, _, length, a, b in runs:
        if length < 4 * tol or dirs[cls] % (math.pi / 2) > 1e-9:
            continue
        pts = local[_segment_range(a, b, len(local))]
        u = np.array([math.cos(dirs[cls]), math.sin(dirs[cls])])
        along = pts @ u
        lo, hi = np.quantile(along, [0.1, 0.9])
        pts = pts[(along >= lo) & (along <= hi)]  # away from the corners
        if len(pts) < 3:
            continue
        centred = pts - pts.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        angles.append(math.atan2(vt[0, 1], vt[0, 0]))
        weights.append(length)
    if not angles:
        return theta
    return (theta + _mean_mod90(np.array(angles), np.array(weights))) % (math.pi / 2)


def _ring(coords: np.ndarray, tol: float, theta: float, diagonals: bool):
    """The regularized ring (closed coordinates) of a traced ring, or None to keep it."""
    dirs = _directions(diagonals)
    local, rot, origin = _frame(coords, theta)
    runs = _runs(local, tol, diagonals, dirs)
    if runs is None:
        return None
    runs = _tidy(local, runs, tol, dirs)
    if len(runs) < (3 if diagonals else 4):
        return None
    corners = []
    for i in range(len(runs)):
        p = _intersect(runs[i - 1], runs[i], dirs)
        if p is None:
            return None
        corners.append(p)
    world = np.array(corners) @ rot + origin
    # corners that are traced vertices up to rounding become exactly those vertices (an
    # outline already straight and square stays bit for bit as it was traced)
    pts = coords[:-1]
    d2 = ((world[:, None, :] - pts[None, :, :]) ** 2).sum(axis=-1)
    nearest = d2.argmin(axis=1)
    snap = d2[np.arange(len(world)), nearest] <= (tol * 1e-6) ** 2
    world[snap] = pts[nearest[snap]]
    return np.vstack([world, world[:1]])


def _segment_range(a: int, b: int, n: int) -> np.ndarray:
    """Traced vertex indices from a to b going forward around a ring of n vertices."""
    span = (b - a) % n or n
    return (a + np.arange(span + 1)) % n


def _fit(local, cls, a, b, dirs):
    """A run as a line: (class, offset along the normal, weight, first index, last index)."""
    n = len(local)
    sel = local[_segment_range(a, b, n)]
    u = np.array([math.cos(dirs[cls]), math.sin(dirs[cls])])
    normal = np.array([-u[1], u[0]])
    seg = np.diff(sel, axis=0)
    w = np.abs(seg @ u)  # length along the line: the balanced-area offset of the staircase
    mid = (sel[:-1] + sel[1:]) / 2
    total = float(w.sum())
    offset = float((mid @ normal) @ w / total) if total > 0 else float((sel @ normal).mean())
    return [cls, offset, total, a, b]


def _parallel(c1: int, c2: int, dirs) -> bool:
    return c1 == c2 or abs(abs(dirs[c1] - dirs[c2]) - math.pi) < 1e-9


def _tidy(local, runs, tol, dirs):
    """Merge runs that belong together and drop corner cuts, until nothing changes."""
    while len(runs) >= 3:
        n = len(runs)
        same = [i for i in range(n) if runs[i - 1][0] == runs[i][0]]
        if same:  # neighbours of one direction (after a drop): one run
            i = same[0]
            merged = _fit(local, runs[i][0], runs[i - 1][3], runs[i][4], dirs)
            runs = [merged] + _rotated(runs, i - 1)[2:]
            continue
        for i in sorted(range(n), key=lambda k: runs[k][2]):  # shortest first
            r = runs[i]
            if r[2] >= _min_length(r[0], tol, dirs):
                continue
            prev, nxt = runs[i - 1], runs[(i + 1) % n]
            if not _parallel(prev[0], nxt[0], dirs):
                runs = _rotated(runs, i)[1:]  # a corner cut between walls that meet
                break
            if prev[0] == nxt[0] and abs(prev[1] - nxt[1]) < tol:
                # a jog smaller than the tolerance: one straight run
                merged = _fit(local, prev[0], prev[3], nxt[4], dirs)
                runs = [merged] + _rotated(runs, i - 1)[3:]
                break
            # else a real step between parallel walls: keep it
        else:
            return runs
    return runs


def _min_length(cls: int, tol: float, dirs) -> float:
    """Runs shorter than this are jogs or corner cuts (diagonal walls must be longer)."""
    return 2.0 * tol if dirs[cls] % (math.pi / 2) < 1e-9 else 4.0 * tol


def _rotated(runs, k):
    """The cyclic list of runs starting at index k."""
    k %= len(runs)
    return runs[k:] + runs[:k]


def _intersect(r1, r2, dirs):
    """The corner where two fitted lines meet (rotated frame), None when parallel."""
    a1, a2 = dirs[r1[0]], dirs[r2[0]]
    n1 = np.array([-math.sin(a1), math.cos(a1)])
    n2 = np.array([-math.sin(a2), math.cos(a2)])
    m = np.array([n1, n2])
    det = float(np.linalg.det(m))
    if abs(det) < 1e-9:
        return None
    return np.linalg.solve(m, np.array([r1[1], r2[1]]))
