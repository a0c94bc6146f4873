"""Per-object raster statistics with exact pixel coverage (exactextract), window by window.

Statistics are of the input's own values (the numbers stored in the file, not the 8-bit
values the model saw), per band (``b1``, ``b2``, ... the file's band numbers) and per named
band expression (``ndvi=(b4-b1)/(b4+b1)``). Every pixel counts by the fraction of it that
the polygon covers (:mod:`exactextract`), so partial pixels along simplified, smoothed or
regularized edges count exactly; ``count`` is that covered pixel area, in pixels.

Memory is flat in the raster size and in the number of objects: exactextract asks for the
window under each object (large objects in pieces of at most :data:`MAX_CELLS` cells), and
each window is read once for all bands and expressions. Geometries are handled in the
raster's pixel grid (an exact affine map), so rotated and sheared rasters work too.

Nodata: a band's pixel is left out when it equals the band's nodata value (the file's, or
the one given to the run), is NaN, or is masked by the file (alpha band, internal mask).
An expression is left out where any band it reads is, or where it is not finite (x / 0).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import shapely
from exactextract import exact_extract
from exactextract._exactextract import Feature
from exactextract.feature import FeatureSource, JSONFeature
from exactextract.operation import Operation
from exactextract.raster import RasterSource
from exactextract.writer import Writer

from terrasam.errors import TerrasamError

__all__ = ["ZonalStats", "parse_stats", "parse_indexes", "check_bands", "columns_for",
           "STATISTICS", "DEFAULT_STATS"]

# our names -> exactextract's operations
STATISTICS = {"mean": "mean", "std": "stdev", "min": "min", "max": "max",
              "median": "median", "count": "count", "sum": "sum"}
DEFAULT_STATS = ("mean",)
MAX_CELLS = 1 << 20  # cells of one window (per band) that exactextract reads at a time
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BAND = re.compile(r"^b(\d+)$")


def parse_stats(value) -> tuple[str, ...]:
    """``"mean,std"`` or a list of names -> the statistics, checked, without duplicates."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = []
    for item in items:
        name = str(item).strip().lower()
        if not name:
            continue
        if name == "stdev":
            name = "std"
        if name not in STATISTICS:
            raise TerrasamError(f"unknown statistic {item!r}; use any of "
                                f"{', '.join(STATISTICS)}.")
        if name not in names:
            names.append(name)
    if not names:
        raise TerrasamError(f"give at least one statistic ({', '.join(STATISTICS)}).")
    return tuple(names)


def parse_indexes(value, band_count: int | None = None) -> dict:
    """Named band expressions: ``"ndvi=(b4-b1)/(b4+b1)"``, a list of them or a mapping.

    Returns ``{name: Expression}``; with ``band_count`` the bands they read are checked.
    """
    from terrasam.where import parse

    if value is None:
        return {}
    if isinstance(value, str):
        value = [value]
    pairs = []
    if isinstance(value, Mapping):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    else:
        for item in value:
            name, sep, formula = str(item).partition("=")
            if not sep or not formula.strip():
                raise TerrasamError(f"--index takes NAME=EXPRESSION, e.g. "
                                    f"\"ndvi=(b4-b1)/(b4+b1)\", not {item!r}.")
            pairs.append((name.strip(), formula.strip()))
    bands = [f"b{i}" for i in range(1, (band_count or 0) + 1)]
    out: dict = {}
    for name, formula in pairs:
        if not _NAME.match(name) or _BAND.match(name):
            raise TerrasamError(f"the index name {name!r} must be a word of letters, digits "
                                f"and _ (and not a band name such as b1).")
        if name in out:
            raise TerrasamError(f"the index {name!r} is given twice.")
        if band_count is None:
            names = _band_names_in(formula)
        else:
            names = bands
        expr = parse(formula, names, what=f"--index {name}")
        if not any(_BAND.match(n) for n in expr.names):
            raise TerrasamError(f"the index {name!r} reads no band; use b1, b2, ... in "
                                f"{formula!r}.")
        out[name] = expr
    return out


def _band_names_in(formula: str) -> list[str]:
    """Names that look like bands (bN), for checking a formula before the raster is open."""
    return sorted(set(re.findall(r"\bb\d+\b", formula)))


def _band_of(name: str) -> int:
    return int(_BAND.match(name).group(1))


