"""Smooth outlines for natural objects (fields, water, trees), keeping neighbours apart.

Traced outlines are pixel staircases. Each ring is resampled at regular spacing and its
points averaged with a Gaussian along the outline (``sigma``); the result is sharpened once
(``2·G(p) - G(G(p))``) so that outlines do not shrink: a Gaussian alone pulls every convex
boundary inwards by about sigma² / (2·radius).

Neighbours stay neighbours: objects that share edges (traced from one label image) are first
noded so that both sides carry the same vertices; every vertex where sharing starts or ends,
or where three objects meet, is pinned, and each stretch between pins is smoothed on its
own, in a canonical direction, so both neighbours compute exactly the same smoothed edge.
Objects that did not overlap do not overlap afterwards (a last check gives any new overlap
to the object that covered it before). Objects that already overlapped keep overlapping.
"""

from __future__ import annotations

import math

import numpy as np
import shapely

__all__ = ["smooth", "DEFAULT_TOLERANCE"]

DEFAULT_TOLERANCE = 2.0  # pixels: the Gaussian's sigma along the outline


def smooth(geoms, sigma: float, *, snap: float = 0.0) -> np.ndarray:
    """Smooth an array of (Multi)Polygons; ``sigma`` in map units (None stays None).

    ``snap``: distance within which neighbours' vertices count as shared (map units).
    """
    from terrasam.vectorize import _make_valid, _node_neighbours

    geoms = np.asarray(geoms, dtype=object)
    out = np.full(len(geoms), None, dtype=object)
    present = np.flatnonzero(~shapely.is_missing(geoms))
    if not len(present) or sigma <= 0:
        out[present] = geoms[present]
        return out
    items = geoms[present]
    noded = _node_neighbours(items, snap) if len(items) > 1 else items
    smoothed = _smooth_rings(noded, sigma)
    smoothed = _make_valid(smoothed)
    out[present] = _no_new_overlaps(items, smoothed)
    return out


# --------------------------------------------------------------------------- rings and pins


