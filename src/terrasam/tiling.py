"""The processing grid and its tiles.

The processing grid is the source pixel grid resampled by ``scale`` (gsd / source pixel size;
1.0 without --gsd). Tiles are ``tile_size`` square (smaller only when the grid is smaller),
step ``tile_size - overlap``, the last tile flush with the grid edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from affine import Affine

from terrasam.errors import TerrasamError


@dataclass(frozen=True)
class TileSpec:
    """One tile: where it is in the processing grid and which source window it reads."""

    index: int
    row: int
    col: int
    x0: int
    y0: int
    width: int
    height: int
    window: tuple[float, float, float, float]  # (col_off, row_off, width, height), source px
    transform: Affine  # processing-grid pixel (col, row) of this tile -> CRS coordinates

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the tile in processing pixels."""
        return (self.height, self.width)

    def read(self, reader, resampling="bilinear"):
        """Read this tile from a RasterReader: (rgb uint8 (h, w, 3), valid (h, w))."""
        return reader.read(self.window, out_shape=self.shape, resampling=resampling)


@dataclass(frozen=True)
class TileGrid:
    """The tiles covering a raster's processing grid."""

    tiles: list
    width: int
    height: int
    transform: Affine
    scale: float
    tile_size: int
    overlap: int

    @property
    def rows(self) -> int:
        """Number of tile rows."""
        return 1 + max((t.row for t in self.tiles), default=-1)

    @property
    def cols(self) -> int:
        """Number of tile columns."""
        return 1 + max((t.col for t in self.tiles), default=-1)

    def with_data(self, reader) -> list[TileSpec]:
        """The tiles holding at least one valid pixel (all-nodata tiles skipped cheaply)."""
        return [t for t in self.tiles if reader.has_data(t.window)]

    def describe(self, reader=None) -> dict:
        """The grid as a JSON-serialisable dict (with tiles holding data when given a reader)."""
        out = {"tile_size": self.tile_size, "overlap": self.overlap, "scale": self.scale,
               "width": self.width, "height": self.height, "rows": self.rows,
               "cols": self.cols, "tiles": len(self.tiles),
               "pixel_size": [math.hypot(self.transform.a, self.transform.d),
                              math.hypot(self.transform.b, self.transform.e)]}
        if reader is not None:
            out["tiles_with_data"] = len(self.with_data(reader))
            if self.tiles:
                t = max(self.tiles, key=lambda t: t.width * t.height)
                window_shape = (round(t.window[3]), round(t.window[2]))
                out["read_bytes_per_tile"] = reader.bytes_per_tile(window_shape, t.shape)
        return out


def _starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def make_grid(width, height, transform, tile_size=1024, overlap=256, gsd=None,
              res=None) -> TileGrid:
    """Tile a width x height source raster; with ``gsd`` the grid is resampled.

    ``res`` is the source pixel size in the unit of ``gsd`` (a number or (x, y), whose
    geometric mean is used); default: the pixel size of ``transform``.
    """
    tile_size, overlap = int(tile_size), int(overlap)
    if tile_size < 1:
        raise TerrasamError(f"tile size must be at least 1 pixel, got {tile_size}.")
    if not 0 <= overlap < tile_size:
        raise TerrasamError(
            f"overlap must be at least 0 and smaller than the tile size {tile_size}, "
            f"got {overlap}."
        )
    scale = 1.0
    if gsd is not None:
        if not gsd > 0:
            raise TerrasamError(f"--gsd must be a positive number, got {gsd}.")
        if res is None:
            res = (math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e))
        if isinstance(res, (tuple, list)):
            res = math.sqrt(float(res[0]) * float(res[1]))
        scale = float(gsd) / float(res)
    pw = max(1, math.ceil(width / scale - 1e-9))
    ph = max(1, math.ceil(height / scale - 1e-9))
    grid_transform = transform @ Affine.scale(scale) if scale != 1.0 else transform
    step = tile_size - overlap
    tiles = []
    for row, y0 in enumerate(_starts(ph, tile_size, step)):
        th = min(tile_size, ph)
        for col, x0 in enumerate(_starts(pw, tile_size, step)):
            tw = min(tile_size, pw)
            window = (x0 * scale, y0 * scale, tw * scale, th * scale)
            if scale == 1.0:
                window = tuple(int(v) for v in window)
            tiles.append(TileSpec(index=len(tiles), row=row, col=col, x0=x0, y0=y0,
                                  width=tw, height=th, window=window,
                                  transform=grid_transform @ Affine.translation(x0, y0)))
    return TileGrid(tiles=tiles, width=pw, height=ph, transform=grid_transform, scale=scale,
                    tile_size=tile_size, overlap=overlap)