def check_bands(bands: Sequence[int], count: int, what: str = "--stats-bands") -> tuple:
    """1-based band numbers, each within the raster's ``count`` bands."""
    out = []
    for b in bands:
        if isinstance(b, bool) or int(b) != b or not 1 <= int(b) <= count:
            raise TerrasamError(f"{what}: band {b} is out of range; the raster has {count} "
                                f"band{'s' if count > 1 else ''} (1-{count}).")
        if int(b) not in out:
            out.append(int(b))
    return tuple(out)


def columns_for(stats: Iterable[str], bands: Iterable[int], indexes: Iterable[str]) -> list:
    """The column names: ``b1_mean``, ..., then ``ndvi_mean``, ..."""
    stats = list(stats)
    return [f"b{b}_{s}" for b in bands for s in stats] + \
        [f"{name}_{s}" for name in indexes for s in stats]


class ZonalStats:
    """Statistics of one raster under batches of polygons (in the raster's CRS).

    ``bands``: 1-based band numbers; ``indexes``: ``{name: Expression}`` over ``b1``...;
    ``stats``: names from :data:`STATISTICS`; ``nodata``: a value overriding the file's.
    Call it with an array of geometries to get ``{column: array}``; the raster is opened
    for each call and closed after it.
    """

    def __init__(self, path, *, bands: Sequence[int] = (), indexes: Mapping | None = None,
                 stats: Sequence[str] = DEFAULT_STATS, nodata: float | None = None,
                 max_cells: int = MAX_CELLS):
        from terrasam.raster import opened

        self.path = str(path)
        self.stats = parse_stats(stats)
        self.indexes = dict(indexes or {})
        # opened again for each batch: nothing held; GCP/RPC rasters warped as the reader's
        with opened(self.path) as ds:
            self.count, self.width, self.height = ds.count, ds.width, ds.height
            self._inverse = ~ds.transform
            alpha = [i + 1 for i, ci in enumerate(ds.colorinterp) if ci.name == "alpha"]
        self._alpha = alpha[0] if alpha else None
        self.bands = check_bands(bands, self.count)
        for name, expr in self.indexes.items():
            check_bands([_band_of(n) for n in expr.names], self.count, what=f"--index {name}")
        self.nodata = None if nodata is None else float(nodata)
        # exactextract cuts a large object into strips of whole rows; below two rows of the
        # raster's width per piece its strips overlap (and count twice)
        self.max_cells = max(int(max_cells), 2 * self.width + 2)
        self.columns = columns_for(self.stats, self.bands, self.indexes)
        needed = set(self.bands)
        for expr in self.indexes.values():
            needed |= {_band_of(n) for n in expr.names}
        self._read = sorted(needed)
        self._ds = None
        self._error = None  # a read error met inside exactextract
        self._cache_key = None
        self._cache: dict = {}

    def describe(self) -> dict:
        return {"stats": list(self.stats), "bands": list(self.bands),
                "indexes": {k: v.text for k, v in self.indexes.items()}}

    # -- reading -----------------------------------------------------------------------
    def window(self, x0: int, y0: int, nx: int, ny: int) -> dict:
        """``{"b1": masked array, ..., "ndvi": masked array}`` of one window (cached)."""
        key = (x0, y0, nx, ny)
        if key == self._cache_key:
            return self._cache
        from rasterio.errors import NodataShadowWarning, RasterioError
        from rasterio.windows import Window

        from terrasam.raster import _reason

        try:
            with warnings.catch_warnings():
                # a nodata value and an alpha band: both count (the alpha band below)
                warnings.simplefilter("ignore", NodataShadowWarning)
                data = self._ds.read(self._read, window=Window(x0, y0, nx, ny), masked=True)
            transparent = None
            if self._alpha is not None:
                transparent = self._ds.read(self._alpha, window=Window(x0, y0, nx, ny)) == 0
        except RasterioError as exc:
            # raised again by __call__: exactextract would wrap it in its own error
            self._error = TerrasamError(f"cannot read {self.path} for --stats: "
                                        f"{_reason(exc)}.")
            raise self._error from None
        values: dict = {}
        for i, b in enumerate(self._read):
            band = data[i]
            mask = np.ma.getmaskarray(band).copy()
            if transparent is not None:
                mask |= transparent
            raw = np.ma.getdata(band)
            if self.nodata is not None:
                mask |= np.isnan(raw) if np.isnan(self.nodata) else raw == self.nodata
            if raw.dtype.kind == "f":
                mask |= np.isnan(raw)
            # as float64 (exact for the values of every common raster type), so that
            # interpolated statistics (median) of integer bands are not truncated
            values[f"b{b}"] = np.ma.masked_array(raw.astype(np.float64), mask)
        for name, expr in self.indexes.items():
            cols = {n: np.ma.getdata(values[n]) for n in expr.names}
            result = np.broadcast_to(np.asarray(expr.evaluate(cols), dtype=np.float64),
                                     (ny, nx))
            mask = ~np.isfinite(result)
            for n in expr.names:
                mask = mask | np.ma.getmaskarray(values[n])
            values[name] = np.ma.masked_array(np.where(mask, 0.0, result), mask)
        self._cache_key, self._cache = key, values
        return values

    # -- computing ---------------------------------------------------------------------
    def __call__(self, geoms) -> dict[str, np.ndarray]:
        geoms = np.asarray(geoms, dtype=object)
        n = len(geoms)
        out = {c: np.full(n, np.nan) for c in self.columns}
        present = np.flatnonzero(~(shapely.is_missing(geoms) | shapely.is_empty(geoms)))
        if not len(present) or not self.columns:
            return out
        from terrasam.raster import opened

        pixel = self._to_pixels(geoms[present])
        sources = {name: _Source(self, name) for name in
                   [f"b{b}" for b in self.bands] + list(self.indexes)}
        ops = [Operation(STATISTICS[s], f"{name}_{s}", src)
               for name, src in sources.items() for s in self.stats]
        writer = _Collector(out, present)
        self._error = None
        with opened(self.path) as self._ds:
            try:
                exact_extract(list(sources.values()), _Features(pixel), ops, output=writer,
                              include_cols=["i"], max_cells_in_memory=self.max_cells)
            except Exception:
                if self._error is not None:  # a read error, as one sentence
                    raise self._error from None
                raise
            finally:
                self._ds, self._cache_key, self._cache = None, None, {}
        return out

    def _to_pixels(self, geoms: np.ndarray) -> np.ndarray:
        """CRS -> (column, -row): the raster's pixel grid, north up, 1 unit per pixel."""
        t = self._inverse

        def forward(xy):
            x, y = xy[:, 0], xy[:, 1]
            out = np.column_stack([t.a * x + t.b * y + t.c, -(t.d * x + t.e * y + t.f)])
            # pixel edges come back from the CRS as integers up to rounding: make them exact,
            # or a rounding sliver would count a neighbouring pixel into min and max
            whole = np.round(out)
            return np.where(np.abs(out - whole) < 1e-6, whole, out)

        return shapely.transform(geoms, forward)


