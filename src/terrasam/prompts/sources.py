"""Point and box prompts from the command line, files or frames, placed in the raster's pixels.

Point and box prompts come from the command line (coordinates in ``crs``, default the
raster's) or from any vector file pyogrio reads (reprojected from the file's own CRS). They
become *prompts*: one object each. Without a group field every feature is one prompt (a
MultiPoint feature is one prompt of several points); with ``group_field`` all features sharing
a value form one prompt (several points, or one box plus points). Negative points (label 0)
that belong to no group refine every ungrouped prompt whose model window holds them.

A box prompt's geometry may be any polygon: its bounds, after reprojection to the raster's CRS,
are the box given to the model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from affine import Affine

from terrasam.errors import TerrasamError

PROMPT_TYPES = ("point", "box", "points", "box+points", "text")


@dataclass
class Prompt:
    """One object to segment: positive/negative points and/or a box, in source pixels."""

    id: int
    points: np.ndarray  # (N, 2) float (x=col, y=row) source-pixel coordinates
    labels: np.ndarray  # (N,) int: 1 positive, 0 negative
    box: np.ndarray | None  # (4,) x0, y0, x1, y1 source pixels
    wkt: str  # the prompt as given, in its own CRS
    crs: str  # that CRS, as text ("" when unknown)
    group: object = None
    extra_negatives: list = field(default_factory=list)  # (x, y) attached ungrouped negatives

    @property
    def type(self) -> str:
        n = len(self.points) + len(self.extra_negatives)
        if self.box is not None:
            return "box+points" if n else "box"
        return "point" if n == 1 else "points"


@dataclass
class Report:
    """Prompts that produced no row, by reason (prompt ids)."""

    outside: list = field(default_factory=list)
    nodata: list = field(default_factory=list)
    empty: list = field(default_factory=list)
    invalid_geometry: int = 0
    unused_negatives: int = 0
    dropped_points: int = 0

    def to_dict(self) -> dict:
        return {"outside": list(self.outside), "nodata": list(self.nodata),
                "empty": list(self.empty), "invalid_geometry": self.invalid_geometry,
                "unused_negatives": self.unused_negatives,
                "dropped_points": self.dropped_points}


# --------------------------------------------------------------------------- parsing


def parse_point(text: str) -> tuple:
    """Parse ``X,Y[,LABEL[,GROUP]]`` from the command line."""
    parts = [p.strip() for p in str(text).split(",")]
    if not 2 <= len(parts) <= 4:
        raise TerrasamError(f"--point takes X,Y or X,Y,LABEL or X,Y,LABEL,GROUP, got {text!r}.")
    try:
        x, y = float(parts[0]), float(parts[1])
    except ValueError:
        raise TerrasamError(f"--point coordinates must be numbers, got {text!r}.") from None
    out: tuple = (x, y)
    if len(parts) >= 3:
        out += (_label(parts[2], "--point label"),)
    if len(parts) == 4:
        out += (parts[3],)
    return out


def parse_box(text: str) -> tuple:
    """Parse ``MINX,MINY,MAXX,MAXY[,GROUP]`` from the command line."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (4, 5):
        raise TerrasamError(f"--box takes MINX,MINY,MAXX,MAXY[,GROUP], got {text!r}.")
    try:
        values = tuple(float(p) for p in parts[:4])
    except ValueError:
        raise TerrasamError(f"--box coordinates must be numbers, got {text!r}.") from None
    return values + ((parts[4],) if len(parts) == 5 else ())


