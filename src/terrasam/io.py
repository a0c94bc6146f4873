"""Writing results: vector files, the label raster, and the provenance stored with them.

Every output is written under a temporary name in its own folder and renamed when complete,
so a failed run never leaves a half-written file. Provenance travels with the dataset:
GeoPackage layer metadata, GeoParquet key-value metadata (key ``terrasam``), GeoTIFF tags
(tag ``TERRASAM``), and a sidecar ``OUT.<ext>.terrasam.json`` for the other formats.

Shapefile field names are limited to 10 characters: terrasam's long names are written as
``perimeter_m`` → ``perim_m``, ``predicted_iou`` → ``pred_iou``, ``stability_score`` →
``stab_score``, ``stitched_from`` → ``stitched``; other long names are cut to 10 characters
(with a numeric suffix where two would collide). The mapping used is kept in the provenance
under ``output.field_names``. FlatGeobuf files get a spatial index, which stores features in
spatial (Hilbert) order rather than by id.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from terrasam.errors import TerrasamError

__all__ = [
    "VECTOR_FORMATS",
    "RASTER_FORMATS",
    "check_output",
    "check_crs_for",
    "temp_name",
    "remove_stale_temporaries",
    "write_failure",
    "write_vectors",
    "read_provenance",
    "make_provenance",
    "LabelRasterWriter",
    "SHAPEFILE_NAMES",
]

# extension -> GDAL/OGR driver ("GeoParquet" goes through geopandas/pyarrow, not OGR)
VECTOR_FORMATS = {
    ".gpkg": "GPKG",
    ".shp": "ESRI Shapefile",
    ".parquet": "GeoParquet",
    ".geojson": "GeoJSON",
    ".fgb": "FlatGeobuf",
    ".kml": "KML",
}
RASTER_FORMATS = {".tif": "GTiff", ".tiff": "GTiff"}

SHAPEFILE_NAMES = {
    "perimeter_m": "perim_m",
    "predicted_iou": "pred_iou",
    "stability_score": "stab_score",
    "stitched_from": "stitched",
    "compactness": "compact",
    "orientation": "orient",
}
_SHAPEFILE_PARTS = (".shp", ".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx")
_HASH_LIMIT = 256 * 1024**2  # inputs above this are identified by size + mtime
_PROVENANCE_KEY = "terrasam"
_TIFF_TAG = "TERRASAM"
# formats whose coordinates are WGS 84 by definition (RFC 7946, OGC KML)
WGS84_FORMATS = {"GeoJSON", "KML"}
# GeoPackage 1.2: what GDAL < 3.7 (QGIS LTR, Debian 12) opens without a warning
GPKG_VERSION = "1.2"


# --------------------------------------------------------------------------- output paths


def _vector_formats() -> dict[str, str]:
    formats = dict(VECTOR_FORMATS)
    try:
        import pyogrio

        if "KML" not in pyogrio.list_drivers(write=True):
            formats.pop(".kml")
    except ImportError:  # pragma: no cover
        formats.pop(".kml")
    return formats


_PICTURE_FORMATS = {"preview": {".png": "PNG"}, "map": {".html": "HTML", ".htm": "HTML"}}


def _supported(kind: str) -> dict[str, str]:
    if kind == "vector":
        return _vector_formats()
    if kind == "raster":
        return dict(RASTER_FORMATS)
    if kind in _PICTURE_FORMATS:
        return dict(_PICTURE_FORMATS[kind])
    raise ValueError(f"kind must be 'vector', 'raster', 'preview' or 'map', not {kind!r}")


def _check_path(path, kind: str) -> Path:
    """Extension and folder checks of one output path (existence aside)."""
    out = Path(path).expanduser()
    formats = _supported(kind)
    ext = out.suffix.lower()
    if not ext and kind == "vector":  # GeoPackage, the documented default
        if out.is_dir():
            raise TerrasamError(f"{path} is a folder; give a file name such as "
                                f"{out / 'objects.gpkg'}")
        out, ext = out.with_name(out.name + ".gpkg"), ".gpkg"
    if ext not in formats:
        if kind in _PICTURE_FORMATS:
            raise TerrasamError(f"{path} must end with {' or '.join(formats)}")
        shown = f"'{ext}'" if ext else f"'{out.name}' (no extension)"
        raise TerrasamError(
            f"unsupported output format {shown}; use one of {', '.join(formats)}"
        )
    if out.is_dir():
        raise TerrasamError(f"{path} is a folder; give a file name such as {out / 'objects'}{ext}")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        if folder.exists():
            raise TerrasamError(f"{folder} is a file, not a folder: {path} cannot be written")
        raise TerrasamError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TerrasamError(f"cannot write to folder {folder}")
    return out


def check_output(path, overwrite: bool = False, kind: str = "vector") -> Path:
    """Validate an output path before the long work starts; returns it as a Path.

    Raises TerrasamError when the extension is not a supported format, when the file exists
    and ``overwrite`` is false, or when its folder is missing or not writable. ``kind`` is
    "vector" (default), "raster" (the label GeoTIFF), "preview" (.png) or "map" (.html).
    """
    out = _check_path(path, kind)
    if out.exists() and not overwrite:
        raise TerrasamError(f"{path} exists; use --overwrite to replace it")
    return out


def check_outputs(outputs: Mapping, overwrite: bool = False, input=None) -> dict:
    """Validate every output of a run at once: ``{kind: path or None}`` -> ``{kind: Path}``.

    Formats and folders as :func:`check_output`; all outputs that exist (without
    ``overwrite``) are named in one message; no output may be the input or another output.
    """
    paths = {kind: _check_path(p, kind) for kind, p in outputs.items() if p is not None}
    existing = [str(outputs[k]) if Path(outputs[k]).expanduser() == p else str(p)
                for k, p in paths.items() if p.exists() and not overwrite]
    if existing:
        verb = "exists" if len(existing) == 1 else "exist"
        them = "it" if len(existing) == 1 else "them"
        raise TerrasamError(f"{', '.join(existing)} {verb}; use --overwrite to replace {them}")
    from terrasam.raster import is_local_path

    # a virtual path or URL (/vsizip/..., https://...) is never one of the local outputs
    src = Path(input).expanduser() if input is not None and is_local_path(input) else None
    seen: dict = {}
    for kind, p in paths.items():
        if src is not None and src.exists() and p.exists() and os.path.samefile(src, p):
            raise TerrasamError(f"the output {p} is the input raster")
        key = p.resolve()
        if key in seen:
            raise TerrasamError(f"the {kind} output and the {seen[key]} output are the same "
                                f"file ({p})")
        seen[key] = kind
    return paths


def check_crs_for(outputs: Mapping, crs, transform=None, warn=None) -> None:
    """Refuse outputs whose format fixes the CRS (GeoJSON, KML: WGS 84) when the raster has
    no CRS; warn (``warn(message)``) when it has no georeferencing at all (pixel coordinates).

    ``outputs`` maps kinds to paths as in :func:`check_outputs`; call it before the model
    loads.
    """
    vector = outputs.get("vector")
    if vector is None or crs is not None:
        return
    driver = _vector_formats().get(Path(vector).suffix.lower())
    if driver in WGS84_FORMATS:
        name = "GeoJSON" if driver == "GeoJSON" else "KML"
        raise TerrasamError(
            f"the raster has no CRS, so its objects cannot be written as {name} (always WGS 84);"
            " write .gpkg, .shp, .parquet or .fgb instead, or give the raster a CRS")
    if warn is not None and (transform is None or transform.is_identity):
        warn("the raster has no georeferencing: the objects are in pixel coordinates "
             "(column, row) with no CRS")


_TEMP = re.compile(r"^\.(?P<stem>.+)\.tmp-(?P<pid>[0-9]+)-[0-9a-f]{8}")


def temp_name(out: Path, suffix: str | None = None) -> Path:
    """The hidden name ``.{stem}.tmp-{pid}-{random}{suffix}`` beside ``out`` under which every
    file (or folder) terrasam writes waits until it is renamed to ``out``.

    ``suffix`` defaults to ``out``'s extension. The pid lets a later run recognise the
    leftovers of a killed one (:func:`remove_stale_temporaries`).
    """
    suffix = out.suffix if suffix is None else suffix
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")
    _ISSUED.add(tmp)
    return tmp


_ISSUED: set[Path] = set()  # every temporary name handed out by this process


def remove_own_temporaries() -> None:
    """Remove whatever of this process's temporaries still exists (a forced exit's cleanup:
    a renamed temporary no longer exists under its name, so finished outputs are kept)."""
    for folder in {p.parent for p in list(_ISSUED)}:
        # the issued names and what grew beside them (SQLite journals of a staged GeoPackage)
        with contextlib.suppress(OSError):
            for p in folder.glob(f".*.tmp-{os.getpid()}-*"):
                with contextlib.suppress(OSError):
                    _remove(p)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def remove_stale_temporaries(out) -> list[Path]:
    """Remove the temporaries of ``out`` (and of its sidecar) left by processes that are no
    longer alive, e.g. a run killed with SIGKILL; returns what was removed."""
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    stems = {out.stem, _sidecar(out).stem}
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.match(p.name)
        if m and m["stem"] in stems and not _alive(int(m["pid"])):
            with contextlib.suppress(OSError):
                _remove(p)
                removed.append(p)
    return removed


_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_FULL_TEXT = ("no space left", "database or disk is full", "file too large", "disk quota",
              "disk full")


def _is_disk_full(exc: BaseException, out: Path) -> bool:
    """Whether a failed write of ``out`` failed for want of space (or of file size)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(t in str(e).lower() for t in _FULL_TEXT):
            return True
        todo += [e.__cause__, e.__context__]
    return _no_room(out)