# --------------------------------------------------------------------------- exactextract glue


class _Source(RasterSource):
    """One band or expression of a ZonalStats, in its pixel grid."""

    def __init__(self, owner: ZonalStats, name: str):
        super().__init__()
        self.owner, self.key = owner, name
        self.set_name(name)

    def res(self):
        return (1.0, 1.0)

    def extent(self):
        return (0.0, -float(self.owner.height), float(self.owner.width), 0.0)

    def nodata_value(self):
        return None

    def srs_wkt(self):
        return None

    def read_window(self, x0, y0, nx, ny):
        if nx <= 0 or ny <= 0:
            return np.zeros((max(ny, 0), max(nx, 0)), dtype=np.float64)
        return self.owner.window(int(x0), int(y0), int(nx), int(ny))[self.key]


class _WkbFeature(Feature):
    def __init__(self, i: int, wkb: bytes):
        Feature.__init__(self)
        self.i, self.wkb, self.props = i, wkb, {}

    def geometry(self):
        return self.wkb

    def set_geometry_format(self):
        return "wkb"

    def get(self, name):
        return self.i

    def set(self, name, value):
        self.props[name] = value

    def fields(self):
        return ["i"]


class _Features(FeatureSource):
    """The batch's geometries (pixel grid) as exactextract features numbered 0..n-1."""

    def __init__(self, geoms: np.ndarray):
        super().__init__()
        self.wkb = shapely.to_wkb(geoms)

    def count(self):
        return len(self.wkb)

    def __iter__(self):
        for i, wkb in enumerate(self.wkb):
            yield _WkbFeature(i, wkb)

    def srs_wkt(self):
        return None


class _Collector(Writer):
    """Results straight into the output arrays (feature i is row ``rows[i]``)."""

    def __init__(self, out: dict, rows: np.ndarray):
        super().__init__()
        self.out, self.rows = out, rows

    def add_operation(self, op):
        pass

    def add_column(self, name):
        pass

    def add_geometry(self):
        pass

    def write(self, feature):
        f = JSONFeature()
        feature.copy_to(f)
        props = f.feature["properties"]
        row = self.rows[int(props.pop("i"))]
        for name, value in props.items():
            if name in self.out and value is not None:
                self.out[name][row] = float(value)

    def features(self):
        return None