def _smooth_rings(geoms: np.ndarray, sigma: float) -> np.ndarray:
    parts, part_owner = shapely.get_parts(geoms, return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    coords, coord_ring = shapely.get_coordinates(rings, return_index=True)
    # drop each ring's closing vertex: rings as cycles of distinct vertices
    last = np.r_[coord_ring[1:] != coord_ring[:-1], True]
    coords, coord_ring = coords[~last], coord_ring[~last]
    owner = part_owner[ring_part][coord_ring]
    keys = coords[:, 0] + 1j * coords[:, 1]
    _, vid = np.unique(keys, return_inverse=True)
    pinned = _pins(vid, coord_ring, owner)
    bounds = np.searchsorted(coord_ring, np.arange(len(rings) + 1))
    step = sigma / 2.0
    new_rings = np.empty(len(rings), dtype=object)
    for r in range(len(rings)):
        lo, hi = bounds[r], bounds[r + 1]
        pts = coords[lo:hi]
        new_rings[r] = shapely.linearrings(_smooth_ring(pts, keys[lo:hi], pinned[lo:hi],
                                                        sigma, step))
    exterior = np.r_[True, ring_part[1:] != ring_part[:-1]] if len(rings) else np.zeros(0, bool)
    shells = new_rings[exterior]
    holes = np.flatnonzero(~exterior)
    polys = []
    hole_lists: list[list] = [[] for _ in range(len(parts))]
    for h in holes:
        hole_lists[ring_part[h]].append(new_rings[h])
    for p in range(len(parts)):
        polys.append(shapely.Polygon(shells[p], hole_lists[p]))
    polys = np.array(polys, dtype=object)
    out = np.full(len(geoms), None, dtype=object)
    polys = shapely.make_valid(polys, method="structure", keep_collapsed=False)
    sub, sub_owner = shapely.get_parts(polys, return_index=True)
    sub_owner = part_owner[sub_owner]
    keep = ~shapely.is_empty(sub) & np.isin(shapely.get_type_id(sub), (3,))
    sub, sub_owner = sub[keep], sub_owner[keep]
    if len(sub):
        order = np.argsort(sub_owner, kind="stable")
        shapely.multipolygons(sub[order], indices=sub_owner[order], out=out)
    return out


def _pins(vid: np.ndarray, ring: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Per ring vertex: whether it must stay where it is.

    A vertex is pinned where three or more objects meet, and where two objects touch but the
    outline of one of them turns away from the other (sharing starts or ends, or a touch at a
    corner). Decided on the vertex itself, so every object touching it agrees.
    """
    n = len(vid)
    if not n:
        return np.zeros(0, bool)
    nv = int(vid.max()) + 1
    pair = np.unique(vid.astype(np.int64) * (int(owner.max()) + 1) + owner)
    owners = np.bincount(pair // (int(owner.max()) + 1), minlength=nv)
    # the next vertex of each vertex around its ring
    start = np.r_[True, ring[1:] != ring[:-1]]
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    end = np.r_[ring[1:] != ring[:-1], True]
    nxt = np.arange(1, n + 1)
    nxt[end] = first[end]
    a, b = vid, vid[nxt]
    lo, hi = np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)
    seg = lo * nv + hi
    seg_owner = np.unique(np.stack([seg, owner]), axis=1)
    useg, counts = np.unique(seg_owner[0], return_counts=True)
    shared = counts[np.searchsorted(useg, seg)] >= 2  # segment i: vertex i -> next
    prev = np.empty(n, dtype=np.int64)
    prev[nxt] = np.arange(n)
    both = shared & shared[prev]
    occ = (owners[vid] >= 3) | ((owners[vid] >= 2) & ~both)
    pinned_vertex = np.bincount(vid[occ], minlength=nv) > 0
    return pinned_vertex[vid]


# --------------------------------------------------------------------------- smoothing


def _smooth_ring(pts, keys, pinned, sigma, step) -> np.ndarray:
    """A ring's smoothed coordinates (closed), arcs between pins smoothed one by one."""
    n = len(pts)
    pins = np.flatnonzero(pinned)
    if not len(pins):
        return _closed(pts, keys, sigma, step)
    pieces = []
    for i, p in enumerate(pins):
        q = pins[(i + 1) % len(pins)]
        span = (q - p) % n or n
        idx = (p + np.arange(span + 1)) % n
        arc = _open(pts[idx], keys[idx], sigma, step)
        pieces.append(arc[:-1])
    ring = np.vstack(pieces)
    return np.vstack([ring, ring[:1]])


def _open(pts, keys, sigma, step) -> np.ndarray:
    """An arc smoothed with its ends fixed, the same whichever way it is walked."""
    if len(pts) < 3:
        return pts
    flip = (keys[0].real, keys[0].imag, keys[1].real, keys[1].imag) > \
        (keys[-1].real, keys[-1].imag, keys[-2].real, keys[-2].imag)
    if flip:
        pts = pts[::-1]
    out = _resample(pts, step, closed=False)
    k = _kernel(sigma, step)
    if len(out) > 2 and len(k) > 1:
        out = _sharpened(out, k, "reflect")
        out[0], out[-1] = pts[0], pts[-1]
        out = np.asarray(shapely.simplify(shapely.linestrings(out), step * 0.05).coords)
    return out[::-1] if flip else out


def _closed(pts, keys, sigma, step) -> np.ndarray:
    """A whole ring smoothed, starting from a canonical vertex in a canonical direction."""
    order = np.lexsort((keys.imag, keys.real))
    s = int(order[0])
    n = len(pts)
    if (keys[(s + 1) % n].real, keys[(s + 1) % n].imag) > \
            (keys[s - 1].real, keys[s - 1].imag):
        idx = (s - np.arange(n)) % n
    else:
        idx = (s + np.arange(n)) % n
    ring = np.vstack([pts[idx], pts[idx[:1]]])
    # a small ring would be smoothed into a dot: its sigma is bounded by its own size
    length = float(np.hypot(*np.diff(ring, axis=0).T).sum())
    if length / 12.0 < sigma:
        sigma = length / 12.0
        step = sigma / 2.0
    out = _resample(ring, step, closed=True)
    k = _kernel(sigma, step)
    if len(out) >= 4 and len(k) > 1:
        out = _sharpened(out, k, "wrap")
    closed = np.vstack([out, out[:1]])
    if len(closed) < 4:
        return ring
    simple = np.asarray(shapely.simplify(shapely.linearrings(closed), step * 0.05).coords)
    return simple if len(simple) >= 4 else closed


def _resample(pts: np.ndarray, step: float, closed: bool) -> np.ndarray:
    """Points at regular spacing along a polyline (the last one dropped for closed rings)."""
    seg = np.hypot(*np.diff(pts, axis=0).T)
    s = np.r_[0.0, np.cumsum(seg)]
    total = s[-1]
    if total <= 0:
        return pts[:1] if closed else pts[[0, -1]]
    count = max(int(math.ceil(total / step)), 3 if closed else 1)
    t = np.linspace(0.0, total, count + 1)
    out = np.column_stack([np.interp(t, s, pts[:, 0]), np.interp(t, s, pts[:, 1])])
    return out[:-1] if closed else out


def _kernel(sigma: float, step: float) -> np.ndarray:
    half = int(math.ceil(3.0 * sigma / step))
    x = np.arange(-half, half + 1) * step
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _gauss(pts: np.ndarray, k: np.ndarray, mode: str) -> np.ndarray:
    half = len(k) // 2
    if mode == "wrap":
        padded = np.take(pts, np.arange(-half, len(pts) + half), axis=0, mode="wrap")
    else:  # odd reflection about the ends: an end stays exactly where it is
        padded = np.pad(pts, ((half, half), (0, 0)), mode="reflect", reflect_type="odd")
    return np.column_stack([np.convolve(padded[:, j], k, mode="valid") for j in range(2)])


def _sharpened(pts: np.ndarray, k: np.ndarray, mode: str) -> np.ndarray:
    once = _gauss(pts, k, mode)
    return 2.0 * once - _gauss(once, k, mode)


# --------------------------------------------------------------------------- overlaps


def _no_new_overlaps(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Where two smoothed objects overlap but the originals did not, give the overlap to the
    one whose original covered more of it."""
    after = after.copy()
    present = ~shapely.is_missing(after)
    if present.sum() < 2:
        return after
    idx = np.flatnonzero(present)
    tree = shapely.STRtree(after[idx])
    left, right = tree.query(after[idx], predicate="intersects")
    keep = left < right
    left, right = idx[left[keep]], idx[right[keep]]
    if not len(left):
        return after
    overlap = shapely.area(shapely.intersection(after[left], after[right]))
    tiny = 1e-9 * np.minimum(shapely.area(after[left]), shapely.area(after[right]))
    new = overlap > tiny
    if not new.any():
        return after
    left, right = left[new], right[new]
    old = shapely.area(shapely.intersection(before[left], before[right]))
    was_apart = old <= 1e-9 * np.minimum(shapely.area(before[left]), shapely.area(before[right]))
    for i, j in zip(left[was_apart], right[was_apart]):
        common = shapely.intersection(after[i], after[j])
        if shapely.area(shapely.intersection(common, before[i])) >= \
                shapely.area(shapely.intersection(common, before[j])):
            after[j] = shapely.difference(after[j], after[i])
        else:
            after[i] = shapely.difference(after[i], after[j])
    from terrasam.vectorize import _make_valid

    return _make_valid(after)
