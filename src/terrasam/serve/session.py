"""One `terrasam serve` session: the raster, the model, the embedding cache and the objects.

Everything here is plain Python (no web framework): :mod:`terrasam.serve.app` only validates
requests and turns results into HTTP. The work is done by the same stages as
``terrasam prompt`` and ``terrasam segment``:

* click/box prompts (EPSG:4326 from the page) are placed with
  :func:`~terrasam.prompts.sources.collect_prompts`, their windows planned with
  :func:`~terrasam.prompts.windows.plan_windows` and decoded with
  :func:`~terrasam.prompts.decode.run_point_box`, whose embeddings come from an LRU cache per
  window (bounded in bytes) that a background thread fills for the windows under the view;
* "everything in view" runs the automatic mask generator (:class:`~terrasam.amg.AmgJob`) and
  text concepts SAM 3's :class:`~terrasam.text.TextJob` on the visible window;
* polygons are exact pixel-edge geometry in the raster's CRS, cleaned with
  :func:`~terrasam.vectorize.clean`; the page gets them in EPSG:4326 for display only, the
  export writes the raster-CRS geometry with :func:`~terrasam.io.write_vectors` and the
  provenance of :func:`~terrasam.io.make_provenance`.
"""

from __future__ import annotations

import copy
import json
import math
import re
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import shapely
from affine import Affine

from terrasam.errors import TerrasamError
from terrasam.serve.cache import LRUCache
from terrasam.serve.tiles import TileRenderer, _ring, transformer

WGS84 = "EPSG:4326"
MAX_POINTS = 64  # points in one object's prompt
MAX_CANDIDATES = 4096  # recent results that can still be kept
MAX_OBJECTS = 10_000  # kept objects
MAX_TEXT = 200  # characters of a text concept
MAX_VIEW_PX = 8192  # longest side (raster pixels) of a view segmented as a whole
PREFETCH_WINDOWS = 4  # windows embedded in the background for one view
PREFETCH_SPAN = 3  # no prefetch when the view spans more than this many model windows
READ_CACHE = 8  # windows whose pixels are kept (small: 4 MB each at 1024 px)
EXPORT_FORMATS = {"gpkg": (".gpkg", "application/geopackage+sqlite3"),
                  "geojson": (".geojson", "application/geo+json"),
                  "parquet": (".parquet", "application/vnd.apache.parquet")}


class RequestError(TerrasamError):
    """A request the session cannot serve, with a short machine-readable ``code``."""

    def __init__(self, message: str, code: str = "invalid", status: int = 422):
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass
class Candidate:
    """A polygon the page was shown: kept as an object when the user says so."""

    id: int
    geometry: object  # shapely, raster CRS, cleaned
    prompt_type: str
    prompt: str  # the prompt as given (WKT in prompt_crs), "auto" or the text concept
    prompt_crs: str
    score: float
    stability: float = float("nan")  # the stability score (NaN: none, as for text)


class _LockedModel:
    """The adapter with every model call under one lock (requests and the prefetcher share
    one model; a CPU runs one forward pass well, not two at once). ``seconds()`` is the time
    this thread spent in the model since ``reset()``."""

    def __init__(self, adapter, lock):
        self._adapter = adapter
        self._lock = lock
        self._local = threading.local()

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def reset(self) -> None:
        self._local.seconds = 0.0

    def seconds(self) -> float:
        return getattr(self._local, "seconds", 0.0)

    def _call(self, fn, *args, **kwargs):
        with self._lock:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.seconds = self.seconds() + time.perf_counter() - t0

    def embed(self, image):
        return self._call(self._adapter.embed, image)

    def decode(self, *args, **kwargs):
        return self._call(self._adapter.decode, *args, **kwargs)

    def upscale(self, *args, **kwargs):
        return self._call(self._adapter.upscale, *args, **kwargs)

    def segment_text(self, *args, **kwargs):
        return self._call(self._adapter.segment_text, *args, **kwargs)


