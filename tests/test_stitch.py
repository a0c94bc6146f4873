"""Cross-tile merging on exact synthetic tile results (no model, no raster)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import shapely
from affine import Affine
from scipy import ndimage

from terrasam.stitch import Stitcher, stitch
from terrasam.vectorize import mask_to_geometry


@dataclass(frozen=True)
class Tile:
    index: int
    row: int
    col: int
    x0: int
    y0: int
    width: int
    height: int


def grid(width, height, size, overlap):
    step = size - overlap

    def starts(n):
        s = list(range(0, max(n - size, 0) + 1, step))
        if s[-1] + size < n:
            s.append(n - size)
        return s

    tiles = []
    for r, y in enumerate(starts(height)):
        for c, x in enumerate(starts(width)):
            tiles.append(Tile(len(tiles), r, c, x, y, min(size, width), min(size, height)))
    return tiles


def records_from_labels(labels, tile, score=0.9):
    """What a perfect model returns for a tile: one record per connected piece of each object."""
    win = labels[tile.y0:tile.y0 + tile.height, tile.x0:tile.x0 + tile.width]
    out = []
    for value in np.unique(win):
        if value == 0:
            continue
        comp, n = ndimage.label(win == value)
        for k, sl in enumerate(ndimage.find_objects(comp), start=1):
            mask = comp[sl] == k
            out.append(SimpleNamespace(
                mask=mask, bbox=(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop),
                predicted_iou=score, stability_score=score - 0.05 * (value % 2)))
    return out


def truth(labels, value):
    return mask_to_geometry(labels == value, Affine.identity())


def iou(a, b):
    return shapely.area(shapely.intersection(a, b)) / shapely.area(shapely.union(a, b))


def run(labels, size, overlap, per_tile=records_from_labels):
    h, w = labels.shape
    tiles = grid(w, h, size, overlap)
    return stitch(((t, per_tile(labels, t)) for t in tiles), tiles, w, h)


def test_objects_across_two_four_and_many_tiles_come_out_whole():
    labels = np.zeros((300, 300), np.int32)
    labels[20:60, 80:140] = 1          # across the vertical seam of tiles 0/1 (x 100..128)
    labels[90:150, 90:150] = 2         # across four tiles
    labels[180:190, 5:295] = 3         # a strip across the whole width (3 tiles)
    labels[200:290, 200:290] = 4       # inside one tile only
    labels[205:215, 205:215] = 0       # ... with a hole
    yy, xx = np.mgrid[:300, :300]
    labels[(yy - 240) ** 2 + (xx - 60) ** 2 < 45 ** 2] = 5  # a disc across a seam
    objects = run(labels, 128, 28)
    assert len(objects) == 5
    for obj in objects:
        best = max(iou(obj.geometry, truth(labels, v)) for v in range(1, 6))
        assert best == pytest.approx(1.0)
    strip = max(objects, key=lambda o: o.geometry.bounds[2] - o.geometry.bounds[0])
    assert strip.n_tiles >= 3
    holed = [o for o in objects if o.geometry.bounds == (200.0, 200.0, 290.0, 290.0)][0]
    assert len(holed.geometry.interiors) == 1


@pytest.mark.parametrize("canvas_limit", [4096**2, 200 * 200])
def test_object_larger_than_many_tiles_is_one_polygon_with_best_scores(canvas_limit):
    labels = np.zeros((520, 520), np.int32)
    labels[10:500, 15:510] = 7
    labels[200:260, 200:260] = 0  # a hole in the middle of the big object
    h, w = labels.shape
    tiles = grid(w, h, 128, 32)
    scores = iter(np.linspace(0.5, 0.99, len(tiles)))

    def per_tile(lab, t):
        s = float(next(scores))
        return records_from_labels(lab, t, score=s)

    objects = stitch(((t, per_tile(labels, t)) for t in tiles), tiles, w, h,
                     canvas_limit=canvas_limit)
    assert len(objects) == 1
    obj = objects[0]
    assert iou(obj.geometry, truth(labels, 7)) == pytest.approx(1.0)
    assert obj.geometry.geom_type == "Polygon" and len(obj.geometry.interiors) == 1
    assert obj.predicted_iou == pytest.approx(0.99)
    assert obj.n_tiles == len(tiles)
    # the seams leave no collinear vertices: the outer ring is a rectangle
    assert len(obj.geometry.exterior.coords) == 5


@pytest.mark.parametrize("block", [32, 64, 256])
def test_large_objects_kept_in_blocks_equal_the_whole_mask(block):
    """A large object with holes, an object inside one of its holes, and a U whose wide arm is
    kept in blocks long before its thin arm joins it at the bottom (the thin arm's upper
    pixels land in blocks closed already: the late-merge path)."""
    labels = np.zeros((400, 360), np.int32)
    labels[10:390, 10:200] = 1
    for y in range(30, 370, 40):
        for x in range(30, 180, 40):
            labels[y:y + 20, x:x + 20] = 0  # 9 x 4 holes ...
    labels[75:85, 75:85] = 2  # ... one holding another object
    labels[10:390, 300:312] = 3  # the thin arm of the U
    labels[360:390, 200:300] = 1  # the U's bottom joins the thin arm to object 1
    labels[10:390, 300:312] = 1
    h, w = labels.shape
    tiles = grid(w, h, 96, 24)
    objects = stitch(((t, records_from_labels(labels, t)) for t in tiles), tiles, w, h,
                     canvas_limit=60 * 60, block=block)
    assert len(objects) == 2
    big = max(objects, key=lambda o: o.geometry.area)
    small = min(objects, key=lambda o: o.geometry.area)
    for obj, value in ((big, 1), (small, 2)):
        assert obj.geometry.is_valid
        assert shapely.symmetric_difference(obj.geometry, truth(labels, value)).area == 0
    assert big.geometry.geom_type == "Polygon" and len(big.geometry.interiors) == 36
    # the seams left no collinear vertices: as few as vectorising the whole mask at once
    assert shapely.get_num_coordinates(big.geometry) == \
        shapely.get_num_coordinates(truth(labels, 1))
    assert big.n_tiles == len({t.index for t in tiles if (labels[
        t.y0:t.y0 + t.height, t.x0:t.x0 + t.width] == 1).any()})


def test_open_objects_are_counted_and_reported_as_they_finish():
    labels = np.zeros((200, 200), np.int32)
    labels[10:190, 20:30] = 1
    labels[150:190, 100:190] = 2
    tiles = grid(200, 200, 96, 24)
    stitcher = Stitcher(tiles, 200, 200)
    for t in tiles[:-1]:
        stitcher.add_tile(t, records_from_labels(labels, t))
    assert stitcher.open_objects >= 1
    seen = []
    open_now = stitcher.open_objects
    done = stitcher.finish(on_object=lambda: seen.append(1))
    assert len(seen) == len(done) == open_now


def test_cut_part_inside_neighbours_part_is_absorbed_but_nested_objects_are_not():
    labels = np.zeros((128, 228), np.int32)
    labels[30:70, 105:160] = 1  # cut by tile 0's right edge (x 128), whole in tile 1
    labels[80:128, :] = 2       # a field along the bottom, across both tiles
    h, w = labels.shape
    tiles = grid(w, h, 128, 28)  # tiles at x 0 and 100: shared strip x 100..128
    assert [t.x0 for t in tiles] == [0, 100]

    def per_tile(lab, t):
        recs = records_from_labels(lab, t)
        if t.x0 == 0:
            # tile 0 sees only a sliver of object 1 at its inner edge ...
            recs = [r for r in recs if r.bbox[:2] != (105, 30)]
            recs.append(SimpleNamespace(mask=np.ones((10, 10), bool), bbox=(118, 40, 128, 50),
                                        predicted_iou=0.7, stability_score=0.7))
            # ... and a small object inside the field, in the shared strip, not cut
            recs.append(SimpleNamespace(mask=np.ones((6, 6), bool), bbox=(110, 100, 116, 106),
                                        predicted_iou=0.9, stability_score=0.9))
        return recs

    objects = stitch(((t, per_tile(labels, t)) for t in tiles), tiles, w, h)
    bounds = sorted(o.geometry.bounds for o in objects)
    assert bounds == [(0.0, 80.0, 228.0, 128.0), (105.0, 30.0, 160.0, 70.0),
                      (110.0, 100.0, 116.0, 106.0)]


def test_ids_follow_top_left_and_do_not_depend_on_record_order():
    labels = np.zeros((200, 200), np.int32)
    for k, (y, x) in enumerate([(150, 20), (10, 150), (10, 20), (80, 90)], start=1):
        labels[y:y + 30, x:x + 30] = k

    def reversed_records(lab, t):
        return records_from_labels(lab, t)[::-1]

    a = run(labels, 128, 56)
    b = run(labels, 128, 56, per_tile=reversed_records)
    assert [o.id for o in a] == [1, 2, 3, 4]
    assert [o.geometry.bounds[:2] for o in a] == [(20, 10), (150, 10), (90, 80), (20, 150)]
    assert [o.geometry.wkt for o in a] == [o.geometry.wkt for o in b]


def test_held_masks_do_not_grow_with_the_number_of_rows():
    def peak(rows):
        h = 96 * rows + 32
        labels = np.zeros((h, 352), np.int32)
        labels[:, :] = 1  # worst case: one object covering everything
        tiles = grid(352, h, 128, 32)
        st = Stitcher(tiles, 352, h)
        out = []
        for t in tiles:
            out += st.add_tile(t, records_from_labels(labels, t))
        out += st.finish()
        assert len(out) == 1
        return st.peak_held_pixels

    assert peak(12) == peak(3)
    # one tile in full plus the strips the next row shares: less than one row of tiles
    assert peak(3) < 352 * 128


def test_tiles_must_come_in_order():
    tiles = grid(256, 256, 128, 0)
    st = Stitcher(tiles, 256, 256)
    with pytest.raises(ValueError, match="out of order"):
        st.add_tile(tiles[1], [])


def test_identical_masks_of_one_tile_are_one_object():
    from terrasam.stitch import stitch
    from terrasam.tiling import MaskRecord, make_grid

    grid = make_grid(2, 2, Affine.identity(), tile_size=1024, overlap=256)
    mask = np.array([[True, False], [True, True]])
    same = [MaskRecord(mask.copy(), (0, 0, 2, 2), 3, 0.9, 0.9) for _ in range(5)]
    other = MaskRecord(np.ones((1, 1), bool), (1, 0, 2, 1), 1, 0.8, 0.8)
    objects = stitch([(grid.tiles[0], [*same, other])], grid.tiles, 2, 2)
    assert len(objects) == 2
    assert sorted(o.geometry.area for o in objects) == [1.0, 3.0]
