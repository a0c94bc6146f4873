"""Point, box and text prompts on a georeferenced raster, given in any CRS.

Point and box prompts come from the command line (coordinates in ``crs``, default the
raster's) or from any vector file pyogrio reads (reprojected from the file's own CRS). They
become *prompts*: one object each. Without a group field every feature is one prompt (a
MultiPoint feature is one prompt of several points); with ``group_field`` all features sharing
a value form one prompt (several points, or one box plus points). Negative points (label 0)
that belong to no group refine every ungrouped prompt whose model window holds them.

A box prompt's geometry may be any polygon: its bounds, after reprojection to the raster's CRS,
are the box given to the model.

Execution: each prompt gets a window of the model's input size around it in the raster's pixel
grid, snapped to a half-window grid so that nearby prompts share a window (and one image
embedding). A box larger than the window gets a window containing it, read downsampled to the
model size. Prompts outside the raster or on nodata are reported with a count and skipped.

Text prompts (SAM 3) run over the whole raster with the tiling and stitching of ``segment``.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from affine import Affine
from shapely import affinity

from terrasam.errors import TerrasamError

PROMPT_TYPES = ("point", "box", "points", "box+points", "text")
PARTS = ("all", "prompt")
MAX_DOWNSAMPLE = 4.0  # warn when a box is read at coarser than 1/4 of the raster's resolution
BOX_MARGIN = 0.1  # context added on each side of a box larger than the model window
MAX_GROW = 3  # times a prompt is re-run in a larger window when its mask is cut by an edge
_BATCH = 32  # prompts per decoder call
_UPSCALE_CHUNK = 8  # masks upscaled to window size at once (bounds memory)


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
    try:
        return gpd.read_file(path, engine="pyogrio")
    except Exception as exc:  # pyogrio/GDAL errors have many types
        reason = str(exc).split("\n")[0].rstrip(".")
        raise TerrasamError(f"cannot read {kind} file {str(source)!r} ({reason}).") from None


def _features_from_frame(source, kind: str, label_field, group_field) -> tuple[list, bool]:
    """Features of a points/boxes file; also whether it had the group field."""
    frame = _read_frame(source, f"{kind}s")
    name = str(source) if isinstance(source, (str, Path)) else f"the {kind}s frame"
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
            geom = shapely.Point(float(item[0]), float(item[1]))
        else:
            if len(item) not in (4, 5):
                raise TerrasamError(
                    f"a box prompt is (minx, miny, maxx, maxy[, group]), got {item!r}."
                )
            x0, y0, x1, y1 = (float(v) for v in item[:4])
            if not (x1 > x0 and y1 > y0):
                raise TerrasamError(
                    f"a box must have MINX < MAXX and MINY < MAXY, got {item[:4]!r}."
                )
            group = ("__group__", _group_text(item[4])) if len(item) == 5 else ("__feature__", kind, i)
            geom = shapely.box(x0, y0, x1, y1)
        feats.append(_Feature(geom, label if kind == "point" else 1, group, crs, kind))
    return feats


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


# --------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class WindowPlan:
    """A source window read at ``(out_h, out_w)`` pixels: what the model sees for a prompt."""

    col_off: float  # source pixels (fractions only with --gsd)
    row_off: float
    width: float
    height: float
    out_w: int
    out_h: int

    @property
    def scale(self) -> tuple[float, float]:
        """Source pixels per model-image pixel along x and y."""
        return (self.width / self.out_w, self.height / self.out_h)

    def transform(self, raster_transform: Affine) -> Affine:
        """Model-image pixel -> CRS coordinates."""
        sx, sy = self.scale
        return (raster_transform @ Affine.translation(self.col_off, self.row_off)
                @ Affine.scale(sx, sy))

    def to_image(self, xy: np.ndarray) -> np.ndarray:
        """Source-pixel (x, y) -> model-image pixel (x, y)."""
        sx, sy = self.scale
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        return (xy - [self.col_off, self.row_off]) / [sx, sy]

    def contains(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        return ((xy[:, 0] >= self.col_off) & (xy[:, 0] < self.col_off + self.width)
                & (xy[:, 1] >= self.row_off) & (xy[:, 1] < self.row_off + self.height))


def _axis(a: float, b: float, n: int, size: int) -> int:
    """Origin of a ``size`` window holding [a, b] in a raster of ``n`` pixels (n > size)."""
    half = size // 2
    centre = (a + b) / 2
    if b - a <= half:
        # snap to a half-window grid: nearby prompts land in the same window and share an
        # embedding, and the prompt stays at least a quarter window from the edges
        origin = (round(centre / half) - 1) * half
    else:
        origin = math.floor(centre - size / 2)
    return int(min(max(origin, 0), n - size))


def plan_window(extent, width: int, height: int, size: int) -> WindowPlan:
    """The window the model sees for a prompt whose source-pixel extent is ``extent``.

    Up to ``size`` pixels: a ``size`` window (snapped to a stride of size/2 when the prompt
    fits in half of it) clamped inside the raster. Larger: a square window holding the extent
    plus a margin, clamped to the raster, read downsampled so its longer side is ``size``.
    """
    x0, y0, x1, y1 = (float(v) for v in extent)
    longest = max(x1 - x0, y1 - y0)
    if longest <= size:
        cols = (_axis(x0, x1, width, size), size) if width > size else (0, width)
        rows = (_axis(y0, y1, height, size), size) if height > size else (0, height)
        return WindowPlan(cols[0], rows[0], cols[1], rows[1], cols[1], rows[1])
    side = math.ceil(longest * (1 + 2 * BOX_MARGIN))
    factor = side / size
    spans = []
    for a, b, n in ((x0, x1, width), (y0, y1, height)):
        length = min(side, n)
        origin = int(min(max(math.floor((a + b) / 2 - length / 2), 0), n - length))
        spans.append((origin, length, max(1, round(length / factor))))
    (c0, w, ow), (r0, h, oh) = spans
    return WindowPlan(c0, r0, w, h, ow, oh)


def _inside(xy: np.ndarray, width: int, height: int) -> np.ndarray:
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    return (np.isfinite(xy).all(axis=1) & (xy[:, 0] >= 0) & (xy[:, 0] < width)
            & (xy[:, 1] >= 0) & (xy[:, 1] < height))


def clip_prompts(prompts: list[Prompt], width: int, height: int, report: Report) -> list[Prompt]:
    """The prompts that touch the raster, with their boxes clipped to it.

    Ids of prompts wholly outside go to ``report.outside``; positive points outside the raster
    are left out of prompts that keep something inside (counted in ``report.dropped_points``).
    """
    live = []
    for p in prompts:
        pos = p.labels == 1
        ok = _inside(p.points, width, height)
        box = None
        if p.box is not None and np.isfinite(p.box).all():
            bx0, by0 = max(p.box[0], 0.0), max(p.box[1], 0.0)
            bx1, by1 = min(p.box[2], float(width)), min(p.box[3], float(height))
            if bx1 > bx0 and by1 > by0:
                box = np.array([bx0, by0, bx1, by1])
        if box is None and not (pos & ok).any():
            report.outside.append(p.id)
            continue
        report.dropped_points += int(np.count_nonzero(pos & ~ok))
        p.box = box
        keep = (pos & ok) | ~pos  # negatives stay: the window may still hold them
        p.points, p.labels = p.points[keep], p.labels[keep]
        live.append(p)
    return live


def _extent(p: Prompt) -> tuple[float, float, float, float]:
    """Source-pixel bounds of a prompt's positive points and box."""
    xy = p.points[p.labels == 1]
    parts = [xy.min(axis=0), xy.max(axis=0)] if len(xy) else []
    if p.box is not None:
        parts += [p.box[:2], p.box[2:]]
    stack = np.array(parts)
    return (*stack.min(axis=0), *stack.max(axis=0))