class _Prefetcher:
    """A daemon thread embedding the windows of the latest view, nearest first."""

    def __init__(self, work):
        self._work = work
        self._queue: list = []
        self._busy = False
        self._stop = False
        self._cv = threading.Condition()
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="terrasam-prefetch", daemon=True)
        self._thread.start()

    def request(self, items) -> None:
        with self._cv:
            self._queue = list(items)  # the newest view replaces what was not started yet
            self._cv.notify()

    @property
    def pending(self) -> int:
        with self._cv:
            return len(self._queue) + self._busy

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                item = self._queue.pop(0)
                self._busy = True
            try:
                self._work(item)
            except Exception:  # a failed prefetch only costs the click its embedding
                self.errors += 1
            finally:
                with self._cv:
                    self._busy = False

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._queue = []
            self._cv.notify()
        self._thread.join(timeout=30)


class _WindowReads:
    """The reader as run_point_box sees it: reads of model windows come from a small cache."""

    def __init__(self, session: Session):
        self._session = session
        r = session._reader
        self.width, self.height, self.transform, self.crs = r.width, r.height, r.transform, r.crs

    def read(self, window, out_shape=None, resampling="bilinear"):
        return self._session._read(tuple(float(v) for v in window), tuple(out_shape),
                                   resampling)


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "raster"
    return name[:80]


