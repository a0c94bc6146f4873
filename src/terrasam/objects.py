"""Objects for analysis: the options that shape, measure and filter each batch of objects.

:class:`ObjectOptions` gathers ``regularize`` / ``smooth`` (geometry, applied by
:func:`terrasam.vectorize.clean` before areas are measured), ``stats`` / ``stats_bands`` /
``indexes`` (raster statistics, :mod:`terrasam.stats`), ``shape`` (:mod:`terrasam.measures`)
and ``where`` (a filter, :mod:`terrasam.where`). It checks all of them before any model
loads (:meth:`ObjectOptions.check` names the known columns when ``where`` uses another) and
builds the per-batch step (:meth:`ObjectOptions.finisher`) that adds the columns and keeps
the rows that satisfy ``where``. Each batch is handled on its own: memory stays flat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from terrasam.errors import TerrasamError

__all__ = ["ObjectOptions"]


def _length_option(value):
    """False/None (off), True (the default tolerance) or a length ("1.5", "0.75m")."""
    if value is None or value is False:
        return None
    if value is True:
        return True
    from terrasam.vectorize import parse_length

    parse_length(value)  # refuses bad values with a one-line message
    if isinstance(value, str):
        return value.strip()
    return float(value)


@dataclass
class ObjectOptions:
    """What is added to, changed in and filtered from every object of a run."""

    regularize: object = None  # None, True (default tolerance) or a length
    regularize_45: bool = False
    smooth: object = None  # None, True (default sigma) or a length
    stats: tuple = ()
    stats_bands: tuple | None = None
    indexes: dict = field(default_factory=dict)  # name -> where.Expression
    shape: bool = False
    where: str | None = None
    all_bands: bool = True  # no stats_bands: every band (False: --index alone, no band)

    @classmethod
    def build(cls, *, regularize=False, regularize_45: bool = False, smooth=False,
              stats=None, stats_bands: Sequence[int] | None = None, index=None,
              shape: bool = False, where: str | None = None) -> ObjectOptions:
        """Check everything that does not need the raster (syntax, names, units)."""
        from terrasam.stats import DEFAULT_STATS, parse_indexes, parse_stats

        reg = _length_option(regularize)
        smo = _length_option(smooth)
        if reg is not None and smo is not None:
            raise TerrasamError("give --regularize (buildings) or --smooth (natural "
                                "boundaries), not both.")
        if regularize_45 and reg is None:
            reg = True
        names = parse_stats(stats)
        indexes = parse_indexes(index)
        if stats_bands is not None:
            stats_bands = tuple(int(b) for b in stats_bands)
        all_bands = bool(names)
        if not names and (indexes or stats_bands):
            names = tuple(DEFAULT_STATS)
        if where is not None and not str(where).strip():
            raise TerrasamError("the --where expression is empty.")
        return cls(reg, bool(regularize_45), smo, names, stats_bands, indexes, bool(shape),
                   None if where is None else str(where).strip(), all_bands)

    # -- what the cleaning step needs ----------------------------------------------------
    def clean_options(self) -> dict:
        """Keyword arguments of :func:`terrasam.vectorize.clean` (and pipeline.frames)."""
        return {"regularize": self.regularize, "regularize_45": self.regularize_45,
                "smooth": self.smooth}

    @property
    def active(self) -> bool:
        """Whether the per-batch step has anything to do."""
        return bool(self.stats or self.shape or self.where)

    def describe(self) -> dict:
        """For provenance."""
        return {"regularize": self.regularize, "regularize_45": self.regularize_45,
                "smooth": self.smooth, "stats": list(self.stats),
                "stats_bands": None if self.stats_bands is None else list(self.stats_bands),
                "indexes": {k: v.text for k, v in self.indexes.items()},
                "shape": self.shape, "where": self.where}

    # -- columns -------------------------------------------------------------------------
    def bands_for(self, band_count: int) -> tuple:
        """The bands that get statistics: ``stats_bands``, else every band of the raster
        when statistics were named (with ``indexes`` alone, none)."""
        from terrasam.stats import check_bands

        if self.stats_bands is not None:
            return check_bands(self.stats_bands, band_count)
        if not self.stats or not self.all_bands:
            return ()
        return tuple(range(1, band_count + 1))

    def columns(self, base: Sequence[str], band_count: int) -> list[str]:
        """Every column an object will have (besides id and geometry)."""
        from terrasam.measures import COLUMNS
        from terrasam.stats import columns_for

        cols = list(base)
        if self.shape:
            cols += list(COLUMNS)
        cols += columns_for(self.stats, self.bands_for(band_count), self.indexes)
        return cols

    def check(self, base: Sequence[str], band_count: int, text_columns: Sequence[str] = ()):
        """Check the bands and the ``where`` columns once the raster is open (before the
        model loads). Returns the parsed filter (or None)."""
        from terrasam.stats import _BAND, _band_of, check_bands
        from terrasam.where import parse

        for name, expr in self.indexes.items():
            check_bands([_band_of(n) for n in expr.names if _BAND.match(n)], band_count,
                        what=f"--index {name}")
        known = self.columns(base, band_count)
        if self.where is None:
            return None
        return parse(self.where, known, what="--where", condition=True,
                     text_columns=text_columns)

    # -- the per-batch step --------------------------------------------------------------
    def finisher(self, reader, base: Sequence[str], text_columns: Sequence[str] = (),
                 nodata: float | None = None) -> Finisher | None:
        """The step applied to each frame, or None when there is nothing to add or filter.

        ``reader`` is the open RasterReader (its path, band count and CRS); ``nodata`` a
        value overriding the file's for the statistics.
        """
        flt = self.check(base, reader.count, text_columns)
        if not self.active:
            return None
        zonal = None
        if self.stats:
            from terrasam.stats import ZonalStats

            bands = self.bands_for(reader.count)
            if bands or self.indexes:
                zonal = ZonalStats(reader.path, bands=bands, indexes=self.indexes,
                                   stats=self.stats, nodata=nodata)
        return Finisher(zonal, self.shape, flt, reader.crs)


class Finisher:
    """Adds shape measures and statistics to a frame, then keeps the rows ``where`` keeps.

    A filter that reads no statistics runs first, so statistics are computed only for the
    objects that are kept.
    """

    def __init__(self, zonal, shape: bool, where, crs):
        from terrasam.measures import COLUMNS

        self.zonal, self.shape, self.where, self.crs = zonal, shape, where, crs
        stat_cols = set(zonal.columns) if zonal is not None else set()
        self._early = where is not None and not (where.names & stat_cols)
        self._shape_cols = set(COLUMNS) if shape else set()
        self.kept = 0
        self.dropped = 0

    def __call__(self, frame):
        n = len(frame)
        if self.shape:
            frame = self._add(frame, self._measures(frame))
        if self._early:
            frame = self._filter(frame)
        if self.zonal is not None:
            geoms = np.asarray(frame.geometry.values, dtype=object)
            frame = self._add(frame, self.zonal(geoms))
        if self.where is not None and not self._early:
            frame = self._filter(frame)
        self.kept += len(frame)
        self.dropped += n - len(frame)
        return frame

    def _measures(self, frame) -> dict:
        from terrasam.measures import shape_measures

        geoms = np.asarray(frame.geometry.values, dtype=object)
        return shape_measures(geoms, self.crs, area=frame["area_m2"].to_numpy(float),
                              perimeter=frame["perimeter_m"].to_numpy(float))

    @staticmethod
    def _add(frame, columns: Mapping[str, np.ndarray]):
        frame = frame.copy()
        geometry = frame.geometry.name
        for name, values in columns.items():
            frame[name] = values
        order = [c for c in frame.columns if c != geometry] + [geometry]
        return frame[order]

    def _filter(self, frame):
        cols = {name: _values(frame[name]) for name in self.where.names}
        keep = self.where.mask(cols, len(frame))
        if keep.all():
            return frame
        return frame[keep].reset_index(drop=True)


def _values(series) -> np.ndarray:
    """A column as a numpy array: numbers as floats (NA as NaN), anything else as objects."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    if is_bool_dtype(series.dtype):
        return series.to_numpy(dtype=bool, na_value=False)
    if is_numeric_dtype(series.dtype):
        return series.to_numpy(dtype=float, na_value=np.nan)
    return series.to_numpy(dtype=object)