def _plan(extent, width: int, height: int, size: int, scale: float) -> WindowPlan:
    """plan_window for a source-pixel extent, planned in the processing grid (--gsd)."""
    if scale == 1.0:
        return plan_window(extent, width, height, size)
    pw = max(1, math.ceil(width / scale - 1e-9))
    ph = max(1, math.ceil(height / scale - 1e-9))
    w = plan_window([v / scale for v in extent], pw, ph, size)
    return WindowPlan(w.col_off * scale, w.row_off * scale, w.width * scale, w.height * scale,
                      w.out_w, w.out_h)


def _grown(plan: WindowPlan, mask: np.ndarray, extent, width: int, height: int, size: int,
           scale: float) -> WindowPlan | None:
    """A larger window when ``mask`` is cut by an edge of ``plan`` inside the raster."""
    eps = 1e-6
    cut = {"left": plan.col_off > eps and mask[:, 0].any(),
           "top": plan.row_off > eps and mask[0, :].any(),
           "right": plan.col_off + plan.width < width - eps and mask[:, -1].any(),
           "bottom": plan.row_off + plan.height < height - eps and mask[-1, :].any()}
    if not any(cut.values()):
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    sx, sy = plan.scale
    x0 = min(plan.col_off + cols[0] * sx, extent[0])
    x1 = max(plan.col_off + (cols[-1] + 1) * sx, extent[2])
    y0 = min(plan.row_off + rows[0] * sy, extent[1])
    y1 = max(plan.row_off + (rows[-1] + 1) * sy, extent[3])
    # The object goes on past the cut edge by an unknown amount: first a full-resolution
    # window centred on it (when it could fit), else look as far again as it reaches.
    span = size * scale
    longest = max(x1 - x0, y1 - y0)
    if longest + 2 * scale <= span:
        gx = gy = min(span / 8, (span - longest) / 2)
    else:
        gx, gy = max(x1 - x0, plan.width / 2), max(y1 - y0, plan.height / 2)
    x0 -= gx if cut["left"] else 0
    x1 += gx if cut["right"] else 0
    y0 -= gy if cut["top"] else 0
    y1 += gy if cut["bottom"] else 0
    extent = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    new = _plan(extent, width, height, size, scale)
    return None if new == plan else new


