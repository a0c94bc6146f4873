"""Web-map tiles (EPSG:3857 XYZ, 256 px PNG) rendered from the raster's windows.

Each tile reads the raster window under it (downsampled on read when zoomed out) through the
same :class:`~terrasam.raster.RasterReader` that feeds the model, so the map shows exactly the
8-bit values segmentation sees (global scaling, band choice, nodata transparent), then warps
it to the tile's web-mercator grid (nearest neighbour: pixel edges stay sharp when zoomed in).
Works for any CRS and affine transform, rotated ones too.
"""

from __future__ import annotations

import io
import math
import threading
import warnings

import numpy as np
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

from terrasam.errors import TerrasamError
from terrasam.serve.cache import LRUCache

TILE = 256
MERC_HALF = 20037508.342789244  # web-mercator half extent (x at longitude 180)
MAX_ZOOM = 24
_ZOOM_EXTRA = 3  # zoom levels rendered past the raster's native resolution
_OVERSAMPLE = 2  # source pixels read per tile pixel when zoomed out
_EDGE_POINTS = 16  # points per tile edge when reprojecting its outline

_local = threading.local()

# rasterio warns spuriously now and then when array-to-array warps run in several threads at
# once (github.com/opendatacube/odc-geo/issues/131); both transforms are always given here.
warnings.filterwarnings("ignore", message="Dataset has no geotransform",
                        category=NotGeoreferencedWarning, module="rasterio.warp")


def transformer(src, dst):
    """A pyproj Transformer (always x, y order) kept per thread (they are not shared)."""
    from pyproj import CRS, Transformer

    cache = getattr(_local, "transformers", None)
    if cache is None:
        cache = _local.transformers = {}
    key = (CRS.from_user_input(src).to_wkt(), CRS.from_user_input(dst).to_wkt())
    t = cache.get(key)
    if t is None:
        t = cache[key] = Transformer.from_crs(src, dst, always_xy=True)
    return t