def _no_room(out: Path) -> bool:
    """Probe the folder: one byte past the size of this process's largest temporary there.

    GDAL and SQLite often report a full disk (or an exceeded file size limit) as "disk I/O
    error", "Write error" or worse; a sparse one-byte write tells which it was, cheaply.
    """
    folder = out.parent if str(out.parent) else Path(".")
    sizes = [0]
    with contextlib.suppress(OSError):
        for p in folder.glob(f".*.tmp-{os.getpid()}-*"):
            with contextlib.suppress(OSError):
                if p.is_file():
                    sizes.append(p.stat().st_size)
    probe = temp_name(out, ".probe")
    try:
        with open(probe, "wb") as f:
            f.seek(max(sizes) + (1 << 20))
            f.write(b"\0")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc.errno in _FULL_ERRNOS
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return False


def write_failure(out: Path, exc: BaseException, verb: str = "write") -> TerrasamError:
    """The one sentence of a failed write: "disk full while writing OUT" when it is that."""
    if _is_disk_full(exc, out):
        return TerrasamError(f"disk full while writing {out}")
    return TerrasamError(f"could not {verb} {out}: {_first_line(exc)}")


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".terrasam.json")


def _json(provenance: Mapping) -> str:
    return json.dumps(_jsonable(provenance), indent=1, sort_keys=False)


