"""Reading rasters for SAM: windows, band choice, nodata, global 8-bit scaling, resampling.

Every read is windowed: the whole raster is never held in memory. Statistics for the 8-bit
scaling are computed once per raster (from an overview, the whole raster when it is small, or
a spread sample of windows) so the same source value maps to the same 8-bit value in every
tile.

Conventions:
  * ``band_indexes`` are the 1-based bands read, in output order. One band is repeated to
    R=G=B; with two bands the third channel is the mean of the two scaled channels.
  * A pixel is invalid (nodata) when every selected band equals its nodata value (as GDAL's
    dataset mask), when any selected band is NaN, when the alpha band is 0, or when the
    internal mask is 0. Invalid pixels are returned as 0 in all three channels.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from terrasam.errors import TerrasamError

SCALE_METHODS = ("percentile", "minmax", "none")
# Pixels per band used for the global statistics and for the coverage (has-data) map.
SAMPLE_PIXELS = 1 << 22
_SAMPLE_WINDOW = 256
_STRIP_PIXELS = 1 << 20
_STRIP_BYTES = 64 << 20  # decoded bytes per strip of the coverage pass
_COMPUTE_DTYPE = np.float32


@dataclass(frozen=True)
class Scaling:
    """How source values become uint8: ``(v - lo) / (hi - lo) * 255``, clipped, per band."""

    method: str
    lo: np.ndarray
    hi: np.ndarray

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Scale ``data`` (bands, h, w) to uint8 (bands, h, w); NaN becomes 0."""
        lo = self.lo.astype(_COMPUTE_DTYPE)[:, None, None]
        span = np.maximum(self.hi - self.lo, 1e-12).astype(_COMPUTE_DTYPE)[:, None, None]
        out = data.astype(_COMPUTE_DTYPE, copy=True)
        out -= lo
        out *= 255.0 / span
        np.nan_to_num(out, copy=False, nan=0.0)
        np.clip(out, 0.0, 255.0, out=out)
        out += 0.5  # round half up (values are non-negative here)
        return out.astype(np.uint8)

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {"method": self.method, "lo": [float(v) for v in self.lo],
                "hi": [float(v) for v in self.hi]}


def open_raster(path, bands=None, nodata=None, scale="percentile",
                percentiles=(2.0, 98.0)) -> RasterReader:
    """Open a raster for reading tiles; see RasterReader."""
    return RasterReader(path, bands=bands, nodata=nodata, scale=scale, percentiles=percentiles)


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """Parse a ``--bands`` value such as "4,3,2" into (4, 3, 2); None/"" gives None."""
    if text is None or str(text).strip() == "":
        return None
    try:
        return tuple(int(part) for part in str(text).replace(" ", "").split(","))
    except ValueError:
        raise TerrasamError(
            f"--bands must be comma-separated band numbers such as 4,3,2, got {text!r}."
        ) from None


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_local_path(path) -> bool:
    """Whether ``path`` names a plain local file (not a /vsi path, URL or ``zip+file://``)."""
    text = str(path)
    return not (text.startswith("/vsi") or _SCHEME.match(text))


def source(path) -> str:
    """What GDAL opens for ``path``: local paths with ``~`` expanded, anything else unchanged.

    Virtual paths and URLs (``/vsizip//abs/x.zip/x.tif``, ``https://...``, ``s3://...``) must
    reach GDAL byte for byte: ``pathlib`` would fold their double slashes.
    """
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    return os.path.expanduser(text) if is_local_path(text) else text