def plan_windows(prompts: list[Prompt], negatives: np.ndarray, width: int, height: int,
                 size: int, report: Report, scale: float = 1.0) -> dict[int, WindowPlan]:
    """``{prompt id: WindowPlan}`` for clipped prompts; attaches ungrouped negative points.

    ``scale`` (source pixels per processing pixel, from --gsd) sets the resolution windows are
    planned and read at. An ungrouped negative point refines every ungrouped prompt whose
    window holds it; those refining none are counted in ``report.unused_negatives``.
    """
    plans = {p.id: _plan(_extent(p), width, height, size, scale) for p in prompts}
    used = np.zeros(len(negatives), dtype=bool)
    for p in prompts:
        if p.group is None and len(negatives):
            hit = plans[p.id].contains(negatives)
            p.extra_negatives = [tuple(v) for v in negatives[hit]]
            used |= hit
    report.unused_negatives += int(np.count_nonzero(~used))
    return plans


# --------------------------------------------------------------------------- decoding


def _prompt_arrays(p: Prompt, plan: WindowPlan, valid: np.ndarray):
    """Model-image points/labels/box of a prompt, nodata and out-of-window points removed.

    Returns (points (N, 2), labels (N,), box (4,) | None, status) with status "ok" or "nodata".
    """
    h, w = valid.shape
    xy = plan.to_image(p.points)
    labels = p.labels.copy()
    if p.extra_negatives:
        xy = np.concatenate([xy, plan.to_image(np.array(p.extra_negatives))])
        labels = np.concatenate([labels, np.zeros(len(p.extra_negatives), np.int64)])
    inside = _inside(xy, w, h)
    cols = np.clip(np.floor(xy[:, 0]), 0, w - 1).astype(int)
    rows = np.clip(np.floor(xy[:, 1]), 0, h - 1).astype(int)
    on_data = inside & valid[rows, cols]
    pos = labels == 1
    dropped = int(np.count_nonzero(pos & ~on_data))
    keep = on_data | (~pos & inside)
    box = None
    if p.box is not None:
        box = np.concatenate([plan.to_image(p.box[:2])[0], plan.to_image(p.box[2:])[0]])
        bx0, by0 = int(math.floor(box[0])), int(math.floor(box[1]))
        bx1, by1 = int(math.ceil(box[2])), int(math.ceil(box[3]))
        if not valid[max(by0, 0):by1, max(bx0, 0):bx1].any():
            return None, None, None, "nodata", 0
    if box is None and not (keep & pos).any():
        return None, None, None, "nodata", 0
    return xy[keep], labels[keep], box, "ok", dropped