def _jsonable(value):
    """Plain JSON types from parameters (paths, tuples, numpy scalars, dataclasses, ...)."""
    import dataclasses

    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = temp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        _remove(tmp)


# --------------------------------------------------------------------------- vectors


def _shapefile_columns(columns) -> dict[str, str]:
    """Long column names mapped to unique names of at most 10 characters."""
    mapping: dict[str, str] = {}
    used = {c for c in columns if len(c) <= 10}
    for column in columns:
        if len(column) <= 10:
            continue
        name = SHAPEFILE_NAMES.get(column, column[:10])
        n = 1
        while name in used:
            suffix = f"_{n}"
            name = column[: 10 - len(suffix)] + suffix
            n += 1
        used.add(name)
        mapping[column] = name
    return mapping


def _write_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    with contextlib.suppress(ImportError):
        import pyogrio.errors as pe

        errors += [pe.DataSourceError, pe.DataLayerError, pe.FieldError, pe.GeometryError,
                   pe.CRSError]
    with contextlib.suppress(ImportError):
        import pyarrow

        errors.append(pyarrow.ArrowException)
    return tuple(errors)


@contextlib.contextmanager
def _no_pam():
    """No GDAL .aux.xml sidecars beside outputs while pyogrio reads or writes them (nor
    pyogrio's warning of a missing CRS: :func:`check_crs_for` has said it once)."""
    import warnings

    import pyogrio

    old = pyogrio.get_gdal_config_option("GDAL_PAM_ENABLED")
    pyogrio.set_gdal_config_options({"GDAL_PAM_ENABLED": "NO"})
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="'crs' was not provided")
            yield
    finally:
        pyogrio.set_gdal_config_options({"GDAL_PAM_ENABLED": old})


