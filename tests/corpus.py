"""Builders of hard inputs for the corpus test (tests/test_hard_inputs.py).

Every raster here paints the same few flat-coloured objects on a black background, so the oracle
model (background (0, 0, 0)) finds them whatever the dtype or band count, once scaled to 8 bit.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine
from pyproj import Geod, Transformer
from shapely.geometry import box

import synth

BLACK = (0, 0, 0)
# three rectangles (r0, c0, r1, c1) of a 128 x 128 raster, each hit by an 8 x 8 point grid
RECTS = [(10, 10, 50, 60), (70, 20, 115, 60), (20, 75, 100, 118)]
SIZE = 128


def labels_of(rects=RECTS, height=SIZE, width=SIZE) -> np.ndarray:
    """Label image: rectangle i (1-based) painted with value i."""
    labels = np.zeros((height, width), np.int32)
    for i, (r0, c0, r1, c1) in enumerate(rects, start=1):
        labels[r0:r1, c0:c1] = i
    return labels


def paint(labels, bands=3, dtype="uint8") -> np.ndarray:
    """(bands, h, w) image: background 0 (the minimum), object i a distinct value per band."""
    n = int(labels.max())
    lut = np.zeros((n + 1, bands), np.float64)
    for i in range(1, n + 1):
        rgb = synth.colour(i)
        lut[i] = [rgb[b % 3] for b in range(bands)]
    image = lut[labels].transpose(2, 0, 1)
    if dtype == "uint16":
        image = image * 200
    elif dtype == "int16":
        image = np.where(image == 0, -10_000, image * 100)  # a negative background
    elif dtype.startswith("float"):
        image = image / 255.0
    return image.astype(dtype)


def footprint(transform: Affine, width: int, height: int):
    """The raster's outline in its CRS (a parallelogram for rotated/sheared transforms)."""
    return synth.pixel_to_crs(box(0, 0, width, height), transform)


def reproject(geom, src, dst="EPSG:4326"):
    """A shapely geometry from CRS src to dst (densified first, so edges stay inside)."""
    t = Transformer.from_crs(src, dst, always_xy=True)
    geom = shapely.segmentize(geom, max(geom.length / 400, 1e-9))
    return shapely.transform(geom, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))


def lonlat_box_area(x0, y0, x1, y1) -> float:
    """The exact area (m2) of a lon/lat rectangle, its edges along meridians and parallels, on
    the WGS 84 ellipsoid: the zone between two parallels, a share of it by longitude."""
    geod = Geod(ellps="WGS84")
    e = np.sqrt(geod.f * (2 - geod.f))
    b = geod.a * (1 - geod.f)

    def zone(lat):  # area from the equator to lat per radian of longitude
        s = np.sin(np.radians(lat))
        return b * b * (s / (2 * (1 - e * e * s * s))
                        + np.log((1 + e * s) / (1 - e * s)) / (4 * e))

    return float(np.radians(x1 - x0) * (zone(y1) - zone(y0)))


def rect_polygon(i: int, transform: Affine, rects=RECTS):
    """Rectangle i (1-based) of ``rects`` in CRS coordinates."""
    r0, c0, r1, c1 = rects[i - 1]
    return synth.pixel_to_crs(box(c0, r0, c1, r1), transform)


def geotiff(path, labels=None, bands=3, dtype="uint8", transform=None, crs=synth.UTM,
            **kwargs) -> Path:
    """A GeoTIFF of the painted label image."""
    labels = labels_of() if labels is None else labels
    return synth.write_raster(path, paint(labels, bands, dtype),
                              transform=transform or synth.utm_transform(), crs=crs,
                              blocksize=64 if min(labels.shape) >= 64 else 16, **kwargs)


def plain_image(path, driver: str) -> Path:
    """A PNG/JPEG with no georeferencing at all (no world file, no .aux.xml)."""
    image = paint(labels_of())
    with rasterio.open(path, "w", driver=driver, width=SIZE, height=SIZE, count=3,
                       dtype="uint8", **({"quality": 100} if driver == "JPEG" else {})) as ds:
        ds.write(image)
    return Path(path)


