"""Synthetic GeoTIFFs with known truth, shared by the tests of every module.

A scene is flat-coloured objects (each its own RGB colour) on a background colour. Objects are
built from whole pixels, so their exact pixel-edge outlines are known without vectorizing
anything: ``Scene.polygons`` (CRS coordinates) and ``Scene.labels`` are the truth.
With the oracle model use ``OracleAdapter(background=scene.background)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.enums import ColorInterp
from rasterio.windows import Window
from shapely import affinity
from shapely.geometry import box

UTM = "EPSG:32614"
WGS84 = "EPSG:4326"
BACKGROUND = (20, 20, 20)


def utm_transform(pixel_size=0.5, origin=(500_000.0, 4_100_000.0)) -> Affine:
    """North-up transform for EPSG:32614 (UTM 14N) with square pixels of ``pixel_size`` m."""
    return Affine(pixel_size, 0.0, origin[0], 0.0, -pixel_size, origin[1])


def geographic_transform(pixel_size=1e-5, origin=(-99.0, 35.0)) -> Affine:
    """North-up transform for EPSG:4326 with pixels of ``pixel_size`` degrees."""
    return Affine(pixel_size, 0.0, origin[0], 0.0, -pixel_size, origin[1])


def rotated_transform(angle=30.0, pixel_size=0.5, origin=(500_000.0, 4_100_000.0)) -> Affine:
    """Transform rotated by ``angle`` degrees (rows still run "down"), for EPSG:32614."""
    return (Affine.translation(*origin) @ Affine.rotation(-angle)
            @ Affine.scale(pixel_size, -pixel_size))


def colour(i: int) -> tuple[int, int, int]:
    """A distinct saturated RGB colour for object ``i`` (all channels in 60..250)."""
    h = (i * 0.618033988749895) % 1.0
    v = 250 - 60 * (i % 3) / 2
    c = v - 60
    r, g, b = (
        60 + c * max(0.0, min(1.0, abs((h * 6 + k) % 6 - 3) - 1)) for k in (0, 4, 2)
    )
    return (int(r), int(g), int(b))


def write_raster(path, array, transform=None, crs=UTM, nodata=None, dtype=None, tiled=True,
                 blocksize=256, compress="deflate", colorinterp=None, mask=None,
                 overviews=None, **profile) -> Path:
    """Write ``array`` (bands, h, w) as a GeoTIFF (or any driver= given); returns the path.

    mask: bool (h, w) written as an internal per-dataset mask; overviews: factors to build;
    colorinterp: names per band, e.g. ("red", "green", "blue", "alpha").
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    count, height, width = array.shape
    meta = {"driver": "GTiff", "width": width, "height": height, "count": count,
            "dtype": np.dtype(dtype or array.dtype).name, "crs": crs,
            "transform": transform or utm_transform(), "nodata": nodata}
    if meta["driver"] == "GTiff":
        meta.update(compress=compress, tiled=tiled)
        if tiled:
            meta.update(blockxsize=blocksize, blockysize=blocksize)
    meta.update(profile)
    path = Path(path)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **meta) as ds:
        ds.write(array.astype(meta["dtype"]))
        if colorinterp is not None:
            ds.colorinterp = [ColorInterp[c] for c in colorinterp]
        if mask is not None:
            ds.write_mask(np.where(mask, 255, 0).astype(np.uint8))
        if overviews:
            ds.build_overviews(list(overviews), rasterio.enums.Resampling.nearest)
    return path


# -- shapes built from whole pixels: lists of (r0, c0, r1, c1) boxes, minus holes --------

@dataclass
class Shape:
    """An object made of whole pixels: union of ``boxes`` minus ``holes`` (r0, c0, r1, c1)."""

    kind: str
    boxes: list
    holes: list = field(default_factory=list)

    def pixel_polygon(self):
        """The exact outline in pixel (col, row) coordinates."""
        geom = shapely.union_all([box(c0, r0, c1, r1) for r0, c0, r1, c1 in self.boxes])
        if self.holes:
            geom = geom.difference(
                shapely.union_all([box(c0, r0, c1, r1) for r0, c0, r1, c1 in self.holes]))
        return shapely.normalize(geom)