class VectorWriter:
    """Streams GeoDataFrame batches into a vector output; the output appears only when done.

    Batches are appended to a hidden staging GeoPackage beside the output (buffered to
    ``batch_rows`` rows), so memory stays flat in the number of features. :meth:`close`
    stores the provenance and moves the result into place: the staging file itself for a
    GeoPackage; for other formats it is streamed (Arrow batches) into the final format under
    a temporary name, then renamed. While open, :meth:`read` reads back what was written
    within a box (the label raster is burned from it). On an exception (``with`` block) or
    :meth:`abort` nothing is left behind.
    """

    def __init__(self, path, *, overwrite: bool = False, batch_rows: int = 5000):
        self.out = check_output(path, overwrite)
        self.overwrite = overwrite
        self.driver = _vector_formats()[self.out.suffix.lower()]
        self.layer = self.out.stem
        self.batch_rows = int(batch_rows)
        self.features = 0
        self.crs = None
        remove_stale_temporaries(self.out)
        self._stage = temp_name(self.out, ".stage.gpkg")
        self._buffer: list = []
        self._buffered = 0
        self._schema = None  # an empty frame with the columns, for an output with no rows
        self._staged = False
        self._closed = False
        self._types: set = set()  # geometry types and bounds written, for GeoParquet
        self._bounds = None
        self._layer_type = "MultiPolygon"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False

    def write(self, gdf) -> None:
        """Append a batch of features (the same columns every time)."""
        if self._closed:
            raise ValueError("the vector output is already closed")
        if self._schema is None:
            if gdf.crs is None and self.driver in WGS84_FORMATS:
                self.abort()
                raise TerrasamError(f"{self.out} cannot be written without a CRS: the format "
                                    "is always WGS 84")
            self._schema = gdf.iloc[:0]
            self.crs = gdf.crs
        if len(gdf):
            self._buffer.append(gdf)
            self._buffered += len(gdf)
            if self._buffered >= self.batch_rows:
                self.flush()

    def flush(self) -> None:
        """Append the buffered batches to the staging file."""
        if not self._buffer:
            return
        import pandas as pd
        import pyogrio

        batch = (self._buffer[0] if len(self._buffer) == 1
                 else pd.concat(self._buffer, ignore_index=True))
        self._buffer, self._buffered = [], 0
        polygonal = bool(batch.geometry.geom_type.isin(["Polygon", "MultiPolygon"]).all())
        if not self._staged:
            self._layer_type = "MultiPolygon" if polygonal else "Unknown"
        # one geometry type for the whole layer, whatever mix a batch holds (GIS programs,
        # Shapefile and FlatGeobuf want one): polygons are written as multipolygons
        promote = polygonal and self._layer_type == "MultiPolygon"
        self._stage_write(lambda: pyogrio.write_dataframe(
            batch, self._stage, layer=self.layer, driver="GPKG", append=self._staged,
            geometry_type=self._layer_type, promote_to_multi=promote,
            **({} if self._staged else {"dataset_options": {"VERSION": GPKG_VERSION}})))
        self._staged = True
        self.features += len(batch)
        geoms = batch.geometry.values
        self._types.update(["MultiPolygon"] if promote else [t for t in geoms.geom_type if t])
        if len(batch):
            b = geoms.total_bounds
            self._bounds = b if self._bounds is None else np.concatenate(
                [np.minimum(self._bounds[:2], b[:2]), np.maximum(self._bounds[2:], b[2:])])

    def _stage_write(self, write) -> None:
        try:
            with _no_pam():
                write()
        except _write_errors() as exc:
            failure = write_failure(self.out, exc)
            self.abort()
            raise failure from exc

    def read(self, bbox=None, columns=None):
        """The features written so far (within ``bbox`` in the output CRS), as a GeoDataFrame."""
        import pyogrio

        self.flush()
        if not self._staged:
            return self._schema if columns is None else self._schema[[*columns, "geometry"]]
        with _no_pam():
            return pyogrio.read_dataframe(self._stage, layer=self.layer, bbox=bbox,
                                          columns=columns)

    def close(self, provenance: Mapping | None = None) -> Path:
        """Store ``provenance`` and put the output in place; returns its path."""
        import pyogrio

        if self._closed:
            return self.out
        self.flush()
        if not self._staged:  # no feature at all: an empty layer with the columns
            if self._schema is None:
                raise ValueError("nothing was written to the vector output")
            self._stage_write(lambda: pyogrio.write_dataframe(
                self._schema, self._stage, layer=self.layer, driver="GPKG",
                geometry_type="MultiPolygon", dataset_options={"VERSION": GPKG_VERSION}))
            self._staged = True
        provenance = dict(_jsonable(provenance or {}))
        output_info = {"format": self.driver, "features": int(self.features)}
        mapping = {}
        if self.driver == "ESRI Shapefile":
            mapping = _shapefile_columns([c for c in self._schema.columns
                                          if c != self._schema.geometry.name])
            if mapping:
                output_info["field_names"] = mapping
        if self.crs is not None:
            output_info["crs"] = ("EPSG:4326" if self._to_wgs84()
                                  else self.crs.to_string())
            output_info["crs_wkt"] = (_wgs84().to_wkt() if self._to_wgs84()
                                      else self.crs.to_wkt())
            output_info["source_crs_wkt"] = self.crs.to_wkt()
        provenance["output"] = output_info
        text = _json(provenance)
        try:
            with _no_pam():
                if self.driver == "GPKG":
                    # an empty append only to store the metadata; layer metadata, since GDAL
                    # copies dataset metadata into an .aux.xml beside the file on every read
                    pyogrio.write_dataframe(self._schema, self._stage, layer=self.layer,
                                            driver="GPKG", append=True,
                                            layer_metadata={_PROVENANCE_KEY: text})
                    os.replace(self._stage, self.out)
                elif self.driver == "ESRI Shapefile":
                    _write_shapefile(self.out, text, lambda tmp: self._convert(tmp, mapping))
                elif self.driver == "GeoParquet":
                    _write_replacing(self.out, lambda tmp: self._to_parquet(tmp, text))
                else:
                    _write_replacing(self.out, self._convert)
                    _write_text_atomic(_sidecar(self.out), text)
        except _write_errors() as exc:
            raise write_failure(self.out, exc) from exc
        finally:
            self.abort()
        return self.out

    def _to_wgs84(self) -> bool:
        """Whether this format needs the features reprojected to WGS 84."""
        return (self.driver in WGS84_FORMATS and self.crs is not None
                and not self.crs.equals("EPSG:4326"))

    def abort(self) -> None:
        """Discard everything written so far."""
        self._closed = True
        self._buffer = []
        _remove(self._stage)

    def _batches(self, rename=None):
        """The staged features as Arrow record batches (geometry as WKB)."""
        import pyarrow as pa
        from pyogrio import open_arrow

        with open_arrow(self._stage, layer=self.layer, use_pyarrow=True,
                        batch_size=self.batch_rows) as (meta, reader):
            geometry = meta["geometry_name"] or "geometry"
            for batch in reader:
                if rename:
                    names = [rename.get(n, n) for n in batch.schema.names]
                    batch = pa.RecordBatch.from_arrays(batch.columns, names=names)
                yield geometry, batch

    def _convert(self, tmp: Path, rename=None) -> None:
        """Stream the staged features into ``tmp`` in the output's format."""
        import pyarrow as pa
        import pyogrio

        crs = self.crs
        to_wgs84 = self._to_wgs84()
        # RFC 7946: WGS 84 lon/lat, no "crs" member, right-hand rings
        options = {"layer_options": {"RFC7946": "YES"}} if self.driver == "GeoJSON" else {}
        batches = self._batches(rename)
        first = next(batches, None)
        if first is None:  # no row: an empty layer with the columns
            empty = self._schema.rename(columns=rename or {})
            if to_wgs84:
                empty = empty.to_crs("EPSG:4326")
            pyogrio.write_dataframe(empty, tmp, layer=self.layer, driver=self.driver,
                                    geometry_type="MultiPolygon", **options)
            return
        geometry, schema = first[0], first[1].schema

        def stream():
            for _, batch in [first, *batches]:
                if to_wgs84:  # KML and GeoJSON are WGS 84 by definition
                    batch = _reproject_wkb(batch, geometry, crs, "EPSG:4326")
                yield batch

        reader = pa.RecordBatchReader.from_batches(schema, stream())
        pyogrio.write_arrow(reader, tmp, layer=self.layer, driver=self.driver,
                            geometry_name=geometry, geometry_type=self._layer_type,
                            crs="EPSG:4326" if to_wgs84 else _crs_wkt(crs), **options)

    def _to_parquet(self, tmp: Path, provenance_json: str) -> None:
        """GeoParquet 1.0 (WKB geometry, PROJJSON CRS), written batch by batch."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = sorted(self._types) or (["MultiPolygon"] if self._layer_type == "MultiPolygon"
                                        else [])
        column = {"encoding": "WKB", "geometry_types": types}
        if self.crs is not None:
            column["crs"] = self.crs.to_json_dict()
        if self._bounds is not None:
            column["bbox"] = [float(v) for v in self._bounds]
        geo = {"version": "1.0.0", "primary_column": "geometry", "columns": {"geometry": column}}
        metadata = {"geo": json.dumps(geo), _PROVENANCE_KEY: provenance_json}
        writer = None
        try:
            for geometry, batch in self._batches():
                names = ["geometry" if n == geometry else n for n in batch.schema.names]
                fields = [pa.field(n, c.type) for n, c in zip(names, batch.columns)]
                schema = pa.schema(fields, metadata=metadata)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, schema)
                writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=schema))
            if writer is None:  # no row: the columns of an empty frame
                table = pa.Table.from_pandas(self._schema.to_wkb(), preserve_index=False)
                writer = pq.ParquetWriter(tmp, table.schema.with_metadata(metadata))
        finally:
            if writer is not None:
                writer.close()


def _crs_wkt(crs):
    return None if crs is None else crs.to_wkt()


def _wgs84():
    from pyproj import CRS

    return CRS.from_epsg(4326)


def _reproject_wkb(batch, geometry: str, src, dst):
    import pyarrow as pa
    import shapely
    from pyproj import Transformer

    t = Transformer.from_crs(src, dst, always_xy=True)
    i = batch.schema.get_field_index(geometry)
    geoms = shapely.from_wkb(np.asarray(batch.column(i)))
    geoms = shapely.transform(geoms, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))
    column = pa.array(shapely.to_wkb(geoms), type=batch.schema.field(i).type)
    return batch.set_column(i, batch.schema.field(i), column)


def write_vectors(gdf, path, provenance: Mapping, overwrite: bool = False) -> Path:
    """Write a GeoDataFrame in the format of ``path``'s extension, atomically, with provenance.

    The CRS is always written. An existing output is refused unless ``overwrite``. Returns the
    path written. (One batch through :class:`VectorWriter`.)
    """
    with VectorWriter(path, overwrite=overwrite) as writer:
        writer.write(gdf)
        return writer.close(provenance)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _write_replacing(out: Path, write) -> None:
    tmp = temp_name(out)
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        _remove(tmp)


def _write_shapefile(out: Path, provenance_json: str, write) -> None:
    """A shapefile is several files: ``write(tmp)`` them in a temporary folder, then move
    them all."""
    tmp_dir = temp_name(out, "")
    tmp_dir.mkdir()
    try:
        tmp = tmp_dir / out.name
        write(tmp)
        parts = {p.suffix.lower(): p for p in tmp_dir.iterdir()}
        (tmp_dir / "sidecar").write_text(provenance_json, encoding="utf-8")
        for ext in _SHAPEFILE_PARTS:  # parts of an older shapefile that this one lacks
            if ext not in parts:
                _remove(out.with_suffix(ext))
        # The .shp goes last: until it is in place no reader sees a new shapefile.
        for ext, part in sorted(parts.items(), key=lambda item: item[0] == ".shp"):
            if ext != ".shp":
                os.replace(part, out.with_suffix(ext))
        os.replace(tmp_dir / "sidecar", _sidecar(out))
        os.replace(parts[".shp"], out)
    finally:
        _remove(tmp_dir)


# --------------------------------------------------------------------------- provenance


def read_provenance(path) -> dict:
    """The provenance terrasam stored with an output (any vector format or the label GeoTIFF)."""
    out = Path(path).expanduser()
    if not out.exists():
        raise TerrasamError(f"{path} does not exist")
    ext = out.suffix.lower()
    text = None
    try:
        if ext == ".gpkg":
            import pyogrio

            with _no_pam():
                info = pyogrio.read_info(out)
            text = ((info.get("layer_metadata") or {}).get(_PROVENANCE_KEY)
                    or (info.get("dataset_metadata") or {}).get(_PROVENANCE_KEY))
        elif ext == ".parquet":
            import pyarrow.parquet as pq

            metadata = pq.read_schema(out).metadata or {}
            value = metadata.get(_PROVENANCE_KEY.encode())
            text = value.decode() if value is not None else None
        elif ext in RASTER_FORMATS:
            import rasterio

            with rasterio.open(out) as src:
                text = src.tags().get(_TIFF_TAG)
        if text is None and _sidecar(out).exists():
            text = _sidecar(out).read_text(encoding="utf-8")
    except _write_errors() + (_rasterio_error(),) as exc:
        raise TerrasamError(f"cannot read {path}: {_first_line(exc)}") from exc
    if text is None:
        raise TerrasamError(f"{path} holds no terrasam provenance")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TerrasamError(f"the terrasam provenance in {path} is not valid JSON") from exc


def _rasterio_error():
    from rasterio.errors import RasterioError

    return RasterioError


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_identity(path, always_hash: bool = False) -> dict:
    """Name plus sha256 of a file (or size + mtime for big files); folders hash their files.

    A raster that is not a local file (URL, /vsi path) is never stat'ed or hashed (a
    pathlib stat would fold its slashes, a hash would download it): its name and path string.
    """
    from terrasam.raster import is_local_path

    if not is_local_path(path):
        return {"name": str(path).rstrip("/").rsplit("/", 1)[-1], "location": str(path)}
    p = Path(path).expanduser()
    entry: dict = {"name": p.name}
    if p.is_file():
        stat = p.stat()
        entry["size"] = stat.st_size
        if always_hash or stat.st_size <= _HASH_LIMIT:
            entry["sha256"] = _sha256(p)
        else:
            entry["mtime"] = _dt.datetime.fromtimestamp(stat.st_mtime, _dt.timezone.utc).isoformat()
    elif p.is_dir():  # a Hugging Face model folder: one digest over its files' digests
        digest = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            digest.update(f"{f.relative_to(p).as_posix()}:{_sha256(f)}\n".encode())
        entry["sha256"] = digest.hexdigest()
    else:
        entry["location"] = str(path)  # not a local file (URL, /vsi path): name only
    return entry


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "numpy", "rasterio", "shapely", "pyogrio", "pyproj"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    with contextlib.suppress(ImportError):
        import rasterio

        versions["gdal"] = rasterio.__gdal_version__
    return versions


def make_provenance(*, input=None, model=None, checkpoint=None, **params) -> dict:
    """The run's provenance: terrasam version, UTC time, input identity, model, parameters.

    ``input`` is the raster path (or a list of them), ``model`` the model id and
    ``checkpoint`` a local weights file or folder (hashed with sha256); every other keyword
    is recorded under ``parameters``.
    """
    from terrasam import __version__

    provenance: dict = {
        "terrasam": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if input is not None:
        if isinstance(input, (list, tuple)):
            provenance["input"] = [_file_identity(p) for p in input]
        else:
            provenance["input"] = _file_identity(input)
    if model is not None:
        provenance["model"] = str(model)
    if checkpoint is not None:
        provenance["checkpoint"] = _file_identity(checkpoint, always_hash=True)
    provenance["parameters"] = _jsonable(params)
    provenance["software"] = _versions()
    return provenance


# --------------------------------------------------------------------------- label raster

LABEL_BLOCK = 1024  # label raster burned in blocks of this many pixels a side


def write_label_raster(path, source: VectorWriter, width: int, height: int, transform, crs, *,
                       overwrite: bool = False, provenance=None, block: int = LABEL_BLOCK,
                       commit: bool = True):
    """Burn the features written to ``source`` (column ``id``) into a label COG, block by block.

    Each block reads back only the features whose box meets it, so no step holds every
    geometry. Where objects overlap, the smaller one is on top. Returns the path; with
    ``commit=False`` the finished raster waits under its temporary name and the
    :class:`LabelRasterWriter` is returned: ``commit()`` it once the vectors are in place,
    or ``abort()`` it.
    """
    import shapely
    from affine import Affine
    from rasterio import features

    writer = LabelRasterWriter(path, width, height, transform, crs, dtype="uint32",
                               overwrite=overwrite, provenance=provenance)
    with writer.pending() if not commit else writer:
        for r0 in range(0, height, block):
            h = min(block, height - r0)
            for c0 in range(0, width, block):
                w = min(block, width - c0)
                at = transform @ Affine.translation(c0, r0)
                xs, ys = zip(*(at @ (c, r) for c, r in ((0, 0), (w, 0), (w, h), (0, h))))
                found = source.read(bbox=(min(xs), min(ys), max(xs), max(ys)), columns=["id"])
                out = np.zeros((h, w), np.uint32)
                if len(found):
                    geoms = found.geometry.values
                    order = np.argsort(-shapely.area(np.asarray(geoms)), kind="stable")
                    ids = found["id"].to_numpy(np.int64)[order]
                    features.rasterize(zip(np.asarray(geoms)[order], ids.tolist()), out=out,
                                       transform=at)
                writer.write(out, (c0, r0, w, h))
    return Path(path) if commit else writer


_LABEL_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32}


def _has_cog_driver() -> bool:
    import rasterio

    with rasterio.Env() as env:
        return "COG" in env.drivers()


class LabelRasterWriter:
    """A label raster written window by window, finished as a tiled, compressed COG.

    Use as a context manager: ``with LabelRasterWriter(...) as w: w.write(labels, window)``.
    Pixels never written are 0 (nodata). On a clean exit the raster is converted to COG
    layout (512 px blocks, deflate + predictor, nearest-neighbour overviews) and renamed into
    place; on an exception nothing is left behind.
    """

    def __init__(self, path, width, height, transform, crs, dtype="uint32", overwrite=False,
                 provenance=None):
        import rasterio

        self.path = check_output(path, overwrite, kind="raster")
        if str(dtype) not in _LABEL_DTYPES:
            raise TerrasamError(
                f"label raster type must be one of {', '.join(_LABEL_DTYPES)}, not {dtype}"
            )
        self.dtype = str(dtype)
        self.width, self.height = int(width), int(height)
        self._provenance = provenance
        remove_stale_temporaries(self.path)
        self._tmp = temp_name(self.path)
        self._finished = None  # the finished COG waiting for commit()
        self._closed = False
        profile = {
            "driver": "GTiff", "width": self.width, "height": self.height, "count": 1,
            "dtype": self.dtype, "crs": crs, "transform": transform, "nodata": 0,
            "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate",
            "predictor": 2, "BIGTIFF": "IF_SAFER",
        }
        try:
            self._dataset = rasterio.open(self._tmp, "w", **profile)
        except (rasterio.errors.RasterioError, OSError) as exc:
            _remove(self._tmp)
            raise write_failure(self.path, exc, "create") from exc

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    @contextlib.contextmanager
    def pending(self):
        """Like ``with writer:``, but a clean exit leaves the finished raster uncommitted."""
        try:
            yield self
        except BaseException:
            self.abort()
            raise
        self.close(commit=False)

    def write(self, array, window) -> None:
        """Write labels (2-D integers, 0 = none) into ``window`` (a Window or col, row, w, h)."""
        from rasterio.windows import Window

        if self._closed:
            raise ValueError("the label raster is already closed")
        if not isinstance(window, Window):
            window = Window(*window)
        array = np.asarray(array)
        if array.shape != (int(window.height), int(window.width)):
            raise ValueError(f"array shape {array.shape} does not match window {window}")
        if array.size:
            info = np.iinfo(_LABEL_DTYPES[self.dtype])
            lo, hi = int(array.min()), int(array.max())
            if lo < 0 or hi > info.max:
                raise TerrasamError(
                    f"label {hi if hi > info.max else lo} does not fit a {self.dtype} label "
                    "raster; choose a larger type"
                )
        import rasterio

        try:
            self._dataset.write(array.astype(self.dtype, copy=False), 1, window=window)
        except (rasterio.errors.RasterioError, OSError) as exc:
            failure = write_failure(self.path, exc)
            self.abort()
            raise failure from exc

    def close(self, commit: bool = True) -> Path:
        """Finish: convert to COG layout, store provenance, rename into place (with
        ``commit=False`` only finish: :meth:`commit` renames)."""
        if self._closed:
            return self.path
        import rasterio
        import rasterio.shutil

        cog_tmp = temp_name(self.path)
        try:
            if self._provenance is not None:
                self._dataset.update_tags(**{_TIFF_TAG: _json(self._provenance)})
            self._dataset.close()
            options = {"compress": "DEFLATE", "predictor": "YES", "blocksize": 512,
                       "BIGTIFF": "IF_SAFER", "overview_resampling": "NEAREST",
                       "resampling": "NEAREST"}
            if _has_cog_driver():
                rasterio.shutil.copy(self._tmp, cog_tmp, driver="COG", **options)
            else:
                self._copy_tiled_with_overviews(cog_tmp)
            if commit:
                os.replace(cog_tmp, self.path)
            else:
                self._finished, cog_tmp = cog_tmp, None
        except (rasterio.errors.RasterioError, OSError) as exc:
            raise write_failure(self.path, exc) from exc
        finally:
            self._closed = True
            if cog_tmp is not None:
                _remove(cog_tmp)
            _remove(self._tmp)
        return self.path

    def commit(self) -> Path:
        """Rename the raster finished by ``close(commit=False)`` into place."""
        if self._finished is not None:
            try:
                os.replace(self._finished, self.path)
            except OSError as exc:
                self.abort()
                raise write_failure(self.path, exc) from exc
            self._finished = None
        return self.path

    def _copy_tiled_with_overviews(self, dest: Path) -> None:
        """COG-like layout for GDAL < 3.1: overviews built first, copied with the source's."""
        import rasterio
        import rasterio.shutil
        from rasterio.enums import Resampling

        with rasterio.open(self._tmp, "r+") as ds:
            factors, size = [], max(ds.width, ds.height)
            while size > 512:
                factors.append(2 ** (len(factors) + 1))
                size //= 2
            if factors:
                ds.build_overviews(factors, Resampling.nearest)
        rasterio.shutil.copy(
            self._tmp, dest, driver="GTiff", tiled=True, blockxsize=512, blockysize=512,
            compress="deflate", predictor=2, COPY_SRC_OVERVIEWS="YES", BIGTIFF="IF_SAFER",
        )

    def abort(self) -> None:
        """Discard everything written so far."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                self._dataset.close()
        _remove(self._tmp)
        if self._finished is not None:
            _remove(self._finished)
            self._finished = None