def open_dataset(path):
    """Open ``path`` for reading: ``(dataset, file or None, georeferencing)``.

    A raster georeferenced only by GCPs or RPCs is read through GDAL's warper (a warped VRT
    in the GCPs' CRS, or EPSG:4326 for RPCs), so that it is a north-up raster with a real
    transform; then the file itself is returned as well, to close with the VRT.
    ``georeferencing`` is None, or ``{"method": "gcps"|"rpcs", "count": n, "crs": CRS}``.
    """
    from rasterio.vrt import WarpedVRT

    path = source(path)
    if is_local_path(path):
        if not Path(path).exists():
            raise TerrasamError(f"raster file {path!r} does not exist.")
        if Path(path).is_dir():
            raise TerrasamError(f"{path!r} is a folder, not a raster file.")
        if Path(path).stat().st_size == 0:
            raise TerrasamError(f"raster file {path!r} is empty (0 bytes).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path)
    except RasterioIOError as exc:
        if is_local_path(path) and _looks_like_tiff(path):
            raise TerrasamError(f"{path!r} is a TIFF file that is truncated or corrupt "
                                f"({_reason(exc)}).") from None
        raise TerrasamError(f"{path!r} is not a raster GDAL can read ({_reason(exc)}).") from None
    if ds.crs or not ds.transform.is_identity:
        return ds, None, None
    gcps, gcp_crs = ds.gcps
    if gcps and gcp_crs:
        georef, crs = {"method": "gcps", "count": len(gcps), "crs": gcp_crs}, gcp_crs
    elif ds.rpcs is not None:
        georef, crs = {"method": "rpcs", "count": None, "crs": None}, rasterio.CRS.from_epsg(4326)
    else:
        return ds, None, None
    try:
        # nearest keeps nodata and values exact; an alpha band marks what lies off the image
        has_mask = any(v is not None for v in ds.nodatavals) or ColorInterp.alpha in ds.colorinterp
        vrt = WarpedVRT(ds, crs=crs, resampling=Resampling.nearest, add_alpha=not has_mask)
    except RasterioError as exc:
        ds.close()
        raise TerrasamError(f"cannot warp {path!r} from its {georef['method'].upper()} "
                            f"({_reason(exc)}).") from None
    georef["crs"] = vrt.crs
    return vrt, ds, georef


@contextlib.contextmanager
def opened(path):
    """``with opened(path) as ds``: :func:`open_dataset`'s dataset, closed (with its file) after."""
    ds, base, _ = open_dataset(path)
    try:
        yield ds
    finally:
        ds.close()
        if base is not None:
            base.close()


class RasterReader:
    """A raster opened for windowed reading as RGB uint8 plus a valid-data mask.

    Picklable: only the path, options and computed scaling travel; the dataset is reopened
    lazily in the receiving process. Not safe to share between threads (one per thread).
    """

    def __init__(self, path, bands=None, nodata=None, scale="percentile",
                 percentiles=(2.0, 98.0)):
        self.path = source(path)
        self._options = {"bands": None if bands is None else tuple(int(b) for b in bands),
                         "nodata": None if nodata is None else float(nodata),
                         "scale": scale, "percentiles": tuple(float(p) for p in percentiles)}
        self._ds = None
        self._base = None  # the file under a warped VRT (GCP/RPC rasters)
        self.georef = None
        self._scaling: Scaling | None = None
        self._coverage = None
        self._check_options()
        self._setup(self._open())

    # -- opening -----------------------------------------------------------------------
    def _check_options(self):
        scale = self._options["scale"]
        if scale not in SCALE_METHODS:
            raise TerrasamError(
                f"scale must be one of {', '.join(SCALE_METHODS)}, got {scale!r}."
            )
        p = self._options["percentiles"]
        if len(p) != 2 or not (0.0 <= p[0] < p[1] <= 100.0):
            raise TerrasamError(
                f"percentiles must be two numbers with 0 <= low < high <= 100, got {p}."
            )

    def _open(self):
        if self._ds is not None:
            return self._ds
        ds, self._base, self.georef = open_dataset(self.path)
        if ds.count == 0:
            self._ds = ds
            self.close()
            raise TerrasamError(f"{self.path!r} has no raster bands.")
        self._ds = ds
        return ds

    def _setup(self, ds):
        self.width, self.height, self.count = ds.width, ds.height, ds.count
        self.crs = ds.crs if ds.crs else None
        self.transform: Affine = ds.transform
        self.res = (math.hypot(ds.transform.a, ds.transform.d),
                    math.hypot(ds.transform.b, ds.transform.e))
        self.driver = ds.driver
        interp = list(ds.colorinterp)
        self.colorinterp = tuple(ci.name for ci in interp)
        alpha = [i + 1 for i, ci in enumerate(interp) if ci == ColorInterp.alpha]
        self.alpha_index = alpha[0] if alpha else None
        self.band_indexes = self._choose_bands(interp)
        self.dtype = str(np.result_type(*[ds.dtypes[b - 1] for b in self.band_indexes]))
        self._float = np.issubdtype(np.dtype(self.dtype), np.floating)

        user_nodata = self._options["nodata"]
        file_nodata = [ds.nodatavals[b - 1] for b in self.band_indexes]
        sources = []
        if user_nodata is not None:
            self._nodata_values = [user_nodata] * len(self.band_indexes)
            sources.append("user")
        elif any(v is not None for v in file_nodata):
            self._nodata_values = file_nodata
            sources.append("file")
        else:
            self._nodata_values = None
        if self.alpha_index is not None and self.alpha_index not in self.band_indexes:
            sources.append(f"alpha band {self.alpha_index}")
        flags = ds.mask_flag_enums[self.band_indexes[0] - 1]
        self._internal_mask = (MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags
                               and MaskFlags.nodata not in flags)
        if self._internal_mask:
            sources.append("internal mask")
        self.nodata = None
        if self._nodata_values is not None:
            first = next(v for v in self._nodata_values if v is not None)
            self.nodata = float(first)
        self.nodata_source = ", ".join(sources) if sources else None
        self._overview_factors = ds.overviews(self.band_indexes[0])

    def _choose_bands(self, interp) -> tuple[int, ...]:
        count = len(interp)
        bands = self._options["bands"]
        if bands is not None:
            if not 1 <= len(bands) <= 3:
                raise TerrasamError(f"--bands takes 1 to 3 band numbers, got {len(bands)}.")
            for b in bands:
                if not 1 <= b <= count:
                    raise TerrasamError(
                        f"band {b} is out of range: {Path(self.path).name!r} has {count} "
                        f"band{'s' if count > 1 else ''} (1-{count})."
                    )
            return bands
        rgb = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
        if all(ci in interp for ci in rgb):
            return tuple(interp.index(ci) + 1 for ci in rgb)
        data_bands = [i + 1 for i, ci in enumerate(interp) if ci != ColorInterp.alpha]
        if not data_bands:
            data_bands = [1]
        return tuple(data_bands[:3])

    # -- pickling / context manager ------------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_ds"] = None
        state["_base"] = None
        state["_coverage"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close the dataset (it reopens lazily if used again)."""
        if self._ds is not None:
            self._ds.close()
            self._ds = None
        if self._base is not None:
            self._base.close()
            self._base = None

    def __repr__(self):
        return (f"RasterReader({self.path!r}, {self.width}x{self.height}, "
                f"bands={self.band_indexes}, dtype={self.dtype})")

    # -- low level reads -----------------------------------------------------------------
    @property
    def may_have_nodata(self) -> bool:
        """Whether any pixel can be invalid (nodata value, NaN, alpha or mask)."""
        return (self._nodata_values is not None or self._float or self._internal_mask
                or (self.alpha_index is not None and self.alpha_index not in self.band_indexes))

    def _read_raw(self, window: Window, out_shape, resampling: Resampling):
        """Read (data (n, h, w) in the source dtype, valid (h, w)) for an in-raster window.

        A read error (a corrupt block, a file cut short) becomes one sentence naming the file
        and the window.
        """
        try:
            return self._read_raw_unchecked(window, out_shape, resampling)
        except RasterioError as exc:
            raise TerrasamError(f"cannot read {_window_label(window)} of {self.path}: "
                                f"{_reason(exc)}.") from None

    def _read_raw_unchecked(self, window: Window, out_shape, resampling: Resampling):
        ds = self._open()
        unique = sorted(set(self.band_indexes))
        shape = (len(unique), *out_shape)
        data = ds.read(unique, window=window, out_shape=shape, resampling=resampling)
        if unique != list(self.band_indexes):
            data = data[[unique.index(b) for b in self.band_indexes]]
        if not self.may_have_nodata:
            return data, np.ones(out_shape, dtype=bool)
        ref = data
        if resampling != Resampling.nearest and (self._nodata_values is not None or self._float):
            # Interpolation blurs nodata into data; decide validity on nearest samples.
            ref = ds.read(unique, window=window, out_shape=shape, resampling=Resampling.nearest)
            if unique != list(self.band_indexes):
                ref = ref[[unique.index(b) for b in self.band_indexes]]
        valid = self._valid_from(ref)
        if self.alpha_index is not None and self.alpha_index not in self.band_indexes:
            alpha = ds.read(self.alpha_index, window=window, out_shape=out_shape,
                            resampling=Resampling.nearest)
            valid &= alpha > 0
        if self._internal_mask:
            mask = ds.read_masks(self.band_indexes[0], window=window, out_shape=out_shape,
                                 resampling=Resampling.nearest)
            valid &= mask > 0
        return data, valid

    def _valid_from(self, data: np.ndarray) -> np.ndarray:
        valid = np.ones(data.shape[1:], dtype=bool)
        if self._float:
            valid &= ~np.isnan(data).any(axis=0)
        if self._nodata_values is not None:
            is_nodata = np.ones(data.shape[1:], dtype=bool)
            for band, value in zip(data, self._nodata_values):
                if value is None:
                    is_nodata[:] = False
                    break
                is_nodata &= np.isnan(band) if math.isnan(value) else band == value
            valid &= ~is_nodata
        return valid

    def _read_boundless(self, window: Window, out_shape, resampling):
        """Read any window, also past the raster edge, as (data float32, valid)."""
        c0, r0 = float(window.col_off), float(window.row_off)
        w, h = float(window.width), float(window.height)
        oh, ow = out_shape
        n = len(self.band_indexes)
        data = np.zeros((n, oh, ow), dtype=_COMPUTE_DTYPE)
        valid = np.zeros((oh, ow), dtype=bool)
        sx, sy = w / ow, h / oh

        def inside(start, step, size, count):
            # output pixels whose centre lies inside [0, size)
            i0 = min(max(math.ceil(-start / step - 0.5), 0), count)
            i1 = min(max(math.ceil((size - start) / step - 0.5), 0), count)
            return i0, i1

        i0, i1 = inside(c0, sx, self.width, ow)
        j0, j1 = inside(r0, sy, self.height, oh)
        if i1 <= i0 or j1 <= j0:
            return data, valid
        x0 = max(c0 + i0 * sx, 0.0)
        x1 = min(c0 + i1 * sx, float(self.width))
        y0 = max(r0 + j0 * sy, 0.0)
        y1 = min(r0 + j1 * sy, float(self.height))
        sub = Window(x0, y0, x1 - x0, y1 - y0)
        sub_shape = (j1 - j0, i1 - i0)
        exact = (sub_shape == (round(y1 - y0), round(x1 - x0))
                 and all(float(v).is_integer() for v in (x0, y0, x1, y1)))
        if exact:
            sub = Window(int(x0), int(y0), int(x1 - x0), int(y1 - y0))
            resampling = Resampling.nearest
        raw, ok = self._read_raw(sub, sub_shape, resampling)
        data[:, j0:j1, i0:i1] = raw
        valid[j0:j1, i0:i1] = ok
        return data, valid

    # -- public reads --------------------------------------------------------------------
    def read(self, window, out_shape=None, resampling="bilinear"):
        """Read ``window`` (source pixels, may pass the edge) as (rgb uint8 (h,w,3), valid).

        ``out_shape`` (h, w) resamples on read (for --gsd); default: the window's own size.
        """
        window = _as_window(window)
        if out_shape is None:
            out_shape = (max(1, round(float(window.height))), max(1, round(float(window.width))))
        out_shape = (int(out_shape[0]), int(out_shape[1]))
        data, valid = self._read_boundless(window, out_shape, _resampling(resampling))
        return self._to_rgb(data, valid), valid

    def read_overview(self, max_size=2048):
        """Decimated view of the whole raster: (rgb uint8 (h,w,3), valid, transform)."""
        factor = max(1.0, max(self.width, self.height) / float(max_size))
        oh = max(1, math.ceil(self.height / factor))
        ow = max(1, math.ceil(self.width / factor))
        data, valid = self._read_decimated((oh, ow))
        transform = self.transform @ Affine.scale(self.width / ow, self.height / oh)
        return self._to_rgb(data, valid), valid, transform

    def _to_rgb(self, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        scaled = self.scaling.apply(data)
        if scaled.shape[0] == 1:
            scaled = np.repeat(scaled, 3, axis=0)
        elif scaled.shape[0] == 2:
            third = ((scaled[0].astype(np.uint16) + scaled[1] + 1) // 2).astype(np.uint8)
            scaled = np.concatenate([scaled, third[None]], axis=0)
        rgb = np.ascontiguousarray(scaled.transpose(1, 2, 0))
        rgb[~valid] = 0
        return rgb

    # -- global statistics ---------------------------------------------------------------
    @property
    def scaling(self) -> Scaling:
        """The global per-band scaling (computed once, on first use)."""
        if self._scaling is None:
            self._scaling = self._compute_scaling()
        return self._scaling

    def _compute_scaling(self) -> Scaling:
        method = self._options["scale"]
        n = len(self.band_indexes)
        if method == "none":
            return Scaling("none", np.zeros(n), np.full(n, 255.0))
        samples = self._sample_values()
        lo, hi = np.zeros(n), np.ones(n)
        for i, values in enumerate(samples):
            if values.size == 0:
                lo[i], hi[i] = (0.0, 255.0) if self.dtype == "uint8" else (0.0, 1.0)
                continue
            if method == "minmax":
                lo[i], hi[i] = float(values.min()), float(values.max())
            else:
                lo[i], hi[i] = np.percentile(values, self._options["percentiles"])
        return Scaling(method, lo, hi)

    def _sample_values(self) -> list[np.ndarray]:
        """Valid pixel values per band from the statistics source (bounded in size)."""
        chunks: list[list[np.ndarray]] = [[] for _ in self.band_indexes]
        for window, shape in self._stat_windows():
            data, valid = self._read_raw(window, shape, Resampling.nearest)
            for i, band in enumerate(data):
                values = band[valid]
                if values.dtype.kind == "f":  # +-inf would stretch the scale to nothing
                    values = values[np.isfinite(values)]
                chunks[i].append(values)
        return [np.concatenate(c) if c else np.zeros(0) for c in chunks]

    def stats_source(self) -> str:
        """Where the global statistics come from: "all pixels", "overview" or "sample"."""
        if self.width * self.height <= SAMPLE_PIXELS:
            return "all pixels"
        return "overview" if self._overview_level() else "sample"

    def _overview_level(self):
        """Finest overview factor with at most SAMPLE_PIXELS pixels, or None."""
        for f in sorted(self._overview_factors):
            if math.ceil(self.width / f) * math.ceil(self.height / f) <= SAMPLE_PIXELS:
                return f
        return None

    def _stat_windows(self):
        source = self.stats_source()
        if source == "all pixels":
            yield from self._strips()
        elif source == "overview":
            f = self._overview_level()
            yield (Window(0, 0, self.width, self.height),
                   (math.ceil(self.height / f), math.ceil(self.width / f)))
        else:
            size = _SAMPLE_WINDOW
            k = max(1, int(math.sqrt(SAMPLE_PIXELS / size**2)))
            for r in _spread(self.height, size, k):
                for c in _spread(self.width, size, k):
                    w, h = min(size, self.width - c), min(size, self.height - r)
                    yield Window(c, r, w, h), (h, w)

    def _strips(self):
        rows = max(1, _STRIP_PIXELS // max(self.width, 1))
        for r in range(0, self.height, rows):
            h = min(rows, self.height - r)
            yield Window(0, r, self.width, h), (h, self.width)

    # -- coverage ------------------------------------------------------------------------
    def _coverage_map(self):
        """(valid map, source pixels per map pixel x, y, exact) or None when all valid."""
        if not self.may_have_nodata:
            return None
        if self._coverage is None:
            if self.width * self.height <= SAMPLE_PIXELS:
                cov = np.zeros((self.height, self.width), dtype=bool)
                for window, shape in self._strips():
                    _, valid = self._read_raw(window, shape, Resampling.nearest)
                    r = int(window.row_off)
                    cov[r:r + shape[0]] = valid
                self._coverage = (cov, 1.0, 1.0, True)
            else:
                self._coverage = self._coarse_coverage()
        return self._coverage

    def _coarse_coverage(self):
        f = self._overview_level() or math.sqrt(self.width * self.height / SAMPLE_PIXELS)
        shape = (max(1, math.ceil(self.height / f)), max(1, math.ceil(self.width / f)))
        _, valid = self._read_decimated(shape)
        return (valid, self.width / shape[1], self.height / shape[0], False)

    def _read_decimated(self, out_shape):
        """The whole raster read at ``out_shape`` (nearest): (data, valid)."""
        oh, ow = out_shape
        full = Window(0, 0, self.width, self.height)
        row_bytes = self.width * self.count * np.dtype(self.dtype).itemsize
        if self._overview_level() is not None or row_bytes * self.height <= _STRIP_BYTES:
            return self._read_raw(full, out_shape, Resampling.nearest)
        # No small overview: every block is decoded once, in strips. GDAL keeps decoded blocks in
        # its process-wide cache (default 5 % of RAM); reopening the dataset between strips
        # releases them, so this one-time pass stays at bounded memory whatever the size.
        fy = self.height / oh
        strip = max(1, int(_STRIP_BYTES / row_bytes / fy))  # output rows per strip
        data = np.zeros((len(self.band_indexes), oh, ow), dtype=self.dtype)
        valid = np.zeros((oh, ow), dtype=bool)
        for j0 in range(0, oh, strip):
            j1 = min(j0 + strip, oh)
            window = Window(0, j0 * fy, self.width, (j1 - j0) * fy)
            data[:, j0:j1], valid[j0:j1] = self._read_raw(window, (j1 - j0, ow),
                                                          Resampling.nearest)
            self.close()
        return data, valid

    def has_data(self, window) -> bool:
        """Whether ``window`` holds any valid pixel (cheap: uses a coarse validity map)."""
        window = _as_window(window)
        c0, r0 = float(window.col_off), float(window.row_off)
        c1, r1 = c0 + float(window.width), r0 + float(window.height)
        if c1 <= 0 or r1 <= 0 or c0 >= self.width or r0 >= self.height:
            return False
        cov = self._coverage_map()
        if cov is None:
            return True
        valid, fx, fy, exact = cov
        pad = 0 if exact else 1  # coarse maps can miss data at their pixel edges
        i0 = max(int(math.floor(c0 / fx)) - pad, 0)
        i1 = min(int(math.ceil(c1 / fx)) + pad, valid.shape[1])
        j0 = max(int(math.floor(r0 / fy)) - pad, 0)
        j1 = min(int(math.ceil(r1 / fy)) + pad, valid.shape[0])
        return bool(valid[j0:j1, i0:i1].any())

    # -- description ---------------------------------------------------------------------
    def check_gsd(self, gsd) -> None:
        """Refuse a ``--gsd`` that has no meaning here: a raster without a CRS has no metres,
        and a grid must keep at least one pixel (:func:`terrasam.checks.check_gsd_grid`)."""
        from terrasam.checks import check_gsd_grid

        if gsd is None:
            return
        if self.crs is None:
            raise TerrasamError(
                f"--gsd is in metres, but {Path(self.path).name} has no CRS, so its pixels have "
                "no ground size; leave out --gsd (or give the raster a CRS)."
            )
        check_gsd_grid(gsd, self.width, self.height, self.ground_res)

    @property
    def footprint(self):
        """The raster's outline in its CRS (a shapely polygon; a parallelogram when rotated)."""
        from terrasam.vectorize import raster_footprint

        return raster_footprint(self.transform, self.width, self.height)

    @property
    def ground_res(self) -> tuple[float, float]:
        """Pixel size (x, y) in metres: projected units converted, degrees at the centre."""
        if self.crs is None:
            return self.res
        if self.crs.is_geographic:
            lat = (self.transform @ (self.width / 2, self.height / 2))[1]
            metres_per_degree = 111_320.0
            return (self.res[0] * metres_per_degree * math.cos(math.radians(lat)),
                    self.res[1] * 110_574.0)
        factor = _linear_unit_factor(self.crs)
        return (self.res[0] * factor, self.res[1] * factor)

    @property
    def georeferencing(self) -> dict:
        """How pixels are placed: ``{"method": "transform"|"gcps"|"rpcs"|"none", "count"}``.

        GCP and RPC rasters are read warped (see :func:`open_dataset`).
        """
        self._open()
        if self.georef is not None:
            return {"method": self.georef["method"], "count": self.georef["count"],
                    "warped_to": _crs_label(self.georef["crs"])}
        method = "transform" if self.crs is not None or not self.transform.is_identity else "none"
        return {"method": method, "count": None, "warped_to": None}

    def describe(self) -> dict:
        """Everything `terrasam info` reports about the raster, JSON-serialisable."""
        ds = self._open()
        bands = []
        for i in range(1, self.count + 1):
            bands.append({"index": i, "colorinterp": self.colorinterp[i - 1],
                          "dtype": ds.dtypes[i - 1], "description": ds.descriptions[i - 1],
                          "nodata": _num(ds.nodatavals[i - 1])})
        channels = list(self.band_indexes)
        if len(channels) == 1:
            channels = channels * 3
        elif len(channels) == 2:
            channels = [*channels, "mean"]
        profile = ds.profile
        return {
            "path": self.path,
            "driver": self.driver,
            "width": self.width,
            "height": self.height,
            "count": self.count,
            "bands": bands,
            "band_indexes": list(self.band_indexes),
            "rgb_channels": channels,
            "dtype": self.dtype,
            "nodata": _num(self.nodata),
            "nodata_source": self.nodata_source,
            "nan_is_nodata": self._float,
            "crs": _crs_dict(self.crs),
            "georeferencing": self.georeferencing,
            "transform": list(self.transform)[:6],
            "res": list(self.res),
            "ground_res_m": list(self.ground_res) if self.crs is not None else None,
            "bounds": list(ds.bounds),
            "block_shape": list(ds.block_shapes[0]),
            "tiled": bool(profile.get("tiled", False)),
            "compress": ds.compression.value if ds.compression else None,
            "overviews": list(self._overview_factors),
            "scaling": {**self.scaling.to_dict(),
                        "percentiles": list(self._options["percentiles"])
                        if self.scaling.method == "percentile" else None,
                        "source": None if self.scaling.method == "none"
                        else self.stats_source()},
        }

    def bytes_per_tile(self, window_shape, out_shape) -> int:
        """Approximate peak bytes of one read of a window of source size -> output size."""
        wh, ww = window_shape
        oh, ow = out_shape
        n = len(self.band_indexes)
        itemsize = np.dtype(self.dtype).itemsize
        src = n * itemsize * oh * ow * (2 if (wh, ww) != (oh, ow) else 1)  # + nearest copy
        work = n * 4 * oh * ow * 2  # float32 buffer + scaling copy
        return int(src + work + oh * ow * (3 + 1 + 1))


def _as_window(window) -> Window:
    if isinstance(window, Window):
        return window
    return Window(*window)


def _resampling(value) -> Resampling:
    if isinstance(value, Resampling):
        return value
    try:
        return Resampling[str(value)]
    except KeyError:
        raise TerrasamError(f"unknown resampling method {value!r}.") from None


def _spread(size: int, window: int, k: int) -> list[int]:
    """Up to k window offsets spread evenly over [0, size - window]."""
    last = max(size - window, 0)
    if k <= 1 or last == 0:
        return [last // 2]
    return sorted({round(i * last / (k - 1)) for i in range(k)})


def _num(value):
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _linear_unit_factor(crs) -> float:
    try:
        return float(crs.linear_units_factor[1])
    except Exception:  # rasterio raises CRSError for CRS without a linear unit
        return 1.0


def _crs_dict(crs) -> dict | None:
    if crs is None:
        return None
    epsg = crs.to_epsg()
    try:
        from pyproj import CRS

        name = CRS.from_wkt(crs.to_wkt()).name
    except Exception:  # a CRS pyproj cannot parse still gets a label
        name = crs.to_string()
    units = "degrees" if crs.is_geographic else _units_name(crs)
    return {"epsg": epsg, "name": name, "geographic": bool(crs.is_geographic), "units": units,
            "wkt": crs.to_wkt()}


def _crs_label(crs) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


def _units_name(crs) -> str:
    try:
        return crs.linear_units_factor[0]
    except Exception:  # a CRS without linear units
        return "unknown"



def _looks_like_tiff(path) -> bool:
    """Whether a file starts with a TIFF or BigTIFF signature."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _reason(exc) -> str:
    """The first line of a GDAL/rasterio error, without its final full stop."""
    if "See previous exception" in str(exc) and exc.__cause__ is not None:
        exc = exc.__cause__  # rasterio's "Read failed": GDAL's own message says what failed
    lines = str(exc).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(exc).__name__


def _window_label(window: Window) -> str:
    c0, r0 = float(window.col_off), float(window.row_off)
    c1, r1 = c0 + float(window.width), r0 + float(window.height)
    return f"the window cols {c0:.0f}-{c1:.0f}, rows {r0:.0f}-{r1:.0f}"