def _keep_prompt_parts(mask: np.ndarray, points: np.ndarray, labels: np.ndarray, box) -> np.ndarray:
    """Only the connected parts of ``mask`` holding a positive point or overlapping the box."""
    from scipy import ndimage

    comp, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask
    h, w = mask.shape
    wanted = set()
    for x, y in points[labels == 1]:
        c, r = int(min(max(math.floor(x), 0), w - 1)), int(min(max(math.floor(y), 0), h - 1))
        if comp[r, c]:
            wanted.add(int(comp[r, c]))
    if box is not None:
        x0, y0 = max(int(math.floor(box[0])), 0), max(int(math.floor(box[1])), 0)
        x1, y1 = int(math.ceil(box[2])), int(math.ceil(box[3]))
        wanted.update(int(v) for v in np.unique(comp[y0:y1, x0:x1]) if v)
    if not wanted:
        return mask
    return np.isin(comp, sorted(wanted))


def _decode_window(adapter, embedding, items, valid, multimask_all: bool, parts: str):
    """Decode prompts sharing one embedding; yields (prompt, mask, score, rank)."""
    import torch

    batches: dict = defaultdict(list)
    for item in items:
        p, xy, labels, box = item
        batches[(box is not None, len(xy))].append(item)
    for (has_box, n), group in batches.items():
        for start in range(0, len(group), _BATCH):
            chunk = group[start:start + _BATCH]
            pts = np.stack([c[1] for c in chunk]).astype(np.float32) if n else None
            labs = np.stack([c[2] for c in chunk]).astype(np.int64) if n else None
            bxs = np.stack([c[3] for c in chunk]).astype(np.float32) if has_box else None
            with torch.inference_mode():
                low, iou = adapter.decode(embedding, points=pts, point_labels=labs, boxes=bxs,
                                          multimask=True)
            iou_np = iou.float().cpu().numpy().reshape(len(chunk), -1)
            picks = []
            for i in range(len(chunk)):
                order = np.argsort(-iou_np[i], kind="stable")
                picks += [(i, int(j), r) for r, j in enumerate(order if multimask_all
                                                              else order[:1], start=1)]
            for start2 in range(0, len(picks), _UPSCALE_CHUNK):
                sel = picks[start2:start2 + _UPSCALE_CHUNK]
                bi = torch.tensor([s[0] for s in sel], device=low.device)
                mi = torch.tensor([s[1] for s in sel], device=low.device)
                with torch.inference_mode():
                    logits = adapter.upscale(low[bi, mi], embedding)
                masks = (logits > adapter.mask_threshold).cpu().numpy()
                for (i, j, rank), mask in zip(sel, masks):
                    p, xy, labels, box = chunk[i]
                    mask = mask & valid
                    if parts == "prompt":
                        mask = _keep_prompt_parts(mask, xy, labels, box)
                    yield p, mask, float(iou_np[i, j]), rank