def tile_bounds(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of XYZ tile z/x/y in EPSG:3857 metres."""
    span = 2 * MERC_HALF / (1 << z)
    left, top = -MERC_HALF + x * span, MERC_HALF - y * span
    return left, top - span, left + span, top


def _ring(x0, y0, x1, y1, n: int) -> np.ndarray:
    """Points along the outline of a box, ``n`` per edge."""
    t = np.linspace(0.0, 1.0, n, endpoint=False)
    xs = np.concatenate([x0 + (x1 - x0) * t, np.full(n, x1), x1 - (x1 - x0) * t, np.full(n, x0)])
    ys = np.concatenate([np.full(n, y0), y0 + (y1 - y0) * t, np.full(n, y1), y1 - (y1 - y0) * t])
    return np.column_stack([xs, ys])


def _encode_png(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class TileRenderer:
    """Renders XYZ tiles of one raster. ``reader()`` gives this thread's RasterReader."""

    def __init__(self, reader, width: int, height: int, transform: Affine, crs,
                 cache_bytes: int = 64 * 2**20):
        if crs is None:
            raise TerrasamError("the raster has no CRS, so it cannot be shown on a web map.")
        self._reader = reader
        self.width, self.height = int(width), int(height)
        self.transform, self.crs = transform, crs
        self._inverse = ~transform
        self.cache = LRUCache(max_bytes=cache_bytes, max_items=4096, size=len)
        outline = _ring(0, 0, self.width, self.height, 64)
        cols, rows = outline[:, 0], outline[:, 1]
        xs, ys = transform @ (cols, rows)
        lon, lat = transformer(crs, "EPSG:4326").transform(xs, ys)
        lon, lat = np.asarray(lon, float), np.asarray(lat, float)
        if not (np.isfinite(lon).all() and np.isfinite(lat).all()):
            raise TerrasamError("the raster's extent cannot be placed on a web map.")
        lat = np.clip(lat, -85.0511, 85.0511)
        self.lonlat_bounds = (float(lon.min()), float(lat.min()), float(lon.max()),
                              float(lat.max()))
        mx, my = transformer("EPSG:4326", "EPSG:3857").transform(lon, lat)
        self.merc_bounds = (float(np.min(mx)), float(np.min(my)), float(np.max(mx)),
                            float(np.max(my)))
        # the zoom whose tile pixels match the raster's pixels (across its longer side)
        span = max(self.merc_bounds[2] - self.merc_bounds[0],
                   self.merc_bounds[3] - self.merc_bounds[1])
        res = span / max(self.width, self.height)
        native = math.log2(2 * MERC_HALF / TILE / res) if res > 0 else MAX_ZOOM
        self.native_zoom = int(min(max(math.ceil(native), 0), MAX_ZOOM))
        self.max_zoom = min(self.native_zoom + _ZOOM_EXTRA, MAX_ZOOM)

    def _window(self, z: int, x: int, y: int):
        """The raster pixel window (c0, r0, c1, r1) under a tile, or None when off the raster."""
        left, bottom, right, top = tile_bounds(z, x, y)
        b = self.merc_bounds
        if right <= b[0] or left >= b[2] or top <= b[1] or bottom >= b[3]:
            return None
        ring = _ring(left, bottom, right, top, _EDGE_POINTS)
        xs, ys = transformer("EPSG:3857", self.crs).transform(ring[:, 0], ring[:, 1],
                                                               errcheck=False)
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        ok = np.isfinite(xs) & np.isfinite(ys)
        if not ok.any():
            return None
        cols, rows = self._inverse @ (xs[ok], ys[ok])
        c0 = max(math.floor(np.min(cols)) - 1, 0)
        r0 = max(math.floor(np.min(rows)) - 1, 0)
        c1 = min(math.ceil(np.max(cols)) + 1, self.width)
        r1 = min(math.ceil(np.max(rows)) + 1, self.height)
        if c1 <= c0 or r1 <= r0:
            return None
        return c0, r0, c1, r1

    def render(self, z: int, x: int, y: int) -> bytes | None:
        """PNG bytes of tile z/x/y; None when the tile holds no raster pixel."""
        key = (z, x, y)
        value = self.cache.get(key)
        if value is None:
            value, _ = self.cache.get_or_compute(key, lambda: self._render(z, x, y) or b"")
        return value or None

    def _render(self, z: int, x: int, y: int) -> bytes | None:
        from rasterio.warp import Resampling, reproject

        window = self._window(z, x, y)
        if window is None:
            return None
        c0, r0, c1, r1 = window
        w, h = c1 - c0, r1 - r0
        factor = max(w / (_OVERSAMPLE * TILE), h / (_OVERSAMPLE * TILE), 1.0)
        ow, oh = max(1, math.ceil(w / factor)), max(1, math.ceil(h / factor))
        rgb, valid = self._reader().read((c0, r0, w, h), out_shape=(oh, ow),
                                         resampling="nearest" if factor == 1.0 else "bilinear")
        if not valid.any():
            return None
        src = np.concatenate([rgb.transpose(2, 0, 1), (valid * np.uint8(255))[None]], axis=0)
        src_transform = self.transform @ Affine.translation(c0, r0) @ Affine.scale(w / ow,
                                                                                   h / oh)
        left, bottom, right, top = tile_bounds(z, x, y)
        dst_transform = Affine((right - left) / TILE, 0, left, 0, -(top - bottom) / TILE, top)
        dst = np.zeros((4, TILE, TILE), dtype=np.uint8)
        reproject(src, dst, src_transform=src_transform, src_crs=self.crs,
                  dst_transform=dst_transform, dst_crs="EPSG:3857",
                  resampling=Resampling.nearest, src_nodata=None, dst_nodata=0)
        if not dst[3].any():
            return None
        return _encode_png(np.ascontiguousarray(dst.transpose(1, 2, 0)))
