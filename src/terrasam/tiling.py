"""The processing grid, its tiles, and the tile-job contract.

The processing grid is the source pixel grid resampled by ``scale`` (gsd / source pixel size;
1.0 without --gsd), adjusted per axis so that a whole number of its pixels spans the raster. Tiles are ``tile_size`` square (smaller only when the grid is smaller),
step ``tile_size - overlap``, the last tile flush with the grid edge.

A *tile job* is a small picklable value that says what to compute on one tile and nothing
about where it runs: ``job(adapter, rgb, valid, profile=None) -> list[MaskRecord]``, with
``job.concepts`` (one name per stitched layer of results; a record's ``concept`` indexes it),
``job.describe()`` (JSON-able; decides the result, so it keys the work directory) and
``job.new_profile()``. Engines run jobs; the pipeline stitches their records. The spill
format of a tile's records (``pack_records`` / ``unpack_records``) lives here too, so that
every engine and the work directory share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from affine import Affine

from terrasam.errors import TerrasamError

SPILL_VERSION = 2


@dataclass
class MaskRecord:
    """One object of one tile. ``mask`` is cropped to ``bbox`` (x0, y0, x1, y1), exclusive
    x1/y1, in tile pixels; ``point`` (x, y) is the prompt that made it; ``concept`` indexes
    the job's ``concepts`` (0 for a job with one)."""

    mask: np.ndarray
    bbox: tuple[int, int, int, int]
    area: int
    predicted_iou: float
    stability_score: float
    point: tuple[float, float] = (math.nan, math.nan)
    crop_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    concept: int = 0

    def full_mask(self, h: int, w: int) -> np.ndarray:
        """The mask on an (h, w) canvas."""
        out = np.zeros((h, w), dtype=bool)
        x0, y0, x1, y1 = self.bbox
        out[y0:y1, x0:x1] = self.mask
        return out


def records_from_masks(masks, scores, valid, concept: int = 0) -> list[MaskRecord]:
    """Records from full-tile boolean masks and one score each, clipped to ``valid`` pixels
    and cropped to their box (empty masks dropped)."""
    out = []
    for mask, score in zip(masks, scores):
        mask = np.asarray(mask, dtype=bool)
        if valid is not None:
            mask = mask & valid
        rows = np.flatnonzero(mask.any(axis=1))
        if not len(rows):
            continue
        cols = np.flatnonzero(mask.any(axis=0))
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        crop = mask[y0:y1, x0:x1]
        out.append(MaskRecord(crop, (x0, y0, x1, y1), int(np.count_nonzero(crop)),
                              float(score), float(score), concept=concept))
    return out


@dataclass
class TileProfile:
    """Where a job's time went and what it found, summed over tiles (and over engines'
    workers: :meth:`merge`)."""

    embed_s: float = 0.0
    decode_s: float = 0.0
    upscale_s: float = 0.0
    post_s: float = 0.0
    total_s: float = 0.0
    tiles: int = 0
    embed_calls: int = 0
    decoder_calls: int = 0  # prompts decoded (refinement decodes included)
    masks: int = 0
    valid_pixels: int = 0
    covered_pixels: int = 0
    # candidate masks decoded and where the generator's filters dropped them
    candidates: int = 0
    rejected_iou: int = 0  # predicted IoU at or below pred_iou_thresh
    rejected_stability: int = 0  # stability below stability_score_thresh (or empty)
    rejected_edge: int = 0  # touching a crop's inner edge
    rejected_nodata: int = 0  # mostly on nodata
    rejected_nms: int = 0  # duplicates removed by box NMS (within and across crops)

    def rejected(self) -> dict[str, int]:
        """Candidates dropped per filter: iou, stability, edge, nodata, nms."""
        return {k: getattr(self, f"rejected_{k}")
                for k in ("iou", "stability", "edge", "nodata", "nms")}

    @property
    def coverage(self) -> float:
        """Share of valid pixels inside at least one mask."""
        return self.covered_pixels / self.valid_pixels if self.valid_pixels else 0.0

    def merge(self, other: TileProfile) -> None:
        """Add another profile's counts to this one."""
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def count_coverage(self, records, valid, shape) -> None:
        """Add one tile's valid and covered pixel counts."""
        covered = np.zeros(shape, dtype=bool)
        for r in records:
            x0, y0, x1, y1 = r.bbox
            covered[y0:y1, x0:x1] |= r.mask
        if valid is not None:
            covered &= valid
        self.valid_pixels += int(valid.sum()) if valid is not None else shape[0] * shape[1]
        self.covered_pixels += int(np.count_nonzero(covered))

    def as_dict(self) -> dict:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["coverage"] = self.coverage
        return d

    def __str__(self) -> str:
        return (f"total {self.total_s:.2f}s: embed {self.embed_s:.2f}s, decode {self.decode_s:.2f}s,"
                f" upscale {self.upscale_s:.2f}s, post {self.post_s:.2f}s; "
                f"{self.decoder_calls} prompts decoded, {self.masks} masks, "
                f"coverage {100 * self.coverage:.1f}%")


class TileJob(Protocol):
    """What to compute on one tile (see the module docstring)."""

    concepts: tuple[str, ...]

    def __call__(self, adapter, rgb: np.ndarray, valid: np.ndarray | None,
                 profile: TileProfile | None = None) -> list[MaskRecord]: ...

    def describe(self) -> dict: ...

    def new_profile(self) -> TileProfile: ...