def run_point_box(reader, adapter, prompts: list[Prompt], plans: dict, report: Report, *,
                  multimask_all=False, parts="all", max_downsample=MAX_DOWNSAMPLE,
                  scale=1.0, max_grow=MAX_GROW, quiet=True, warn=None) -> list[dict]:
    """Segment each placed prompt; returns rows (prompt_id, type, geometry, score, ...).

    Prompts sharing a window share one embedding. When the best mask is cut by a window edge
    inside the raster, the prompt is run again (up to ``max_grow`` times) in a window grown
    past that edge, read downsampled when it exceeds the model's input size.
    """
    from terrasam.progress import Progress
    from terrasam.vectorize import mask_to_geometry

    warn = warn or _warn
    size = int(adapter.image_size)
    pending: dict = defaultdict(list)
    for p in prompts:
        if p.id in plans:
            pending[plans[p.id]].append(p)
    final: dict[int, WindowPlan] = {}
    rows = []
    progress = Progress(len(pending), "windows", quiet=quiet)
    for attempt in range(max_grow + 1):
        regrow: dict = defaultdict(list)
        for plan in sorted(pending, key=lambda w: (w.row_off, w.col_off, w.height, w.width)):
            rgb, valid = reader.read((plan.col_off, plan.row_off, plan.width, plan.height),
                                     out_shape=(plan.out_h, plan.out_w))
            items = []
            for p in pending[plan]:
                xy, labels, box, status, dropped = _prompt_arrays(p, plan, valid)
                if attempt == 0:
                    report.dropped_points += dropped
                if status == "nodata":
                    report.nodata.append(p.id)
                    continue
                items.append((p, xy, labels, box))
            if items:
                embedding = adapter.embed(rgb)
                transform = plan.transform(reader.transform)
                moved = set()
                for p, mask, score, rank in _decode_window(adapter, embedding, items, valid,
                                                           multimask_all, parts):
                    if p.id in moved:
                        continue
                    if rank == 1 and attempt < max_grow and mask.any():
                        new = _grown(plan, mask, _extent(p), reader.width, reader.height,
                                     size, scale)
                        if new is not None:
                            moved.add(p.id)
                            regrow[new].append(p)
                            continue
                    final[p.id] = plan
                    geom = mask_to_geometry(mask, transform)
                    if geom is None or geom.is_empty:
                        if rank == 1:
                            report.empty.append(p.id)
                        continue
                    rows.append({"prompt_id": p.id, "prompt_type": p.type, "prompt": p.wkt,
                                 "prompt_crs": p.crs, "score": score, "rank": rank,
                                 "geometry": geom})
                del embedding
            progress.update()
        if not regrow:
            break
        progress.total += len(regrow)
        pending = regrow
    progress.close()
    coarse = [i for i, w in final.items() if max(w.scale) / scale > max_downsample]
    if coarse:
        worst = max(max(final[i].scale) for i in coarse) / scale
        warn(f"{len(coarse)} prompts span more than the model's {size}-pixel input and were "
             f"read at down to 1/{worst:.1f} of the working resolution "
             f"(prompt ids {_ids(coarse)}); small details may be lost")
    rows.sort(key=lambda r: (r["prompt_id"], r["rank"]))
    return rows


def _ids(ids, limit: int = 10) -> str:
    ids = sorted(ids)
    text = ", ".join(str(i) for i in ids[:limit])
    return text + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


# --------------------------------------------------------------------------- text


@dataclass
class _TextRecord:
    mask: np.ndarray  # cropped to bbox
    bbox: tuple  # x0, y0, x1, y1 (exclusive) tile pixels
    predicted_iou: float
    stability_score: float


