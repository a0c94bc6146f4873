"""Property-based tests: the vectorizer's polygons rasterize back to the same pixels under any
affine, and the stitcher finds the same objects whatever the tiling."""

from __future__ import annotations

import numpy as np
import shapely
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.features import rasterize
from scipy import ndimage

from oracle import ComponentsJob
from terrasam.stitch import stitch
from terrasam.tiling import make_grid
from terrasam.vectorize import join_blocks, labels_to_geometries, mask_to_geometry, mask_to_polygons

SETTINGS = settings(max_examples=40, deadline=None, database=None)


# --------------------------------------------------------------------------- vectorizer


@st.composite
def masks(draw):
    """Random boolean masks: noise (diagonal touches, holes, border pixels) or blocky shapes."""
    h = draw(st.integers(1, 24))
    w = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["noise", "blocks", "ring", "checker"]))
    if kind == "noise":
        mask = rng.random((h, w)) < draw(st.floats(0.1, 0.9))
    elif kind == "blocks":
        mask = np.zeros((h, w), bool)
        for _ in range(draw(st.integers(1, 5))):
            r0, c0 = rng.integers(0, h), rng.integers(0, w)
            mask[r0:r0 + rng.integers(1, h + 1), c0:c0 + rng.integers(1, w + 1)] = True
    elif kind == "ring":  # a hole (with an island in it when big enough)
        mask = np.ones((h, w), bool)
        mask[h // 4:h - h // 4, w // 4:w - w // 4] = False
        if h >= 8 and w >= 8:
            mask[h // 2, w // 2] = True
    else:  # pixels touching only at corners
        mask = (np.add.outer(np.arange(h), np.arange(w)) % 2) == 0
    return mask


@st.composite
def affines(draw):
    """North-up (either y direction), rotated and sheared transforms, far from singular."""
    sx = draw(st.floats(0.01, 1000.0)) * draw(st.sampled_from([1, -1]))
    sy = draw(st.floats(0.01, 1000.0)) * draw(st.sampled_from([1, -1]))
    ox = draw(st.floats(-1e6, 1e6))
    oy = draw(st.floats(-1e7, 1e7))
    kind = draw(st.sampled_from(["north-up", "rotated", "sheared"]))
    t = Affine.translation(ox, oy)
    if kind == "rotated":
        t = t @ Affine.rotation(draw(st.floats(-179.0, 179.0)))
    elif kind == "sheared":
        t = t @ Affine.shear(draw(st.floats(-40.0, 40.0)), draw(st.floats(-40.0, 40.0)))
    return t @ Affine.scale(sx, sy)


def burn(geoms, shape, transform) -> np.ndarray:
    if len(geoms) == 0:
        return np.zeros(shape, bool)
    return rasterize([(g, 1) for g in geoms], out_shape=shape, transform=transform,
                     fill=0, dtype="uint8").astype(bool)


@SETTINGS
@given(mask=masks(), block=st.integers(1, 12), connectivity=st.sampled_from([4, 8]))
def test_block_pieces_join_to_the_whole_masks_polygons(mask, block, connectivity):
    """join_blocks of a mask vectorised block by block = the mask vectorised at once."""
    h, w = mask.shape
    pieces = {}
    for by in range(-(-h // block)):
        for bx in range(-(-w // block)):
            sub = mask[by * block:(by + 1) * block, bx * block:(bx + 1) * block]
            pieces[(bx, by)] = mask_to_geometry(sub, Affine.translation(bx * block, by * block),
                                                connectivity)
    joined = join_blocks(pieces, block)
    whole = mask_to_geometry(mask, Affine.identity(), connectivity)
    if whole is None:
        assert joined is None
        return
    assert joined.is_valid
    assert np.array_equal(burn([joined], mask.shape, Affine.identity()), mask)
    assert shapely.symmetric_difference(joined, whole).area == 0
    assert shapely.get_num_geometries(joined) == shapely.get_num_geometries(whole)


@SETTINGS
@given(mask=masks(), transform=affines(), connectivity=st.sampled_from([4, 8]))
def test_polygons_rasterize_back_to_the_same_pixels(mask, transform, connectivity):
    polys = mask_to_polygons(mask, transform, connectivity)
    assert all(shapely.is_valid(p) for p in polys)
    assert np.array_equal(burn(polys, mask.shape, transform), mask)
    # each polygon is one connected region of the mask
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    _, regions = ndimage.label(mask, structure=structure)
    assert len(polys) == regions
    geom = mask_to_geometry(mask, transform, connectivity)
    if not mask.any():
        assert geom is None
    else:
        assert shapely.is_valid(geom)
        assert np.array_equal(burn([geom], mask.shape, transform), mask)
        pixel_area = abs(transform.determinant)
        assert abs(shapely.area(geom) - mask.sum() * pixel_area) <= 1e-6 * mask.sum() * pixel_area


@SETTINGS
@given(shape=st.tuples(st.integers(1, 20), st.integers(1, 20)), n=st.integers(1, 6),
       seed=st.integers(0, 2**32 - 1), transform=affines())
def test_label_images_rasterize_back_label_by_label(shape, n, seed, transform):
    labels = np.random.default_rng(seed).integers(0, n + 1, shape).astype(np.int32)
    geoms = labels_to_geometries(labels, transform)
    assert set(geoms) == {int(v) for v in np.unique(labels) if v}
    for value, geom in geoms.items():
        assert shapely.is_valid(geom)
        assert np.array_equal(burn([geom], shape, transform), labels == value), value


# --------------------------------------------------------------------------- stitcher

BACKGROUND = (20, 20, 20)


@st.composite
def scenes(draw):
    """A label image of non-touching objects (rectangles, L shapes, rings), each its own label."""
    h = draw(st.integers(64, 160))
    w = draw(st.integers(64, 160))
    labels = np.zeros((h, w), np.int32)
    taken = np.zeros((h, w), bool)  # object pixels grown by one: later objects keep clear
    n = 0
    for _ in range(draw(st.integers(1, 8))):
        oh, ow = draw(st.integers(1, h // 2)), draw(st.integers(1, w // 2))
        r0, c0 = draw(st.integers(0, h - oh)), draw(st.integers(0, w - ow))
        shape = np.ones((oh, ow), bool)
        kind = draw(st.sampled_from(["rect", "L", "ring"]))
        if kind == "L" and oh >= 3 and ow >= 3:
            shape[: oh // 2, ow // 2:] = False
        elif kind == "ring" and oh >= 5 and ow >= 5:
            shape[2:-2, 2:-2] = False
        region = np.zeros((h, w), bool)
        region[r0:r0 + oh, c0:c0 + ow] = shape
        if (region & taken).any():
            continue
        n += 1
        labels[region] = n
        taken |= ndimage.binary_dilation(region, np.ones((3, 3), bool))
    return labels


def rgb_of(labels) -> np.ndarray:
    rgb = np.empty(labels.shape + (3,), np.uint8)
    rgb[:] = BACKGROUND
    rgb[labels > 0] = (200, 120, 60)  # one colour: objects differ only by where they are
    return rgb


def pixel_sets(objects, shape) -> set:
    found = set()
    for obj in objects:
        burnt = burn([obj.geometry], shape, Affine.identity())
        found.add(frozenset(zip(*np.nonzero(burnt))))
    return found


def truth_sets(labels) -> set:
    return {frozenset(zip(*np.nonzero(labels == v))) for v in np.unique(labels) if v}


@SETTINGS
@given(labels=scenes(), tile=st.integers(16, 96), overlap_fraction=st.floats(0.25, 0.6),
       block=st.sampled_from([None, 8, 21, 64]))
def test_any_tiling_of_a_scene_gives_the_same_objects(labels, tile, overlap_fraction, block):
    """... also when objects are kept in blocks (``block``: every object above 64 px of box
    takes the large-object path, on that block grid)."""
    h, w = labels.shape
    overlap = min(tile - 1, max(4, int(tile * overlap_fraction)))
    grid = make_grid(w, h, Affine.identity(), tile_size=tile, overlap=overlap)
    rgb = rgb_of(labels)
    job = ComponentsJob(background=BACKGROUND)

    def results():
        for t in grid.tiles:
            window = rgb[t.y0:t.y0 + t.height, t.x0:t.x0 + t.width]
            yield t, job(None, window, None)

    large = {} if block is None else {"canvas_limit": 64, "block": block}
    objects = stitch(results(), grid.tiles, grid.width, grid.height, **large)
    assert pixel_sets(objects, labels.shape) == truth_sets(labels)
    assert all(o.geometry.is_valid for o in objects)
    assert [o.id for o in objects] == list(range(1, len(objects) + 1))
    # one tile holding everything is the reference every tiling must agree with
    whole = make_grid(w, h, Affine.identity(), tile_size=max(w, h), overlap=0)
    single = stitch([(t, job(None, rgb, None)) for t in whole.tiles], whole.tiles, w, h)
    assert [shapely.normalize(o.geometry).wkt for o in objects] == \
        [shapely.normalize(o.geometry).wkt for o in single]