def _label(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if number in (0.0, 1.0):
        return int(number)
    raise TerrasamError(f"{what} must be 1 (positive) or 0 (negative), got {value!r}.")


def _as_crs(value, what: str):
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    if value is None:
        return None
    try:
        return CRS.from_user_input(value)
    except CRSError:
        raise TerrasamError(f"{what} {value!r} is not a CRS pyproj knows.") from None


def _crs_text(crs) -> str:
    if crs is None:
        return ""
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


@dataclass
class _Feature:
    geom: object  # shapely geometry in ``crs``
    label: int
    group: object
    crs: object  # pyproj CRS or None
    kind: str  # "point" | "box"


def _read_frame(source, kind: str):
    """A GeoDataFrame from a path or a GeoDataFrame/GeoSeries."""
    import geopandas as gpd

    if isinstance(source, gpd.GeoSeries):
        return gpd.GeoDataFrame(geometry=source, crs=source.crs)
    if isinstance(source, gpd.GeoDataFrame):
        return source
    path = Path(source)
    if not path.exists():
        raise TerrasamError(f"{kind} file {str(source)!r} does not exist.")
    if path.is_file() and path.stat().st_size == 0:
        raise TerrasamError(f"{kind} file {str(source)!r} is empty (0 bytes).")
    try:
        return gpd.read_file(path, engine="pyogrio")
    except Exception as exc:  # pyogrio/GDAL errors have many types
        text = str(exc).split("\n")[0]
        if "not recognized as being in a supported file format" in text:
            raise TerrasamError(f"{kind} file {str(source)!r} is not a vector file GDAL reads "
                                "(GeoPackage, GeoJSON, Shapefile, FlatGeobuf, ...).") from None
        # GDAL's first sentence, without its advice or the path it repeats
        reason = text.split("; ")[0].replace(f"'{path}'", "").replace(str(path), "")
        reason = " ".join(reason.split()).strip(" .:") or type(exc).__name__
        raise TerrasamError(f"cannot read {kind} file {str(source)!r} ({reason}).") from None


def _features_from_frame(source, kind: str, label_field, group_field) -> tuple[list, bool]:
    """Features of a points/boxes file; also whether it had the group field."""
    frame = _read_frame(source, f"{kind}s")
    name = str(source) if isinstance(source, (str, Path)) else f"the {kind}s frame"
    if not len(frame):
        raise TerrasamError(f"{name} holds no features: it has no {kind} prompts.")
    columns = [c for c in frame.columns if c != frame.geometry.name]
    if kind == "point" and label_field is not None and label_field not in frame.columns:
        raise TerrasamError(
            f"{name} has no label field {label_field!r}; its fields are: "
            f"{', '.join(map(str, columns)) or 'none'}."
        )
    has_group = group_field is not None and group_field in frame.columns
    crs = _as_crs(frame.crs, f"the CRS of {name}") if frame.crs is not None else None
    feats = []
    for i, geom in enumerate(frame.geometry.values):
        if geom is None or geom.is_empty:
            feats.append(None)
            continue
        gtype = geom.geom_type
        if kind == "point" and gtype not in ("Point", "MultiPoint"):
            raise TerrasamError(
                f"{name} holds {gtype} geometries; point prompts must be points "
                "(give polygons with --boxes)."
            )
        if kind == "box" and gtype not in ("Polygon", "MultiPolygon"):
            raise TerrasamError(
                f"{name} holds {gtype} geometries; box prompts must be polygons "
                "(give points with --points)."
            )
        coords = shapely.get_coordinates(geom)
        if not np.isfinite(coords).all():
            bad = coords[~np.isfinite(coords)][0]
            raise TerrasamError(f"{name}: {kind} feature {i + 1} has a non-finite coordinate "
                                f"({bad}).")
        label = 1
        if kind == "point" and label_field is not None:
            label = _label(frame[label_field].iloc[i], f"{name}: field {label_field!r}")
        group = frame[group_field].iloc[i] if has_group else None
        if has_group and _is_null(group):
            group = None
        if group is None:
            group = ("__feature__", kind, i)  # a feature on its own is one prompt
        else:
            group = ("__group__", _group_text(group))
        feats.append(_Feature(geom, label, group, crs, kind))
    return feats, has_group


def _group_text(value) -> str:
    """Group values compared as text, so that 3, 3.0 and "3" are one group."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    return str(value.item() if isinstance(value, np.generic) else value)


def _is_null(value) -> bool:
    try:
        return bool(value is None or (isinstance(value, float) and math.isnan(value)))
    except TypeError:
        return False


def _features_from_tuples(items, kind: str, crs) -> list:
    feats = []
    for i, item in enumerate(items):
        item = tuple(item)
        if kind == "point":
            if not 2 <= len(item) <= 4:
                raise TerrasamError(
                    f"a point prompt is (x, y[, label[, group]]), got {item!r}."
                )
            label = _label(item[2], "a point label") if len(item) >= 3 else 1
            group = ("__group__", _group_text(item[3])) if len(item) == 4 else ("__feature__", kind, i)
            _check_finite(item[:2], f"point {i + 1}")
            geom = shapely.Point(float(item[0]), float(item[1]))
        else:
            if len(item) not in (4, 5):
                raise TerrasamError(
                    f"a box prompt is (minx, miny, maxx, maxy[, group]), got {item!r}."
                )
            _check_finite(item[:4], f"box {i + 1}")
            x0, y0, x1, y1 = (float(v) for v in item[:4])
            if not (x1 > x0 and y1 > y0):
                raise TerrasamError(
                    f"a box must have MINX < MAXX and MINY < MAXY, got {item[:4]!r}."
                )
            group = ("__group__", _group_text(item[4])) if len(item) == 5 else ("__feature__", kind, i)
            geom = shapely.box(x0, y0, x1, y1)
        feats.append(_Feature(geom, label if kind == "point" else 1, group, crs, kind))
    return feats


def _check_finite(values, what: str) -> None:
    """Refuse NaN and infinite coordinates: they would otherwise read as "outside the raster"."""
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise TerrasamError(f"{what} has a coordinate that is not a number "
                            f"({', '.join(map(str, values))}).") from None
    bad = [v for v in numbers if not math.isfinite(v)]
    if bad:
        raise TerrasamError(f"{what} has a non-finite coordinate ({bad[0]}).")


def _is_tuples(source) -> bool:
    if isinstance(source, (str, Path)):
        return False
    try:
        import geopandas as gpd

        if isinstance(source, (gpd.GeoDataFrame, gpd.GeoSeries)):
            return False
    except ImportError:  # pragma: no cover
        pass
    return isinstance(source, Sequence) or isinstance(source, np.ndarray)


def collect_prompts(points=None, boxes=None, *, raster_crs, transform: Affine, crs=None,
                    label_field=None, group_field=None,
                    warn: Callable[[str], None] | None = None):
    """Turn point/box sources into prompts in the raster's pixel grid.

    ``points``/``boxes``: a vector file path, a GeoDataFrame/GeoSeries, or a sequence of
    tuples ``(x, y[, label[, group]])`` / ``(minx, miny, maxx, maxy[, group])`` in ``crs``
    (default: the raster's CRS). Returns (prompts in input order, ungrouped negative points
    (K, 2) in source pixels, report).
    """
    warn = warn or _warn
    report = Report()
    user_crs = _as_crs(crs, "--crs")
    rcrs = _as_crs(raster_crs, "the raster CRS") if raster_crs is not None else None
    feats: list = []
    grouped_files = 0
    for source, kind in ((points, "point"), (boxes, "box")):
        if source is None:
            continue
        if _is_tuples(source):
            feats += _features_from_tuples(source, kind, user_crs if user_crs else rcrs)
        else:
            f, has_group = _features_from_frame(source, kind, label_field, group_field)
            grouped_files += has_group
            missing = [x for x in f if x is not None and x.crs is None]
            if missing:
                warn(f"the {kind}s have no CRS; taking their coordinates in the raster's CRS")
                for x in missing:
                    x.crs = rcrs
            report.invalid_geometry += sum(x is None for x in f)
            feats += [x for x in f if x is not None]
    if group_field is not None and grouped_files == 0 and not all(
            _is_tuples(s) for s in (points, boxes) if s is not None):
        raise TerrasamError(f"no prompt file has the group field {group_field!r}.")
    if report.invalid_geometry:
        warn(f"{report.invalid_geometry} prompt features without geometry were skipped")
    if not feats:
        raise TerrasamError("no point or box prompts were given.")

    inverse = ~transform
    to_pixels = _PixelMapper(rcrs, inverse)
    groups: dict = {}
    for feat in feats:
        groups.setdefault(feat.group, []).append(feat)

    prompts: list[Prompt] = []
    loose_negatives: list = []
    for key, members in groups.items():
        boxes_in = [m for m in members if m.kind == "box"]
        if len(boxes_in) > 1:
            raise TerrasamError(
                f"group {key[1]!r} has {len(boxes_in)} boxes; "
                "a prompt takes at most one box."
            )
        pts, labels, geoms_src = [], [], []
        for m in members:
            if m.kind == "point":
                parts = list(m.geom.geoms) if m.geom.geom_type == "MultiPoint" else [m.geom]
                xy = to_pixels.points(np.array([p.coords[0][:2] for p in parts]), m.crs)
                pts.append(xy)
                labels += [m.label] * len(parts)
                geoms_src += [(g, m.crs) for g in parts]
        box = None
        if boxes_in:
            box = to_pixels.box(boxes_in[0].geom, boxes_in[0].crs)
        points_px = np.concatenate(pts) if pts else np.zeros((0, 2))
        labels_a = np.asarray(labels, dtype=np.int64)
        ungrouped = key[0] == "__feature__"
        if box is None and not (labels_a == 1).any():
            if ungrouped:
                loose_negatives.append((len(prompts), points_px))
                continue
            raise TerrasamError(
                f"group {key[1]!r} has only negative points; give it a positive point or a box."
            )
        src_crs = members[0].crs
        if boxes_in and boxes_in[0].crs != src_crs:  # one WKT, in the first member's CRS
            boxes_in[0].geom = _reproject(boxes_in[0].geom, boxes_in[0].crs, src_crs)
        geoms_src = [_reproject(g, m_crs, src_crs) for g, m_crs in geoms_src]
        wkt_geoms = ([boxes_in[0].geom] if boxes_in else []) + geoms_src
        if len(wkt_geoms) == 1:
            wkt_geom = wkt_geoms[0]
        elif not boxes_in:
            wkt_geom = shapely.multipoints(geoms_src)
        else:
            wkt_geom = shapely.GeometryCollection(wkt_geoms)
        prompts.append(Prompt(
            id=len(prompts) + 1, points=points_px, labels=labels_a, box=box,
            wkt=shapely.to_wkt(wkt_geom, rounding_precision=8, trim=True),
            crs=_crs_text(src_crs), group=None if ungrouped else key[1],
        ))
    if not prompts:
        raise TerrasamError("negative points need a positive point or a box to refine.")
    negatives = (np.concatenate([n for _, n in loose_negatives]) if loose_negatives
                 else np.zeros((0, 2)))
    return prompts, negatives, report


def _reproject(geom, src, dst):
    if src is None or dst is None or src == dst:
        return geom
    from pyproj import Transformer

    t = Transformer.from_crs(src, dst, always_xy=True)
    return shapely.transform(geom, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


class _PixelMapper:
    """Coordinates in some CRS -> (col, row) float pixels of the raster."""

    def __init__(self, raster_crs, inverse: Affine):
        self.raster_crs = raster_crs
        self.inverse = inverse
        self._transformers: dict = {}

    def _to_raster(self, xy: np.ndarray, crs) -> np.ndarray:
        if crs is None or self.raster_crs is None or crs == self.raster_crs:
            if crs is not None and self.raster_crs is None:
                raise TerrasamError(
                    f"the raster has no CRS, so prompts in {_crs_text(crs)} cannot be placed; "
                    "give coordinates in the raster's own units without --crs."
                )
            return xy
        from pyproj import Transformer

        key = crs.to_wkt()
        if key not in self._transformers:
            self._transformers[key] = Transformer.from_crs(crs, self.raster_crs, always_xy=True)
        x, y = self._transformers[key].transform(xy[:, 0], xy[:, 1], errcheck=False)
        xy = np.column_stack([np.asarray(x, float), np.asarray(y, float)])
        xy[~np.isfinite(xy).all(axis=1)] = np.nan  # outside the target CRS's domain
        return xy

    def points(self, xy: np.ndarray, crs) -> np.ndarray:
        xy = self._to_raster(np.asarray(xy, dtype=float).reshape(-1, 2), crs)
        a, b, c, d, e, f = self.inverse[:6]
        with np.errstate(invalid="ignore"):
            cols = a * xy[:, 0] + b * xy[:, 1] + c
            rows = d * xy[:, 0] + e * xy[:, 1] + f
        return np.column_stack([cols, rows])

    def box(self, polygon, crs) -> np.ndarray:
        """Pixel box of a polygon's bounds in the raster's CRS (densified before reprojecting)."""
        if crs is not None and self.raster_crs is not None and crs != self.raster_crs:
            x0, y0, x1, y1 = polygon.bounds
            step = max(x1 - x0, y1 - y0) / 50 or 1.0
            ring = np.asarray(shapely.segmentize(shapely.box(x0, y0, x1, y1), step)
                              .exterior.coords)[:, :2]
            xy = self._to_raster(ring, crs)
        else:
            xy = self._to_raster(np.asarray(shapely.box(*polygon.bounds).exterior.coords), crs)
        xy = xy[np.isfinite(xy).all(axis=1)]
        if len(xy) == 0:
            return np.array([np.inf, np.inf, np.inf, np.inf])
        x0, y0 = xy.min(axis=0)
        x1, y1 = xy.max(axis=0)
        corners = self.points(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), None)
        return np.concatenate([corners.min(axis=0), corners.max(axis=0)])


def outside_error(prompts: list[Prompt], reader) -> TerrasamError:
    """The error for prompts that all fall outside the raster: the raster's bounds in the
    prompts' CRS, and a hint when swapping their x and y (lon/lat) would put them inside."""
    which = "the prompt falls" if len(prompts) == 1 else f"all {len(prompts)} prompts fall"
    crs = _as_crs(prompts[0].crs, "the prompt CRS") if prompts and prompts[0].crs else None
    rcrs = _as_crs(reader.crs, "the raster CRS") if reader.crs else None
    bounds = _raster_bounds_text(reader)
    if crs is not None and rcrs is not None and crs != rcrs:
        try:
            bounds = f"{_bounds_text(_bounds_in(reader, rcrs, crs), crs)} in {_crs_text(crs)}"
        except Exception:  # the raster does not reproject into the prompts' CRS
            pass
    hint = "check their CRS (--crs)"
    if _swapped_inside(prompts, reader, rcrs, crs):
        hint = "did you swap lon/lat? give x (longitude) first, then y (latitude)"
        if crs is None or not crs.is_geographic:
            hint = "did you swap lon/lat? give x (easting) first, then y (northing)"
    return TerrasamError(f"{which} outside the raster ({bounds}); {hint}.")


def _bounds_in(reader, rcrs, crs) -> tuple[float, float, float, float]:
    """The raster's footprint in another CRS (its outline densified before reprojecting)."""
    outline = shapely.segmentize(shapely.box(*rasterio_bounds(reader)),
                                 max(abs(reader.transform.a), abs(reader.transform.e)) * 16)
    geom = _reproject(outline, rcrs, crs)
    bounds = geom.bounds
    if not np.isfinite(bounds).all():
        raise ValueError("not finite")
    return bounds


def _swapped_inside(prompts: list[Prompt], reader, rcrs, crs) -> bool:
    """Whether every prompt, its x and y exchanged, falls inside the raster."""
    mapper = _PixelMapper(rcrs, ~reader.transform)
    for p in prompts:
        try:
            xy = shapely.get_coordinates(shapely.from_wkt(p.wkt))[:, ::-1]
            px = mapper.points(xy, crs)
        except Exception:  # swapped values outside the CRS's domain
            return False
        inside = (np.isfinite(px).all(axis=1) & (px[:, 0] >= 0) & (px[:, 0] < reader.width)
                  & (px[:, 1] >= 0) & (px[:, 1] < reader.height))
        if not len(px) or not inside.any():
            return False
    return True


def _raster_bounds_text(reader) -> str:
    crs = _as_crs(reader.crs, "raster CRS") if reader.crs else None
    return f"{_bounds_text(rasterio_bounds(reader), crs)} in {_crs_text(crs) or 'pixel units'}"


def _bounds_text(bounds, crs) -> str:
    """minx, miny, maxx, maxy with the decimals that matter: 6 for degrees, 2 for metres."""
    digits = 6 if crs is not None and crs.is_geographic else 2
    return ", ".join(f"{v:.{digits}f}" for v in bounds)


def rasterio_bounds(reader) -> tuple[float, float, float, float]:
    """The raster's bounds in its CRS (any affine transform)."""
    t = reader.transform
    xs, ys = zip(*(t @ (c, r) for c, r in ((0, 0), (reader.width, 0),
                                           (reader.width, reader.height), (0, reader.height))))
    return (min(xs), min(ys), max(xs), max(ys))


def _source_text(source):
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        return str(source)
    if _is_tuples(source):
        return [list(map(_plain, item)) for item in source]
    return f"<{type(source).__name__} of {len(source)}>"


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