def _text_records(detections, valid: np.ndarray) -> list[_TextRecord]:
    out = []
    for det in detections:
        mask = np.asarray(det["mask"], dtype=bool) & valid
        rows = np.flatnonzero(mask.any(axis=1))
        if not len(rows):
            continue
        cols = np.flatnonzero(mask.any(axis=0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        score = float(det["score"])
        out.append(_TextRecord(mask[y0:y1, x0:x1], (x0, y0, x1, y1), score, score))
    return out


def run_text(reader, adapter, texts: Sequence[str], first_id: int, *, score_threshold=0.5,
             mask_threshold=0.5, tile_size=None, overlap=None, gsd=None, merge_iou=0.5,
             merge_ios=0.8, quiet=True) -> list[dict]:
    """Every instance of each text concept over the whole raster, stitched across tiles."""
    from terrasam.progress import Progress
    from terrasam.stitch import Stitcher, assign_ids
    from terrasam.tiling import make_grid

    size = int(tile_size) if tile_size else int(adapter.image_size)
    ovl = int(overlap) if overlap is not None else size // 4
    grid = make_grid(reader.width, reader.height, reader.transform, tile_size=size, overlap=ovl,
                     gsd=gsd, res=reader.ground_res if gsd else None)
    tiles = grid.with_data(reader)
    stitchers = [Stitcher(tiles, grid.width, grid.height, merge_iou=merge_iou,
                          merge_ios=merge_ios) for _ in texts]
    found: list[list] = [[] for _ in texts]
    with Progress(len(tiles), "tiles", quiet=quiet) as progress:
        for tile in tiles:
            rgb, valid = tile.read(reader)
            for k, text in enumerate(texts):
                dets = adapter.segment_text(rgb, text, score_threshold=score_threshold,
                                            mask_threshold=mask_threshold)
                found[k] += stitchers[k].add_tile(tile, _text_records(dets, valid))
            progress.update()
    t = grid.transform
    rows = []
    for k, text in enumerate(texts):
        objects = assign_ids(found[k] + stitchers[k].finish())
        for o in objects:
            geom = affinity.affine_transform(o.geometry, [t.a, t.b, t.d, t.e, t.c, t.f])
            rows.append({"prompt_id": first_id + k, "prompt_type": "text", "prompt": text,
                         "prompt_crs": "", "score": float(o.predicted_iou), "rank": 1,
                         "tiles": o.n_tiles, "geometry": geom})
    return rows


# --------------------------------------------------------------------------- entry point


def _report_skips(report: Report, total: int, warn) -> None:
    if report.outside:
        warn(f"{len(report.outside)} of {total} prompts fall outside the raster and were "
             f"skipped (prompt ids {_ids(report.outside)})")
    if report.nodata:
        warn(f"{len(report.nodata)} of {total} prompts fall on nodata and were skipped "
             f"(prompt ids {_ids(report.nodata)})")
    if report.empty:
        warn(f"{len(report.empty)} of {total} prompts gave an empty mask "
             f"(prompt ids {_ids(report.empty)})")
    if report.dropped_points:
        warn(f"{report.dropped_points} positive points outside the raster or on nodata were "
             "left out of their prompts")
    if report.unused_negatives:
        warn(f"{report.unused_negatives} negative points are outside the window of every "
             "prompt they could refine and were ignored")


def _raster_bounds_text(reader) -> str:
    x0, y0, x1, y1 = rasterio_bounds(reader)
    crs = _crs_text(_as_crs(reader.crs, "raster CRS")) if reader.crs else "pixel units"
    return f"{x0:.6g}, {y0:.6g}, {x1:.6g}, {y1:.6g} in {crs}"


def rasterio_bounds(reader) -> tuple[float, float, float, float]:
    """The raster's bounds in its CRS (any affine transform)."""
    t = reader.transform
    xs, ys = zip(*(t @ (c, r) for c, r in ((0, 0), (reader.width, 0),
                                           (reader.width, reader.height), (0, reader.height))))
    return (min(xs), min(ys), max(xs), max(ys))


def prompt(raster, output=None, points=None, boxes=None, text=None, *, crs=None,
           label_field=None, group_field=None, model=None, checkpoint=None, adapter=None,
           device="auto", dtype="auto", bands=None, nodata=None, scale="percentile",
           multimask_all=False, parts="all", max_downsample=MAX_DOWNSAMPLE,
           score_threshold=0.5, mask_threshold=0.5, tile_size=None, overlap=None, gsd=None,
           simplify=None, min_area=None, fill_holes=None, compile=False, overwrite=False,
           preview=None, map=None, quiet=True, warn: Callable[[str], None] | None = None):
    """Segment one object per point/box prompt, or every instance of text concepts (SAM 3).

    ``points``: a vector file (Point/MultiPoint, its own CRS), a GeoDataFrame, or tuples
    ``(x, y[, label[, group]])`` in ``crs`` (default the raster's CRS); label 1 is positive,
    0 negative. ``boxes``: a polygon file (each polygon's bounds in the raster's CRS are the
    box) or tuples ``(minx, miny, maxx, maxy[, group])``. ``label_field``/``group_field`` name
    fields of the files: features sharing a group form one prompt. ``text``: a concept or a
    list of them (needs SAM 3; the default model then). ``parts``: "all" keeps the model's
    whole mask, "prompt" only its connected parts under a positive point or the box.
    ``multimask_all`` keeps the model's three candidate masks (column ``rank``) instead of the
    best by predicted IoU. ``score_threshold``/``mask_threshold`` are SAM 3's text-instance
    score and mask-probability thresholds; ``tile_size``/``overlap`` its tiling. ``gsd``
    (metres) sets the working resolution of every window and tile. Prompts outside the raster or on nodata are reported through
    ``warn`` (default: ``warnings.warn``) and skipped. Writes ``output`` when given; returns
    the GeoDataFrame (``gdf.attrs["terrasam"]`` summarises the run, skipped prompt ids too).
    """
    from terrasam import io
    from terrasam.raster import open_raster
    from terrasam.vectorize import clean, to_frame

    warn = warn or _warn
    texts = [text] if isinstance(text, str) else list(text or [])
    texts = [t.strip() for t in texts]
    if any(not t for t in texts):
        raise TerrasamError("a text prompt must not be empty.")
    if points is None and boxes is None and not texts:
        raise TerrasamError("give point prompts, box prompts or a text prompt.")
    if parts not in PARTS:
        raise TerrasamError(f"parts must be one of {', '.join(PARTS)}, got {parts!r}.")
    if not (0.0 <= score_threshold <= 1.0):
        raise TerrasamError(f"the score threshold must be between 0 and 1, got {score_threshold}.")
    out = io.check_output(output, overwrite) if output is not None else None
    for extra, suffixes in ((preview, (".png",)), (map, (".html", ".htm"))):
        if extra is None:
            continue
        if out is None:
            raise TerrasamError("a preview or map needs an output file.")
        if not str(extra).lower().endswith(suffixes):
            raise TerrasamError(f"{extra} must end with {' or '.join(suffixes)}.")
        if Path(extra).exists() and not overwrite:
            raise TerrasamError(f"{extra} exists; use --overwrite to replace it.")

    with open_raster(raster, bands=bands, nodata=nodata, scale=scale) as reader:
        grid_scale = 1.0
        if gsd is not None:
            from terrasam.tiling import make_grid

            grid_scale = make_grid(reader.width, reader.height, reader.transform, tile_size=1,
                                   overlap=0, gsd=gsd, res=reader.ground_res).scale
        prompts, live, plans, report = [], [], {}, Report()
        if points is not None or boxes is not None:
            prompts, negatives, report = collect_prompts(
                points, boxes, raster_crs=reader.crs, transform=reader.transform, crs=crs,
                label_field=label_field, group_field=group_field, warn=warn)
            live = clip_prompts(prompts, reader.width, reader.height, report)
            if not live:
                which = "the prompt falls" if len(prompts) == 1 else \
                    f"all {len(prompts)} prompts fall"
                raise TerrasamError(
                    f"{which} outside the raster ({_raster_bounds_text(reader)}); "
                    "check their CRS (--crs).")
        if adapter is None:
            from terrasam.models import load_model

            if model is None and checkpoint is None and texts:
                model = "sam3"
            adapter = load_model(model, checkpoint, device=device, dtype=dtype, compile=compile)
        if texts and adapter.family != "sam3":
            raise TerrasamError(
                f"model {adapter.model_id} does not take text prompts; use --model sam3.")
        if live:
            plans = plan_windows(live, negatives, reader.width, reader.height,
                                 int(adapter.image_size), report, scale=grid_scale)
        rows = []
        if plans:
            rows = run_point_box(reader, adapter, live, plans, report,
                                 multimask_all=multimask_all, parts=parts,
                                 max_downsample=max_downsample, scale=grid_scale, quiet=quiet,
                                 warn=warn)
            _report_skips(report, len(prompts), warn)
            if not rows and len(report.outside) + len(report.nodata) == len(prompts):
                raise TerrasamError(
                    f"all {len(prompts)} prompts fall outside the raster or on nodata.")
        if texts:
            rows += run_text(reader, adapter, texts, len(prompts) + 1,
                             score_threshold=score_threshold, mask_threshold=mask_threshold,
                             tile_size=tile_size, overlap=overlap, gsd=gsd, quiet=quiet)
        raster_crs, res = reader.crs, reader.res
        band_indexes, used_nodata = list(reader.band_indexes), reader.nodata

    geoms = clean(np.array([r["geometry"] for r in rows], dtype=object), simplify=simplify,
                  min_area=min_area, fill_holes=fill_holes, crs=raster_crs, pixel_size=res)
    attrs = {
        "prompt_id": np.array([r["prompt_id"] for r in rows], dtype=np.int64),
        "prompt_type": np.array([r["prompt_type"] for r in rows], dtype=object),
        "prompt": np.array([r["prompt"] for r in rows], dtype=object),
        "prompt_crs": np.array([r["prompt_crs"] for r in rows], dtype=object),
        "score": np.array([r["score"] for r in rows], dtype=np.float64),
        "model": np.array([adapter.model_id] * len(rows), dtype=object),
    }
    if multimask_all:
        attrs["rank"] = np.array([r["rank"] for r in rows], dtype=np.int64)
    gdf = to_frame(geoms, raster_crs, attrs)
    summary = {"prompts": len(prompts), "texts": texts, "objects": len(gdf),
               "skipped": report.to_dict(), "output": str(out) if out else None}
    if out is not None:
        provenance = io.make_provenance(
            input=str(raster), model=adapter.model_id, command="prompt",
            checkpoint_path=adapter.checkpoint, checkpoint_sha256=adapter.checkpoint_sha256,
            bands=band_indexes, nodata=used_nodata, scale=scale,
            points=_source_text(points), boxes=_source_text(boxes), text=texts,
            crs=None if crs is None else str(crs), label_field=label_field,
            group_field=group_field, multimask_all=multimask_all, parts=parts,
            score_threshold=score_threshold, mask_threshold=mask_threshold,
            tile_size=tile_size, overlap=overlap, gsd=gsd, simplify=simplify, min_area=min_area,
            fill_holes=fill_holes, device=str(adapter.device), dtype=str(adapter.dtype),
            skipped=report.to_dict(), objects=len(gdf))
        io.write_vectors(gdf, out, provenance, overwrite=overwrite)
        if preview is not None:
            from terrasam.viz import write_preview

            write_preview(raster, gdf, preview, bands=bands, scale=scale, nodata=nodata,
                          overwrite=overwrite)
        if map is not None:
            from terrasam.viz import write_map

            write_map(raster, gdf, map, bands=bands, scale=scale, nodata=nodata,
                      overwrite=overwrite)
    gdf.attrs["terrasam"] = summary
    return gdf


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