def gcp_only(path) -> Path:
    """A GeoTIFF georeferenced by four GCPs (in UTM 14N) and no geotransform."""
    from rasterio.control import GroundControlPoint

    t = synth.utm_transform()
    gcps = [GroundControlPoint(row=r, col=c, x=(t @ (c, r))[0], y=(t @ (c, r))[1])
            for r, c in [(0, 0), (0, SIZE), (SIZE, 0), (SIZE, SIZE)]]
    image = paint(labels_of())
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=3,
                       dtype="uint8", gcps=gcps, crs=synth.UTM) as ds:
        ds.write(image)
    return Path(path)


def rpc_only(path, lon=-99.0, lat=35.0, deg=1e-5) -> Path:
    """A GeoTIFF georeferenced by (linear) RPCs only: lon/lat = centre + (col, -row) * deg."""
    from rasterio.rpc import RPC

    half = SIZE / 2
    num_s = [0.0] * 20
    num_s[1] = 1.0  # sample follows longitude
    num_l = [0.0] * 20
    num_l[2] = -1.0  # line runs against latitude
    den = [1.0] + [0.0] * 19
    rpcs = RPC(height_off=0.0, height_scale=1.0, lat_off=lat, lat_scale=half * deg,
               line_den_coeff=den, line_num_coeff=num_l, line_off=half, line_scale=half,
               long_off=lon, long_scale=half * deg, samp_den_coeff=den,
               samp_num_coeff=num_s, samp_off=half, samp_scale=half)
    image = paint(labels_of())
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=3,
                       dtype="uint8", rpcs=rpcs) as ds:
        ds.write(image)
    return Path(path)


def truncated(src: Path, dst: Path, fraction=0.6) -> Path:
    """The first ``fraction`` of a file's bytes."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _tile_table(data: bytes) -> tuple[list, list]:
    """(TileOffsets, TileByteCounts) of the first IFD of a little-endian classic TIFF."""
    assert data[:4] == b"II*\x00", "not a little-endian classic TIFF"
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    found = {}
    for k in range(n):
        tag, kind, count, value = struct.unpack_from("<HHII", data, ifd + 2 + 12 * k)
        if tag in (324, 325):
            fmt = "<" + ("I" if kind == 4 else "H") * count
            found[tag] = (list(struct.unpack_from(fmt, data, value)) if count > 1 or kind != 4
                          else [value])
    return found[324], found[325]


def corrupt_tile(src: Path, dst: Path, tile: int = 1) -> Path:
    """A copy of a tiled, compressed GeoTIFF whose tile number ``tile`` is garbage."""
    data = bytearray(src.read_bytes())
    offsets, sizes = _tile_table(bytes(data))
    start, size = offsets[tile], sizes[tile]
    data[start:start + size] = (b"\xde\xad\xbe\xef" * (size // 4 + 1))[:size]
    dst.write_bytes(bytes(data))
    return dst


def zipped(src: Path, dst: Path) -> str:
    """Zip a raster; returns its /vsizip/ path."""
    with zipfile.ZipFile(dst, "w") as z:
        z.write(src, src.name)
    return f"/vsizip/{dst}/{src.name}"


def points_file(path, points, crs="EPSG:4326", geometry="Point") -> Path:
    """A GeoJSON of points (or of small squares around them, for geometry="Polygon")."""
    features = []
    for x, y in points:
        if geometry == "Point":
            geom = {"type": "Point", "coordinates": [x, y]}
        else:
            geom = shapely.geometry.mapping(box(x - 1, y - 1, x + 1, y + 1))
        features.append({"type": "Feature", "properties": {}, "geometry": geom})
    data = {"type": "FeatureCollection", "features": features}
    if crs not in (None, "EPSG:4326"):
        data["crs"] = {"type": "name", "properties": {"name": crs}}
    Path(path).write_text(json.dumps(data))
    return Path(path)


def to_lonlat(x, y, crs=synth.UTM) -> tuple[float, float]:
    """A point from ``crs`` to longitude, latitude."""
    return Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