def pack_records(tile, records) -> dict[str, np.ndarray]:
    """A tile's records as a few flat arrays (masks packed to bits): the spill format."""
    n = len(records)
    bits = [np.packbits(np.asarray(r.mask, bool).ravel()) for r in records]
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in bits])
    return {
        "version": np.array(SPILL_VERSION),
        "tile": np.array([tile.x0, tile.y0, tile.width, tile.height], np.int64),
        "bbox": np.array([r.bbox for r in records], np.int64).reshape(n, 4),
        "area": np.array([r.area for r in records], np.int64),
        "predicted_iou": np.array([r.predicted_iou for r in records], np.float64),
        "stability_score": np.array([r.stability_score for r in records], np.float64),
        "point": np.array([r.point for r in records], np.float64).reshape(n, 2),
        "crop_box": np.array([r.crop_box for r in records], np.int64).reshape(n, 4),
        "concept": np.array([r.concept for r in records], np.int64),
        "bits": np.concatenate(bits) if bits else np.zeros(0, np.uint8),
        "offsets": offsets,
    }


def unpack_records(data, tile) -> list[MaskRecord] | None:
    """Records from :func:`pack_records` arrays; None when they are of another version or
    another tile."""
    if (int(data.get("version", -1)) != SPILL_VERSION
            or np.asarray(data["tile"]).tolist() != [tile.x0, tile.y0, tile.width, tile.height]):
        return None
    out = []
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(data["bbox"]).tolist()):
        h, w = y1 - y0, x1 - x0
        raw = data["bits"][data["offsets"][i]:data["offsets"][i + 1]]
        mask = np.unpackbits(raw, count=h * w).astype(bool).reshape(h, w)
        out.append(MaskRecord(
            mask=mask, bbox=(x0, y0, x1, y1), area=int(data["area"][i]),
            predicted_iou=float(data["predicted_iou"][i]),
            stability_score=float(data["stability_score"][i]),
            point=tuple(float(v) for v in data["point"][i]),
            crop_box=tuple(int(v) for v in data["crop_box"][i]),
            concept=int(data["concept"][i])))
    return out


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

    @property
    def label(self) -> str:
        """The tile in words, for messages: its index and source window."""
        c, r, w, h = (round(float(v), 2) for v in self.window)
        return f"tile {self.index} (window col {c:g}, row {r:g}, {w:g} x {h:g} px)"

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


def grid_scale(transform, gsd=None, res=None) -> float:
    """Source pixels per processing pixel for a ground sample distance ``gsd`` (1.0 without).

    ``res`` is the source pixel size in the unit of ``gsd`` (a number or (x, y), whose
    geometric mean is used); default: the pixel size of ``transform``.
    """
    if gsd is None:
        return 1.0
    if not gsd > 0:
        raise TerrasamError(f"--gsd must be a positive number, got {gsd}.")
    if res is None:
        res = (math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e))
    if isinstance(res, (tuple, list)):
        res = math.sqrt(float(res[0]) * float(res[1]))
    return float(gsd) / float(res)


def make_grid(width, height, transform, tile_size=1024, overlap=256, gsd=None,
              res=None) -> TileGrid:
    """Tile a width x height source raster; with ``gsd`` the grid is resampled.

    ``res``: as in :func:`grid_scale`. The grid's ``scale`` is that of the gsd; its pixels
    (``transform``) are adjusted to it per axis, so that the grid covers the raster exactly.
    """
    tile_size, overlap = int(tile_size), int(overlap)
    if tile_size < 1:
        raise TerrasamError(f"tile size must be at least 1 pixel, got {tile_size}.")
    if not 0 <= overlap < tile_size:
        raise TerrasamError(
            f"overlap must be at least 0 and smaller than the tile size {tile_size}, "
            f"got {overlap}."
        )
    scale = grid_scale(transform, gsd, res)
    # a whole number of processing pixels spans the raster exactly, so that no pixel reaches
    # past its edge (objects would overrun it) nor stops short of it: each axis's pixel is the
    # gsd to within half a pixel over the raster's width (height)
    pw = max(1, round(width / scale))
    ph = max(1, round(height / scale))
    sx, sy = (width / pw, height / ph) if scale != 1.0 else (1.0, 1.0)
    grid_transform = transform @ Affine.scale(sx, sy) if (sx, sy) != (1.0, 1.0) else transform
    step = tile_size - overlap
    tiles = []
    for row, y0 in enumerate(_starts(ph, tile_size, step)):
        th = min(tile_size, ph)
        for col, x0 in enumerate(_starts(pw, tile_size, step)):
            tw = min(tile_size, pw)
            window = (x0 * sx, y0 * sy, tw * sx, th * sy)
            if (sx, sy) == (1.0, 1.0):
                window = tuple(int(v) for v in window)
            tiles.append(TileSpec(index=len(tiles), row=row, col=col, x0=x0, y0=y0,
                                  width=tw, height=th, window=window,
                                  transform=grid_transform @ Affine.translation(x0, y0)))
    return TileGrid(tiles=tiles, width=pw, height=ph, transform=grid_transform, scale=scale,
                    tile_size=tile_size, overlap=overlap)
