"""Cross-tile merge: parts of the same object seen by overlapping tiles become one object.

Everything here is in the PROCESSING grid's pixel coordinates (x = column, y = row). A tile's
mask record lands at ``tile.x0 + bbox``. Two parts from overlapping tiles are the same object
when, inside the region both tiles see, their IoU is high, or when the smaller one is cut by an
inner tile edge and lies (almost) inside the other; those pairs are joined with union-find.

Memory stays flat: tiles are added in row-major order, each tile keeps only the part of its
masks that a later tile still overlaps, and an object whose parts can no longer meet anything
is finished at once: its parts (kept as packed bits) are painted on one canvas and vectorised
once. An object that grows past ``canvas_limit`` pixels is kept on a fixed grid of
``BLOCK``-pixel blocks instead: each block is vectorised as soon as no later tile can add to
it, and the disjoint block pieces are joined at the end by :func:`terrasam.vectorize.join_blocks`
(near-linear in the pieces, no single long GEOS call), so no mask of the whole raster, or of a
whole large object, ever exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import shapely
from affine import Affine

from terrasam.vectorize import join_blocks, mask_to_geometry

BLOCK = 1024  # the block grid of large objects (processing pixels, from the grid's origin)


@dataclass
class StitchedObject:
    """One final object: its polygon in processing-grid pixel coordinates and its best scores."""

    geometry: object  # shapely (Multi)Polygon, pixel coordinates of the processing grid
    predicted_iou: float
    stability_score: float
    n_tiles: int
    n_parts: int
    id: int = 0

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return tuple(self.geometry.bounds)


@dataclass
class _Part:
    uid: int
    x0: int  # global bbox of the mask still held (shrinks as later tiles are done)
    y0: int
    x1: int
    y1: int
    mask: np.ndarray
    inner_edge: bool


@dataclass
class _Group:
    pending: list  # (x0, y0, h, w, packed bits, tile index): parts not yet vectorised
    predicted_iou: float
    stability_score: float
    tiles: set
    bbox: list  # [x0, y0, x1, y1] of the pending parts
    # large objects: parts clipped to the open blocks, and the vectorised closed blocks
    blocks: dict | None = None  # (bx, by) -> [(x0, y0, h, w, packed bits, 0)]
    pieces: dict | None = None  # (bx, by) -> (Multi)Polygon of the block
    n_parts: int = 1
    live: int = 1


@dataclass
class _Held:
    """A tile that later tiles still overlap: its rectangle and its parts cropped to that."""

    pos: int
    rect: tuple[int, int, int, int]
    parts: list = field(default_factory=list)


def _rect(tile) -> tuple[int, int, int, int]:
    return (tile.x0, tile.y0, tile.x0 + tile.width, tile.y0 + tile.height)


def _intersect(a, b):
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def _count_in(part: _Part, r) -> int:
    c = _intersect((part.x0, part.y0, part.x1, part.y1), r)
    if c is None:
        return 0
    return int(part.mask[c[1] - part.y0:c[3] - part.y0, c[0] - part.x0:c[2] - part.x0].sum())


def _window(part: _Part, r) -> np.ndarray:
    return part.mask[r[1] - part.y0:r[3] - part.y0, r[0] - part.x0:r[2] - part.x0]


class Stitcher:
    """Streaming merge of tile results.

    tiles: every tile that will be added, in the order they will be added (row-major: sorted by
    y0 then x0, as ``tiling`` makes them). width/height: the processing grid, so that a tile edge
    on the raster's edge is not taken for a cut. merge_iou: IoU in the shared region above which
    two parts are one object. merge_ios: intersection over the smaller part (in the shared region)
    above which a part cut by an inner tile edge is absorbed into the other. canvas_limit:
    pixels of an object's box above which it is kept in blocks of ``block`` pixels.
    """

    def __init__(self, tiles: Sequence, width: int, height: int, *, merge_iou: float = 0.5,
                 merge_ios: float = 0.8, connectivity: int = 8, canvas_limit: int = 4096**2,
                 block: int = BLOCK):
        self.tiles = list(tiles)
        keys = [(t.y0, t.x0) for t in self.tiles]
        if keys != sorted(keys):
            raise ValueError("tiles must be in row-major order (by y0, then x0)")
        self.width, self.height = width, height
        self.merge_iou, self.merge_ios = merge_iou, merge_ios
        self.connectivity = connectivity
        self.canvas_limit = canvas_limit
        self.block = int(block)
        self._pos = {t.index: i for i, t in enumerate(self.tiles)}
        self._later = self._later_overlaps()
        self._block_last = self._last_tile_of_blocks()
        self._closed_upto = -1  # tiles up to this position are added and matched
        self._large: set[int] = set()  # roots of the groups kept in blocks
        self._next = 0
        self._held: list[_Held] = []
        self._parent: list[int] = []
        self._groups: dict[int, _Group] = {}
        self._done: list[StitchedObject] = []
        self.peak_held_pixels = 0  # mask pixels held at once, for the memory benchmark

    def _later_overlaps(self) -> list[list[tuple[int, tuple]]]:
        """For each tile, the later tiles it overlaps and the shared rectangle."""
        rects = [_rect(t) for t in self.tiles]
        later: list[list[tuple[int, tuple]]] = []
        for i, r in enumerate(rects):
            out = []
            for j in range(i + 1, len(rects)):
                if rects[j][1] >= r[3]:
                    break  # sorted by y0: nothing further down can touch this tile
                shared = _intersect(r, rects[j])
                if shared is not None:
                    out.append((j, shared))
            later.append(out)
        return later

    def _last_tile_of_blocks(self) -> np.ndarray:
        """For each block of the block grid, the position of the last tile that overlaps it."""
        b = self.block
        last = np.full((-(-self.height // b), -(-self.width // b)), -1, np.int64)
        for pos, t in enumerate(self.tiles):
            x0, y0, x1, y1 = _rect(t)
            last[y0 // b:-(-y1 // b), x0 // b:-(-x1 // b)] = pos
        return last

    # union-find over part ids; the root carries the group
    def _find(self, a: int) -> int:
        while self._parent[a] != a:
            self._parent[a] = self._parent[self._parent[a]]
            a = self._parent[a]
        return a

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        if ra > rb:
            ra, rb = rb, ra
        ga, gb = self._groups[ra], self._groups.pop(rb)
        self._parent[rb] = ra
        self._large.discard(rb)
        ga.predicted_iou = max(ga.predicted_iou, gb.predicted_iou)
        ga.stability_score = max(ga.stability_score, gb.stability_score)
        ga.tiles |= gb.tiles
        ga.n_parts += gb.n_parts
        ga.live += gb.live
        if ga.blocks is None and gb.blocks is None:
            ga.pending.extend(gb.pending)
            ga.bbox = [min(ga.bbox[0], gb.bbox[0]), min(ga.bbox[1], gb.bbox[1]),
                       max(ga.bbox[2], gb.bbox[2]), max(ga.bbox[3], gb.bbox[3])]
            if (ga.bbox[2] - ga.bbox[0]) * (ga.bbox[3] - ga.bbox[1]) > self.canvas_limit:
                self._make_large(ra, ga)
            return
        if ga.blocks is None:
            self._make_large(ra, ga)
        if gb.blocks is None:
            self._distribute(ga, gb.pending)
            return
        for key, items in gb.blocks.items():  # open blocks are open for every group
            ga.blocks.setdefault(key, []).extend(items)
        for key, geom in gb.pieces.items():
            ga.pieces[key] = _join_piece(ga.pieces.get(key), geom)

    def _make_large(self, root: int, group: _Group) -> None:
        """Keep a group that outgrew the canvas in blocks from now on."""
        group.blocks, group.pieces = {}, {}
        items, group.pending = group.pending, []
        group.bbox = [0, 0, 0, 0]
        self._large.add(root)
        self._distribute(group, items)

    def _distribute(self, group: _Group, items: list) -> None:
        """Clip parts to the blocks they cover; what lands in a closed block is joined at once
        (a rare late merge: the block's piece is unioned with the new pixels)."""
        late: dict = {}
        for gx, gy, h, w, bits, _ in items:
            mask = np.unpackbits(bits, count=h * w).reshape(h, w).view(bool)
            b = self.block
            for by in range(gy // b, (gy + h - 1) // b + 1):
                for bx in range(gx // b, (gx + w - 1) // b + 1):
                    x0, y0 = max(gx, bx * b), max(gy, by * b)
                    x1, y1 = min(gx + w, (bx + 1) * b), min(gy + h, (by + 1) * b)
                    sub = mask[y0 - gy:y1 - gy, x0 - gx:x1 - gx]
                    if not sub.any():
                        continue
                    item = (x0, y0, y1 - y0, x1 - x0, np.packbits(sub), 0)
                    closed = self._block_last[by, bx] <= self._closed_upto
                    (late if closed else group.blocks).setdefault((bx, by), []).append(item)
        for key, block_items in late.items():
            group.pieces[key] = _join_piece(group.pieces.get(key),
                                            _paint(block_items, self.connectivity))

    def _close_blocks(self) -> None:
        """Vectorise the blocks of large objects that no later tile overlaps."""
        for root in self._large:
            group = self._groups[root]
            for key in [k for k in group.blocks
                        if self._block_last[k[1], k[0]] <= self._closed_upto]:
                group.pieces[key] = _join_piece(group.pieces.get(key),
                                                _paint(group.blocks.pop(key), self.connectivity))

    def add_tile(self, tile, records: Iterable) -> list[StitchedObject]:
        """Add one tile's mask records; returns the objects that are now final."""
        pos = self._pos.get(tile.index)
        if pos != self._next:
            raise ValueError(f"tile {tile.index} added out of order")
        self._next += 1
        rect = _rect(tile)
        new: list[_Part] = []
        seen: set = set()
        for rec in records:
            bx0, by0, bx1, by1 = (int(v) for v in rec.bbox)
            mask = np.asarray(rec.mask, dtype=bool)
            if not mask.any():
                continue
            # the same pixels twice are one object (box NMS lets identical masks through when
            # it is off, or when their box is a pixel thin); the first record stands
            key = (bx0, by0, mask.shape, np.packbits(mask).tobytes())
            if key in seen:
                continue
            seen.add(key)
            gx0, gy0 = tile.x0 + bx0, tile.y0 + by0
            h, w = mask.shape
            inner = ((bx0 == 0 and rect[0] > 0) or (by0 == 0 and rect[1] > 0)
                     or (bx1 >= tile.width and rect[2] < self.width)
                     or (by1 >= tile.height and rect[3] < self.height))
            uid = len(self._parent)
            self._parent.append(uid)
            self._groups[uid] = _Group([(gx0, gy0, h, w, np.packbits(mask), tile.index)],
                                       float(rec.predicted_iou), float(rec.stability_score),
                                       {tile.index}, [gx0, gy0, gx0 + w, gy0 + h])
            new.append(_Part(uid, gx0, gy0, gx0 + w, gy0 + h, mask, inner))

        for held in self._held:
            shared = _intersect(held.rect, rect)
            if shared is not None and held.parts and new:
                self._match(new, held.parts, shared)

        self._held.append(_Held(pos, rect, new))
        self._closed_upto = pos
        self._close_blocks()
        self._shrink(pos)
        done, self._done = self._done, []
        return done

    def _match(self, new: list[_Part], old: list[_Part], shared) -> None:
        nb = np.array([(p.x0, p.y0, p.x1, p.y1) for p in new])
        ob = np.array([(q.x0, q.y0, q.x1, q.y1) for q in old])
        # each part clipped to the shared region; pairs of clipped boxes that overlap, found
        # with a spatial index (a dense new x old comparison grows with the square of the
        # objects per tile)
        nc = np.concatenate([np.maximum(nb[:, :2], shared[:2]), np.minimum(nb[:, 2:], shared[2:])],
                            axis=1)
        oc = np.concatenate([np.maximum(ob[:, :2], shared[:2]), np.minimum(ob[:, 2:], shared[2:])],
                            axis=1)
        n_live = np.flatnonzero((nc[:, 0] < nc[:, 2]) & (nc[:, 1] < nc[:, 3]))
        o_live = np.flatnonzero((oc[:, 0] < oc[:, 2]) & (oc[:, 1] < oc[:, 3]))
        if not len(n_live) or not len(o_live):
            return
        tree = shapely.STRtree(shapely.box(*oc[o_live].T))
        qi, ti = tree.query(shapely.box(*nc[n_live].T), predicate="intersects")
        ii, jj = n_live[qi], o_live[ti]
        x0 = np.maximum(nc[ii, 0], oc[jj, 0])
        y0 = np.maximum(nc[ii, 1], oc[jj, 1])
        x1 = np.minimum(nc[ii, 2], oc[jj, 2])
        y1 = np.minimum(nc[ii, 3], oc[jj, 3])
        ok = (x0 < x1) & (y0 < y1)  # boxes that only touch share no pixel
        ii, jj, x0, y0, x1, y1 = ii[ok], jj[ok], x0[ok], y0[ok], x1[ok], y1[ok]
        order = np.lexsort((jj, ii))  # the pairs in the order of the dense scan before
        ii, jj, x0, y0, x1, y1 = ii[order], jj[order], x0[order], y0[order], x1[order], y1[order]
        n_in: dict[int, int] = {}
        o_in: dict[int, int] = {}
        for k, (i, j) in enumerate(zip(ii.tolist(), jj.tolist())):
            p, q = new[i], old[j]
            r = (int(x0[k]), int(y0[k]), int(x1[k]), int(y1[k]))
            inter = int(np.count_nonzero(_window(p, r) & _window(q, r)))
            if inter == 0:
                continue
            if i not in n_in:
                n_in[i] = _count_in(p, shared)
            if j not in o_in:
                o_in[j] = _count_in(q, shared)
            a, b = n_in[i], o_in[j]
            iou = inter / (a + b - inter)
            small_cut = p.inner_edge if a <= b else q.inner_edge
            if iou >= self.merge_iou or (small_cut and inter / min(a, b) >= self.merge_ios):
                self._union(p.uid, q.uid)

    def _shrink(self, pos: int) -> None:
        """Crop held masks to what tiles after ``pos`` still see; finish what nothing sees."""
        keep = []
        held_pixels = 0
        for held in self._held:
            future = [r for j, r in self._later[held.pos] if j > pos]
            if future:
                box = (min(r[0] for r in future), min(r[1] for r in future),
                       max(r[2] for r in future), max(r[3] for r in future))
            parts = []
            for p in held.parts:
                c = _intersect((p.x0, p.y0, p.x1, p.y1), box) if future else None
                if c is not None:
                    sub = _window(p, c)
                    if sub.any():
                        if c != (p.x0, p.y0, p.x1, p.y1):
                            p.mask = sub.copy()  # a copy lets the full mask go
                            p.x0, p.y0, p.x1, p.y1 = c
                        parts.append(p)
                        held_pixels += p.mask.size
                        continue
                self._release(p.uid)
            held.parts = parts
            if future:
                keep.append(held)
        self._held = keep
        self.peak_held_pixels = max(self.peak_held_pixels, held_pixels)

    def _release(self, uid: int) -> None:
        root = self._find(uid)
        group = self._groups[root]
        group.live -= 1
        if group.live == 0:
            del self._groups[root]
            self._large.discard(root)
            self._done.append(self._finish(group))

    def _finish(self, group: _Group) -> StitchedObject:
        if group.blocks is None:
            geom = _paint(group.pending, self.connectivity)
        else:
            for key in list(group.blocks):
                group.pieces[key] = _join_piece(group.pieces.get(key),
                                                _paint(group.blocks.pop(key), self.connectivity))
            geom = join_blocks(group.pieces, self.block)
        return StitchedObject(geom, group.predicted_iou, group.stability_score,
                              len(group.tiles), group.n_parts)

    @property
    def open_objects(self) -> int:
        """Objects that some tile still held can extend (finished by :meth:`finish`)."""
        return len(self._groups)

    def finish(self, on_object=None) -> list[StitchedObject]:
        """Close every tile still held (also when some tiles were never added).

        ``on_object()`` is called as each object still open is finished (progress)."""
        for held in self._held:
            for p in held.parts:
                n = len(self._done)
                self._release(p.uid)
                if on_object is not None and len(self._done) > n:
                    on_object()
        self._held = []
        done, self._done = self._done, []
        return done


def _paint(items: list, connectivity: int):
    """One polygon (pixel coordinates) from parts given as packed masks at global offsets."""
    x0 = min(it[0] for it in items)
    y0 = min(it[1] for it in items)
    x1 = max(it[0] + it[3] for it in items)
    y1 = max(it[1] + it[2] for it in items)
    canvas = np.zeros((y1 - y0, x1 - x0), bool)
    for px, py, h, w, bits, _ in items:
        canvas[py - y0:py - y0 + h, px - x0:px - x0 + w] |= (
            np.unpackbits(bits, count=h * w).reshape(h, w).view(bool))
    return mask_to_geometry(canvas, Affine.translation(x0, y0), connectivity)


def _join_piece(a, b):
    """Two pieces of one block as one (exact: integer pixel edges)."""
    if a is None:
        return b
    return shapely.simplify(shapely.union(a, b), 0.0, preserve_topology=False)


def assign_ids(objects: list[StitchedObject]) -> list[StitchedObject]:
    """Sort objects by their top-left corner (then size) and number them 1..n in that order."""
    def key(o):
        b = o.geometry.bounds
        return (b[1], b[0], b[3], b[2], -o.geometry.area, o.geometry.wkb)

    ordered = sorted(objects, key=key)
    for i, o in enumerate(ordered, start=1):
        o.id = i
    return ordered


def stitch(results: Iterable, tiles: Sequence, width: int, height: int,
           **kwargs) -> list[StitchedObject]:
    """Merge ``(tile, records)`` pairs (in tile order) into objects with global ids 1..n."""
    stitcher = Stitcher(tiles, width, height, **kwargs)
    objects: list[StitchedObject] = []
    for tile, records in results:
        objects.extend(stitcher.add_tile(tile, records))
    objects.extend(stitcher.finish())
    return assign_ids(objects)
