"""The processing grid: tile layout, overlap, flush edges, gsd resampling, all-nodata skipping."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from affine import Affine

from synth import make_scene, rect, utm_transform, write_raster
from terrasam.errors import TerrasamError
from terrasam.raster import open_raster
from terrasam.tiling import TileSpec, make_grid


def test_tiles_step_and_last_tile_flush():
    t = utm_transform(0.5)
    grid = make_grid(2500, 1500, t, tile_size=1024, overlap=256)
    assert (grid.rows, grid.cols, len(grid.tiles)) == (2, 3, 6)
    assert sorted({tile.x0 for tile in grid.tiles}) == [0, 768, 1476]
    assert sorted({tile.y0 for tile in grid.tiles}) == [0, 476]
    assert all((tile.width, tile.height) == (1024, 1024) for tile in grid.tiles)
    assert [tile.index for tile in grid.tiles] == list(range(6))
    last = grid.tiles[-1]
    assert (last.row, last.col, last.window) == (1, 2, (1476, 476, 1024, 1024))
    assert last.transform @ (0, 0) == t @ (1476, 476)
    assert last.transform @ (1024, 1024) == t @ (2500, 1500)
    assert grid.scale == 1.0 and grid.transform == t and (grid.width, grid.height) == (2500, 1500)


def test_grid_covers_every_pixel_with_at_least_the_overlap():
    grid = make_grid(3000, 1100, Affine.identity(), tile_size=512, overlap=128)
    cover = np.zeros((1100, 3000), dtype=np.uint8)
    for tile in grid.tiles:
        cover[tile.y0:tile.y0 + tile.height, tile.x0:tile.x0 + tile.width] += 1
        assert tile.x0 + tile.width <= 3000 and tile.y0 + tile.height <= 1100
    assert cover.min() >= 1
    xs = sorted({tile.x0 for tile in grid.tiles})
    assert all(512 - (b - a) >= 128 for a, b in zip(xs, xs[1:]))


@pytest.mark.parametrize(("size", "starts"), [(300, [0]), (1024, [0]), (1792, [0, 768]),
                                              (1793, [0, 768, 769])])
def test_small_and_exact_sizes(size, starts):
    grid = make_grid(size, 200, Affine.identity(), tile_size=1024, overlap=256)
    assert [tile.x0 for tile in grid.tiles] == starts
    assert all(tile.width == min(size, 1024) and tile.height == 200 for tile in grid.tiles)


def test_gsd_resamples_the_processing_grid():
    t = utm_transform(0.5, origin=(400_000.0, 3_000_000.0))
    grid = make_grid(3000, 2000, t, tile_size=1024, overlap=256, gsd=2.0)
    assert grid.scale == 4.0 and (grid.width, grid.height) == (750, 500)
    assert len(grid.tiles) == 1
    tile = grid.tiles[0]
    assert (tile.width, tile.height) == (750, 500) and tile.window == (0, 0, 3000, 2000)
    assert grid.transform.a == 2.0 and tile.transform @ (750, 500) == t @ (3000, 2000)
    fine = make_grid(1000, 1000, t, tile_size=512, overlap=0, gsd=0.25)  # upsampled x2
    assert fine.scale == 0.5 and (fine.width, fine.height) == (2000, 2000)
    second = fine.tiles[1]
    assert second.x0 == 512 and second.window == (256.0, 0.0, 256.0, 256.0)
    assert second.transform @ (0, 0) == pytest.approx(t @ (256, 0))
    # res given explicitly (e.g. metres for a geographic raster); non-square uses the mean
    g = make_grid(100, 100, t, gsd=10.0, res=(2.0, 8.0))
    assert g.scale == pytest.approx(2.5) and g.width == 40


@pytest.mark.parametrize("gsd", [1.3, 7.7, 100.0, 0.37])
def test_gsd_grid_spans_the_raster_exactly(gsd):
    # 128 px of 1 m: 128 / 1.3 = 98.5 processing pixels; the grid has 98, each 128 / 98 m, so
    # its last pixel ends on the raster's edge (a 99th would reach 0.7 m past it)
    t = utm_transform(1.0)
    grid = make_grid(128, 96, t, tile_size=64, overlap=16, gsd=gsd)
    assert (grid.width, grid.height) == (round(128 / gsd), round(96 / gsd))
    assert grid.transform @ (grid.width, grid.height) == pytest.approx(t @ (128, 96), abs=1e-9)
    assert grid.transform.a == pytest.approx(gsd, rel=0.5 / min(grid.width, grid.height))
    last = grid.tiles[-1]
    c, r, w, h = last.window
    assert (c + w, r + h) == pytest.approx((128, 96), abs=1e-9)
    assert last.transform @ (last.width, last.height) == pytest.approx(t @ (128, 96), abs=1e-9)


def test_gsd_must_leave_a_pixel_and_not_split_one_too_finely():
    from terrasam.checks import check_gsd_grid

    check_gsd_grid(128.0, 128, 300, (1.0, 1.0))  # one pixel across: allowed
    check_gsd_grid(0.01, 128, 128, (1.0, 1.0))  # 100 x 100: allowed
    with pytest.raises(TerrasamError) as e:
        check_gsd_grid(128.5, 128, 300, (1.0, 1.0))
    assert str(e.value) == ("--gsd 128.5 m leaves less than one pixel: the raster is 128 x "
                            "300 pixels of 1 m, so --gsd can be at most 128 m.")
    with pytest.raises(TerrasamError) as e:
        check_gsd_grid(2e6, 100, 100, (0.25, 4.0))  # 1 m mean pixel
    assert str(e.value) == ("--gsd 2000000 m leaves less than one pixel: the raster is 100 x "
                            "100 pixels of 1 m, so --gsd can be at most 100 m.")
    with pytest.raises(TerrasamError) as e:
        check_gsd_grid(0.001, 128, 128, (0.3, 0.3))
    assert str(e.value) == ("--gsd 0.001 m would split each 0.3 m pixel into 300.0 x 300.0 "
                            "(at most 100 x 100); give at least 0.003 m.")


def test_specs_and_grid_pickle():
    grid = make_grid(2000, 2000, utm_transform(), tile_size=1024, overlap=256, gsd=1.0)
    clone = pickle.loads(pickle.dumps(grid))
    assert clone == grid and isinstance(clone.tiles[0], TileSpec)
    with pytest.raises(AttributeError):
        grid.tiles[0].x0 = 5  # frozen


def test_bad_parameters():
    t = Affine.identity()
    with pytest.raises(TerrasamError, match="overlap must be at least 0 and smaller than"):
        make_grid(100, 100, t, tile_size=256, overlap=256)
    with pytest.raises(TerrasamError, match="tile size must be at least 1"):
        make_grid(100, 100, t, tile_size=0, overlap=0)
    with pytest.raises(TerrasamError, match="--gsd must be a positive number"):
        make_grid(100, 100, t, gsd=0)


def test_with_data_skips_all_nodata_tiles(tmp_path):
    data = np.full((3, 700, 900), 60, dtype=np.uint8)
    data[:, :, :500] = 0  # left part nodata
    data[:, 650:, 100:140] = 77  # a little data in the bottom-left corner
    path = write_raster(tmp_path / "n.tif", data, nodata=0)
    grid = make_grid(900, 700, utm_transform(), tile_size=256, overlap=64)
    with open_raster(path) as r:
        kept = grid.with_data(r)
        truth = [t for t in grid.tiles if t.read(r)[1].any()]
    assert [t.index for t in kept] == [t.index for t in truth]
    assert 0 < len(kept) < len(grid.tiles)
    assert any(t.x0 < 140 and t.y0 + t.height > 650 for t in kept)


def test_tile_read_with_gsd(tmp_path):
    scene = make_scene(200, 200, shapes=[rect(0, 0, 100, 200)], path=tmp_path / "s.tif")
    with open_raster(scene.path, scale="none") as r:
        grid = make_grid(r.width, r.height, r.transform, tile_size=64, overlap=16,
                         gsd=1.0, res=r.ground_res)  # 0.5 m pixels -> x0.5
        assert (grid.width, grid.height) == (100, 100)
        tile = grid.tiles[-1]
        rgb, valid = tile.read(r)
    assert rgb.shape == (64, 64, 3) and valid.all() and tile.y0 == 36
    assert rgb[0, 0].tolist() == list(scene.colours[1])  # source row 72: inside the object
    assert rgb[-1, -1].tolist() == list(scene.background)