def rect(r0, c0, r1, c1) -> Shape:
    """A rectangle covering rows r0..r1-1 and columns c0..c1-1."""
    return Shape("rect", [(r0, c0, r1, c1)])


def ring(r0, c0, r1, c1, thickness) -> Shape:
    """A rectangular ring (polygon with one hole) of the given wall thickness."""
    return Shape("ring", [(r0, c0, r1, c1)],
                 [(r0 + thickness, c0 + thickness, r1 - thickness, c1 - thickness)])


def diagonal(r0, c0, length, thickness) -> Shape:
    """A staircase band running down-right at 45 degrees: ``length`` rows, ``thickness`` wide."""
    return Shape("diagonal", [(r0 + i, c0 + i, r0 + i + 1, c0 + i + thickness)
                              for i in range(length)])


def diamond(cy, cx, radius) -> Shape:
    """A pixelated diamond (rhombus) centred on pixel corner (cx, cy)."""
    rows = []
    for dy in range(-radius, radius):
        half = radius - int(abs(dy + 0.5))
        rows.append((cy + dy, cx - half, cy + dy + 1, cx + half))
    return Shape("diamond", rows)


def default_shapes(width=256, height=256) -> list[Shape]:
    """Rectangles, a ring with a hole, a diagonal band and a diamond laid out to fit."""
    s = min(width, height)

    def px(f, size):
        return int(round(f * size))

    return [
        rect(px(0.08, height), px(0.08, width), px(0.30, height), px(0.38, width)),
        ring(px(0.08, height), px(0.52, width), px(0.45, height), px(0.92, width),
             max(2, px(0.07, s))),
        diagonal(px(0.50, height), px(0.06, width), px(0.38, s), max(2, px(0.09, s))),
        diamond(px(0.72, height), px(0.72, width), max(2, px(0.16, s))),
        rect(px(0.36, height), px(0.14, width), px(0.44, height), px(0.30, width)),
    ]