class Session:
    """A raster and a loaded model, served to one analyst.

    Parameters are those of :func:`terrasam.prompt` (model, raster reading, cleaning) plus
    ``amg`` (automatic mask generator options for "everything in view"), ``cache_mb`` (the
    embedding cache's memory bound), ``prefetch`` (embed the windows under the view in the
    background), ``basemap`` ("none", "osm" or "esri": shown under the raster; none by
    default, so the page needs no network) and, for text concepts (SAM 3),
    ``score_threshold``/``mask_threshold`` as in ``prompt``. ``adapter``: an already loaded
    model.
    """

    def __init__(self, raster, *, model=None, checkpoint=None, adapter=None, device="auto",
                 dtype="auto", compile=False, bands=None, nodata=None, scale="percentile",
                 simplify=None, min_area=None, fill_holes=None, amg=None, cache_mb=1024,
                 prefetch=True, basemap="none", score_threshold=0.5, mask_threshold=0.5,
                 backend="torch"):
        from terrasam.amg import AMGParams
        from terrasam.models.ref import ModelRef
        from terrasam.raster import open_raster
        from terrasam.vectorize import clean

        if basemap not in ("none", "osm", "esri"):
            raise TerrasamError(f"unknown base map {basemap!r}; choose one of none, osm, esri.")
        if not cache_mb or cache_mb <= 0:
            raise TerrasamError(f"the embedding cache needs a positive size, got {cache_mb} MB.")
        for name, value in (("score", score_threshold), ("mask", mask_threshold)):
            if not 0.0 <= value <= 1.0:
                raise TerrasamError(f"the {name} threshold must be between 0 and 1, got {value}.")
        self.text_thresholds = (float(score_threshold), float(mask_threshold))
        self.src = Path(raster).expanduser()
        self.options = {"bands": None if bands is None else list(bands), "nodata": nodata,
                        "scale": scale, "simplify": simplify, "min_area": min_area,
                        "fill_holes": fill_holes}
        self.basemap = basemap
        # the raw argument: open_raster keeps /vsi paths and URLs as GDAL needs them
        self._reader = open_raster(raster, bands=bands, nodata=nodata, scale=scale)
        self._reader.scaling  # noqa: B018 - global statistics once, shared by every thread
        if self._reader.crs is None:
            self._reader.close()
            raise TerrasamError(f"{self.src.name} has no CRS, so it cannot be placed on a web "
                                "map; give it one (gdal_edit.py -a_srs) to serve it.")
        clean(np.array([], dtype=object), simplify=simplify, min_area=min_area,
              fill_holes=fill_holes, crs=self._reader.crs, pixel_size=self._reader.res)
        self._local = threading.local()
        self.tiles = TileRenderer(self.reader, self._reader.width, self._reader.height,
                                  self._reader.transform, self._reader.crs)
        amg = {k: v for k, v in dict(amg or {}).items() if v is not None}
        self.ref = ModelRef.for_run(model, checkpoint, device=device, dtype=dtype,
                                    compile=compile, fast=bool(amg.get("fast")), adapter=adapter,
                                    backend=backend)
        self.adapter = self.ref.load()
        self.amg_params = AMGParams.for_family(self.adapter.family, **amg)
        self.amg_params.validate()
        self._model_lock = threading.RLock()
        self.model = _LockedModel(self.adapter, self._model_lock)
        self.embeddings = LRUCache(max_bytes=int(cache_mb * 2**20), max_items=1024)
        self.reads = LRUCache(max_items=READ_CACHE)
        self._state = threading.Lock()
        self.candidates: OrderedDict[int, Candidate] = OrderedDict()
        self.objects: OrderedDict[int, Candidate] = OrderedDict()
        self._next_candidate = 1
        self._next_object = 1
        self.stats = {"embeddings_computed": 0, "prompts": 0}
        self._prefetcher = _Prefetcher(self._warm) if prefetch else None

    # -- plumbing ---------------------------------------------------------------------------
    def reader(self):
        """This thread's RasterReader (a reader is not shared between threads)."""
        r = getattr(self._local, "reader", None)
        if r is None:
            r = self._local.reader = copy.copy(self._reader)  # reopens lazily, same scaling
        return r

    @property
    def width(self) -> int:
        return self._reader.width

    @property
    def height(self) -> int:
        return self._reader.height

    @property
    def crs(self):
        return self._reader.crs

    @property
    def image_size(self) -> int:
        return int(self.adapter.image_size)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.stop()
            self._prefetcher = None
        self.embeddings.clear()
        self.reads.clear()
        self._reader.close()

    def _read(self, window: tuple, out_shape: tuple, resampling="bilinear"):
        def read():
            rgb, valid = self.reader().read(window, out_shape=out_shape, resampling=resampling)
            return rgb, valid

        return self.reads.get_or_compute((window, out_shape, resampling), read)[0]

    def _read_plan(self, plan):
        return self._read((float(plan.col_off), float(plan.row_off), float(plan.width),
                           float(plan.height)), (plan.out_h, plan.out_w))

    def _embedder(self, counter: list):
        def embed(plan, rgb):
            value, computed = self.embeddings.get_or_compute(plan, lambda: self.model.embed(rgb))
            if computed:
                counter.append(plan)
                self.stats["embeddings_computed"] += 1
            return value

        return embed

    def _warm(self, plan) -> None:
        """Prefetch: the embedding of one window (skipped when it holds no data)."""
        if plan in self.embeddings or self.embeddings.pending(plan):
            return
        rgb, valid = self._read_plan(plan)
        if valid.any():
            self._embedder([])(plan, rgb)

    def _to_lonlat(self, geom):
        """For display: EPSG:4326, rounded to 1e-8 degrees (about a millimetre)."""
        t = transformer(self.crs, WGS84)
        return shapely.transform(
            geom, lambda xy: np.round(np.column_stack(t.transform(xy[:, 0], xy[:, 1])), 8))

    def _pixel_box(self, bounds):
        """Raster pixel box (c0, r0, c1, r1) of a lon/lat box, clamped; None when outside."""
        west, south, east, north = bounds
        ring = _ring(west, south, east, north, 16)
        xs, ys = transformer(WGS84, self.crs).transform(ring[:, 0], ring[:, 1], errcheck=False)
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        ok = np.isfinite(xs) & np.isfinite(ys)
        if not ok.any():
            return None
        cols, rows = ~self._reader.transform @ (xs[ok], ys[ok])
        c0, r0 = max(math.floor(np.min(cols)), 0), max(math.floor(np.min(rows)), 0)
        c1 = min(math.ceil(np.max(cols)), self.width)
        r1 = min(math.ceil(np.max(rows)), self.height)
        if c1 <= c0 or r1 <= r0:
            return None
        return c0, r0, c1, r1

    def _candidate(self, geom, prompt_type, prompt, prompt_crs, score,
                   stability=float("nan")) -> Candidate:
        with self._state:
            c = Candidate(self._next_candidate, geom, prompt_type, prompt, prompt_crs,
                          float(score), float(stability))
            self._next_candidate += 1
            self.candidates[c.id] = c
            while len(self.candidates) > MAX_CANDIDATES:
                self.candidates.popitem(last=False)
        return c

    def _clean(self, geoms):
        from terrasam.vectorize import clean

        o = self.options
        return clean(np.array(geoms, dtype=object), simplify=o["simplify"],
                     min_area=o["min_area"], fill_holes=o["fill_holes"], crs=self.crs,
                     pixel_size=self._reader.res)

    def feature(self, c: Candidate, kind: str = "candidate") -> dict:
        """A GeoJSON feature (EPSG:4326, for display) of a candidate or object."""
        from terrasam.vectorize import measure

        area, perimeter = measure(np.array([c.geometry], dtype=object), self.crs)
        return {"type": "Feature", "id": c.id,
                "geometry": shapely.geometry.mapping(self._to_lonlat(c.geometry)),
                "properties": {kind: c.id, "prompt_type": c.prompt_type, "prompt": c.prompt,
                               "score": round(c.score, 4), "area_m2": float(area[0]),
                               "perimeter_m": float(perimeter[0])}}

    # -- what the page asks --------------------------------------------------------------
    def info(self) -> dict:
        from terrasam.prompts.sources import _crs_text

        w, s, e, n = self.tiles.lonlat_bounds
        a = self.adapter
        return {"name": self.src.name, "width": self.width, "height": self.height,
                "crs": _crs_text(self.crs), "bounds": [[s, w], [n, e]],
                "native_zoom": self.tiles.native_zoom, "max_zoom": self.tiles.max_zoom,
                "model": a.model_id, "family": a.family, "image_size": self.image_size,
                "text": a.family == "sam3", "basemap": self.basemap,
                "limits": {"points": MAX_POINTS, "objects": MAX_OBJECTS, "text": MAX_TEXT,
                           "view_px": MAX_VIEW_PX}}

    def status(self) -> dict:
        return {"embeddings": self.embeddings.stats(),
                "prefetch_pending": self._prefetcher.pending if self._prefetcher else 0,
                "objects": len(self.objects), **self.stats}

    def segment(self, points, box=None) -> dict:
        """One object from points ``(lon, lat, label)`` and/or a box ``(w, s, e, n)``."""
        from terrasam.prompts import decode, sources, windows

        t0 = time.perf_counter()
        self.model.reset()
        points, box = list(points or []), box
        if not points and box is None:
            raise RequestError("give a point or a box.", "empty")
        if len(points) > MAX_POINTS:
            raise RequestError(f"at most {MAX_POINTS} points per object.", "too_many")
        if box is None and not any(int(p[2]) == 1 for p in points):
            raise RequestError("give a positive point or a box: negative points only refine "
                               "an object.", "negative_only")
        warnings: list[str] = []
        pts = [(float(x), float(y), int(label), "object") for x, y, label in points] or None
        bxs = [(*(float(v) for v in box), "object")] if box is not None else None
        prompts, negatives, report = sources.collect_prompts(
            pts, bxs, raster_crs=self.crs, transform=self._reader.transform, crs=WGS84,
            warn=warnings.append)
        live = windows.clip_prompts(prompts, self.width, self.height, report)
        if not live:  # the raster's bounds in lon/lat, and a hint when they look swapped
            raise RequestError(str(sources.outside_error(prompts, self._reader)), "outside")
        live, plans = windows.plan_windows(live, negatives, self.width, self.height,
                                           self.image_size, report)
        computed: list = []
        rows = decode.run_point_box(_WindowReads(self), self.model, live, plans, report,
                                    embed=self._embedder(computed), warn=warnings.append)
        self.stats["prompts"] += 1
        if report.nodata:
            raise RequestError("the prompt falls on nodata.", "nodata")
        geom = self._clean([r["geometry"] for r in rows])[0] if rows else None
        timing = {"total_s": round(time.perf_counter() - t0, 4),
                  "model_s": round(self.model.seconds(), 4),
                  "embeddings_computed": len(computed), "windows": len(set(plans.values()))}
        if geom is None or geom.is_empty:
            return {"feature": None, "message": "the model found no object there.",
                    "timing": timing, "warnings": warnings}
        r = rows[0]
        c = self._candidate(geom, r["prompt_type"], r["prompt"], r["prompt_crs"], r["score"],
                            r["stability_score"])
        return {"feature": self.feature(c), "timing": timing, "warnings": warnings}

    def _view(self, bounds, limit: int):
        """(rgb, valid, transform) of the view, read at most ``limit`` pixels a side."""
        box = self._pixel_box(bounds)
        if box is None:
            raise RequestError("the view does not overlap the raster.", "outside")
        c0, r0, c1, r1 = box
        w, h = c1 - c0, r1 - r0
        if max(w, h) > MAX_VIEW_PX:
            raise RequestError(f"zoom in: the view spans {w} x {h} raster pixels, at most "
                               f"{MAX_VIEW_PX} a side are segmented at once.", "too_large")
        f = max(max(w, h) / limit, 1.0)
        ow, oh = max(1, round(w / f)), max(1, round(h / f))
        rgb, valid = self.reader().read((c0, r0, w, h), out_shape=(oh, ow))
        if not valid.any():
            raise RequestError("the view holds only nodata.", "nodata")
        transform = self._reader.transform @ Affine.translation(c0, r0) @ Affine.scale(w / ow,
                                                                                       h / oh)
        return rgb, valid, transform

    def _records_to_features(self, records, transform, prompt_type, prompt) -> dict:
        from terrasam.vectorize import mask_to_geometry

        geoms, scores = [], []
        for rec in records:
            x0, y0 = rec.bbox[0], rec.bbox[1]
            g = mask_to_geometry(rec.mask, transform @ Affine.translation(x0, y0))
            if g is not None and not g.is_empty:
                geoms.append(g)
                scores.append(rec.predicted_iou)
        feats = []
        for g, s in zip(self._clean(geoms) if geoms else [], scores):
            if g is not None and not g.is_empty:
                feats.append(self.feature(self._candidate(g, prompt_type, prompt, "", s)))
        return {"type": "FeatureCollection", "features": feats}

    def everything(self, bounds) -> dict:
        """Every object the automatic mask generator finds in the view."""
        from terrasam.amg import AmgJob

        t0 = time.perf_counter()
        rgb, valid, transform = self._view(bounds, self.image_size)
        with self._model_lock:
            records = AmgJob(self.amg_params)(self.model, rgb, valid)
        out = self._records_to_features(records, transform, "auto", "auto")
        out["timing"] = {"total_s": round(time.perf_counter() - t0, 4)}
        return out

    def text(self, text: str, bounds) -> dict:
        """Every instance of a text concept in the view (SAM 3)."""
        from terrasam.text import TextJob

        text = str(text).strip()
        if not text:
            raise RequestError("a text prompt must not be empty.", "empty")
        if len(text) > MAX_TEXT:
            raise RequestError(f"a text prompt has at most {MAX_TEXT} characters.", "too_long")
        if self.adapter.family != "sam3":
            raise RequestError(f"model {self.adapter.model_id} does not take text prompts; "
                               "serve a SAM 3 checkpoint (--model sam3).", "no_text")
        t0 = time.perf_counter()
        rgb, valid, transform = self._view(bounds, self.image_size)
        with self._model_lock:
            records = TextJob((text,), *self.text_thresholds)(self.model, rgb, valid)
        out = self._records_to_features(records, transform, "text", text)
        out["timing"] = {"total_s": round(time.perf_counter() - t0, 4)}
        return out

    def prefetch(self, bounds) -> dict:
        """Embed the windows a click in this view would use, in the background."""
        from terrasam.prompts.windows import plan_window

        box = self._pixel_box(bounds)
        if box is None or self._prefetcher is None:
            return {"windows": 0}
        c0, r0, c1, r1 = box
        size = self.image_size
        if max(c1 - c0, r1 - r0) > PREFETCH_SPAN * size:
            return {"windows": 0, "reason": "zoomed out"}
        cx, cy = (c0 + c1) / 2, (r0 + r1) / 2
        spots = [(cx, cy)] + [(c0 + (c1 - c0) * (i + 0.5) / 3, r0 + (r1 - r0) * (j + 0.5) / 3)
                              for i in range(3) for j in range(3)]
        spots.sort(key=lambda p: math.hypot(p[0] - cx, p[1] - cy))
        plans: list = []
        for x, y in spots:
            plan = plan_window((x, y, x, y), self.width, self.height, size)
            if plan not in plans:
                plans.append(plan)
        plans = plans[:PREFETCH_WINDOWS]
        cached = sum(p in self.embeddings for p in plans)
        self._prefetcher.request([p for p in plans if p not in self.embeddings])
        return {"windows": len(plans), "cached": cached}

    def keep(self, candidate_ids) -> list[dict]:
        """Keep candidates as objects; returns their features (ids are the objects')."""
        ids = list(dict.fromkeys(int(i) for i in candidate_ids))
        with self._state:
            missing = [i for i in ids if i not in self.candidates]
            if missing:
                raise RequestError(f"unknown or expired result {missing[0]}; segment again.",
                                   "unknown", 404)
            if len(self.objects) + len(ids) > MAX_OBJECTS:
                raise RequestError(f"at most {MAX_OBJECTS} objects can be kept; export and "
                                   "delete some first.", "too_many")
            kept = []
            for i in ids:
                c = self.candidates.pop(i)
                obj = Candidate(self._next_object, c.geometry, c.prompt_type, c.prompt,
                                c.prompt_crs, c.score, c.stability)
                self._next_object += 1
                self.objects[obj.id] = obj
                kept.append(obj)
        return [self.feature(o, "object") for o in kept]

    def delete(self, object_id: int) -> None:
        with self._state:
            if self.objects.pop(int(object_id), None) is None:
                raise RequestError(f"there is no object {object_id}.", "unknown", 404)

    def object_features(self) -> dict:
        with self._state:
            objs = list(self.objects.values())
        return {"type": "FeatureCollection",
                "features": [self.feature(o, "object") for o in objs]}

    def frame(self):
        """The kept objects as a GeoDataFrame in the raster's CRS, columns as ``prompt``."""
        from terrasam.vectorize import to_frame

        with self._state:
            objs = list(self.objects.values())
        model_id = self.adapter.model_id
        columns = {"prompt_id": np.array([o.id for o in objs], dtype=np.int64),
                   "prompt_type": np.array([o.prompt_type for o in objs], dtype=object),
                   "prompt": np.array([o.prompt for o in objs], dtype=object),
                   "prompt_crs": np.array([o.prompt_crs for o in objs], dtype=object),
                   "score": np.array([o.score for o in objs], dtype=np.float64),
                   "predicted_iou": np.array([o.score for o in objs], dtype=np.float64),
                   "stability_score": np.array([o.stability for o in objs], np.float64),
                   "model": np.array([model_id] * len(objs), dtype=object)}
        return to_frame(np.array([o.geometry for o in objs], dtype=object), self.crs, columns)

    def provenance(self, objects: int) -> dict:
        from terrasam import io

        a, r, o = self.adapter, self._reader, self.options
        with self._state:
            types = sorted({c.prompt_type for c in self.objects.values()})
        return io.make_provenance(
            input=str(self.src), model=a.model_id, command="serve",
            checkpoint_path=a.checkpoint, checkpoint_sha256=a.checkpoint_sha256,
            bands=list(r.band_indexes), nodata=r.nodata, scale=o["scale"], crs=WGS84,
            prompt_types=types, multimask_all=False, parts="all",
            score_threshold=self.text_thresholds[0], mask_threshold=self.text_thresholds[1],
            simplify=o["simplify"],
            min_area=o["min_area"], fill_holes=o["fill_holes"], device=str(a.device),
            dtype=str(a.dtype), amg=asdict(self.amg_params) if "auto" in types else None,
            objects=objects)

    def export(self, fmt: str) -> tuple[bytes, str, str]:
        """(file bytes, file name, media type) of the kept objects in format ``fmt``."""
        from terrasam import io

        if fmt not in EXPORT_FORMATS:
            raise RequestError(f"unknown export format {fmt!r}; choose one of "
                               f"{', '.join(EXPORT_FORMATS)}.", "format")
        ext, media = EXPORT_FORMATS[fmt]
        frame = self.frame()
        if not len(frame):
            raise RequestError("no object is kept yet; keep one before exporting.", "empty")
        name = _safe_name(f"{self.src.stem}-objects") + ext
        with tempfile.TemporaryDirectory(prefix="terrasam-export-") as tmp:
            path = io.write_vectors(frame, Path(tmp) / name, self.provenance(len(frame)))
            data = path.read_bytes()
            sidecar = path.with_name(path.name + ".terrasam.json")
            if fmt == "geojson" and sidecar.exists():
                # one download: the provenance travels as a foreign member of the collection
                doc = json.loads(data)
                doc["terrasam"] = json.loads(sidecar.read_text(encoding="utf-8"))
                data = json.dumps(doc).encode("utf-8")
        return data, name, media