@dataclass
class Scene:
    """A synthetic image and its truth."""

    image: np.ndarray  # (3, h, w) in the scene dtype, nodata pixels set to ``nodata``
    rgb: np.ndarray  # (3, h, w) uint8 colours (before dtype conversion), 0 on nodata
    labels: np.ndarray  # (h, w) int32: 0 background/nodata, i for object i (1-based)
    polygons: dict  # label -> shapely polygon in CRS coordinates (exact pixel edges)
    pixel_polygons: dict  # label -> polygon in pixel (col, row) coordinates
    colours: dict  # label -> (r, g, b)
    transform: Affine
    crs: str | None
    background: tuple
    valid: np.ndarray  # (h, w) bool, False on the nodata border
    nodata: float | None
    dtype: str
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width)."""
        return self.labels.shape


def to_dtype(rgb: np.ndarray, dtype: str) -> np.ndarray:
    """Map uint8 colours to a dtype: uint16 1000+40v, int16 20v-2000, float v/255, else v."""
    v = rgb.astype(np.float64)
    if dtype == "uint16":
        return (1000 + 40 * v).astype(np.uint16)
    if dtype == "int16":
        return (20 * v - 2000).astype(np.int16)
    if dtype in ("float32", "float64"):
        return (v / 255.0).astype(dtype)
    return rgb.astype(dtype)


def make_scene(width=256, height=256, crs=UTM, transform=None, shapes=None,
               background=BACKGROUND, dtype="uint8", nodata_border=0, nodata=None,
               path=None, **write_kwargs) -> Scene:
    """Paint ``shapes`` (default_shapes) on a background; optionally write it to ``path``.

    nodata_border: width in pixels of a nodata frame (NaN for floats, ``nodata`` or 0 else).
    """
    if transform is None:
        transform = geographic_transform() if crs == WGS84 else utm_transform()
    shapes = default_shapes(width, height) if shapes is None else shapes
    labels = np.zeros((height, width), dtype=np.int32)
    for i, shape in enumerate(shapes, start=1):
        for r0, c0, r1, c1 in shape.boxes:
            labels[max(r0, 0):r1, max(c0, 0):c1] = i
        for r0, c0, r1, c1 in shape.holes:
            labels[max(r0, 0):r1, max(c0, 0):c1] = 0
    valid = np.ones((height, width), dtype=bool)
    if nodata_border:
        b = nodata_border
        valid[:b] = valid[-b:] = False
        valid[:, :b] = valid[:, -b:] = False
        labels[~valid] = 0
    colours = {i: colour(i) for i in range(1, len(shapes) + 1)}
    lut = np.array([background] + [colours[i] for i in colours], dtype=np.uint8)
    rgb = lut[labels].transpose(2, 0, 1).copy()
    rgb[:, ~valid] = 0
    is_float = np.issubdtype(np.dtype(dtype), np.floating)
    if nodata is None and nodata_border:
        nodata = float("nan") if is_float else 0
    image = to_dtype(rgb, dtype)
    if nodata_border:
        image[:, ~valid] = nodata
    frame = box(nodata_border, nodata_border, width - nodata_border, height - nodata_border)
    pixel_polygons, polygons = {}, {}
    for i, shape in enumerate(shapes, start=1):
        poly = shape.pixel_polygon().intersection(frame)
        if poly.is_empty:
            continue
        pixel_polygons[i] = poly
        polygons[i] = pixel_to_crs(poly, transform)
    scene = Scene(image=image, rgb=rgb, labels=labels, polygons=polygons,
                  pixel_polygons=pixel_polygons, colours=colours, transform=transform,
                  crs=crs, background=tuple(background), valid=valid,
                  nodata=None if nodata is None else float(nodata), dtype=np.dtype(dtype).name)
    if path is not None:
        write_scene(path, scene, **write_kwargs)
    return scene


def pixel_to_crs(geom, transform: Affine):
    """Map a shapely geometry from pixel (col, row) to CRS coordinates with ``transform``."""
    t = transform
    return affinity.affine_transform(geom, [t.a, t.b, t.d, t.e, t.c, t.f])


def write_scene(path, scene: Scene, **kwargs) -> Path:
    """Write a Scene as a GeoTIFF (kwargs go to write_raster) and remember the path."""
    scene.path = write_raster(path, scene.image, transform=scene.transform, crs=scene.crs,
                              nodata=scene.nodata, **kwargs)
    return scene.path


def write_large_raster(path, width=20_000, height=20_000, count=3, dtype="uint8",
                       blocksize=512, nodata=0, empty_fraction=0.4, crs=UTM,
                       transform=None, compress="zstd") -> Path:
    """Write a big tiled raster strip by strip (never whole in memory).

    The left ``empty_fraction`` of columns is nodata and left unwritten (sparse blocks); the
    rest is a cheap block pattern whose values never equal ``nodata``.
    """
    transform = transform or utm_transform(pixel_size=1.0)
    empty = int(width * empty_fraction) // blocksize * blocksize
    meta = {"driver": "GTiff", "width": width, "height": height, "count": count,
            "dtype": dtype, "crs": crs, "transform": transform, "nodata": nodata,
            "tiled": True, "blockxsize": blocksize, "blockysize": blocksize,
            "compress": compress, "sparse_ok": True, "bigtiff": "IF_SAFER"}
    cols = np.arange(empty, width)
    period = 8 * 64  # the pattern repeats every 512 rows: build one period only
    rows = np.arange(period)
    cell = ((rows[:, None] // 64) + (cols[None, :] // 64)) % 8
    pattern = np.stack([30 + 25 * ((cell + b) % 8) for b in range(count)]).astype(dtype)
    with rasterio.open(path, "w", **meta) as ds:
        for r in range(0, height, blocksize):
            h = min(blocksize, height - r)
            offset = r % period
            strip = np.take(pattern, np.arange(offset, offset + h) % period, axis=1)
            ds.write(strip, window=Window(empty, r, cols.size, h))
    return Path(path)

