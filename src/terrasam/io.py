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
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from terrasam.errors import TerrasamError

__all__ = [
    "VECTOR_FORMATS",
    "RASTER_FORMATS",
    "check_output",
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
    existing = [str(outputs[k]) for k, p in paths.items() if p.exists() and not overwrite]
    if existing:
        verb = "exists" if len(existing) == 1 else "exist"
        them = "it" if len(existing) == 1 else "them"
        raise TerrasamError(f"{', '.join(existing)} {verb}; use --overwrite to replace {them}")
    src = Path(input).expanduser() if input is not None else None
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


def _temp_name(out: Path) -> Path:
    """A hidden temporary name beside ``out`` that keeps its extension."""
    return out.with_name(f".{out.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{out.suffix}")


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
    tmp = _temp_name(path)
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
    """No GDAL .aux.xml sidecars beside outputs while pyogrio reads or writes them."""
    import pyogrio

    old = pyogrio.get_gdal_config_option("GDAL_PAM_ENABLED")
    pyogrio.set_gdal_config_options({"GDAL_PAM_ENABLED": "NO"})
    try:
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
        self._stage = self.out.with_name(
            f".{self.out.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.stage.gpkg")
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
            geometry_type=self._layer_type, promote_to_multi=promote))
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
            self.abort()
            raise TerrasamError(f"could not write {self.out}: {_first_line(exc)}") from exc

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
                geometry_type="MultiPolygon"))
            self._staged = True
        provenance = dict(_jsonable(provenance or {}))
        output_info = {"format": self.driver, "features": int(self.features)}
        mapping = {}
        if self.driver == "ESRI Shapefile":
            mapping = _shapefile_columns([c for c in self._schema.columns
                                          if c != self._schema.geometry.name])
            if mapping:
                output_info["field_names"] = mapping
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
            raise TerrasamError(f"could not write {self.out}: {_first_line(exc)}") from exc
        finally:
            self.abort()
        return self.out

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
        to_wgs84 = self.driver == "KML" and crs is not None and not crs.equals("EPSG:4326")
        batches = self._batches(rename)
        first = next(batches, None)
        if first is None:  # no row: an empty layer with the columns
            empty = self._schema.rename(columns=rename or {})
            if to_wgs84:
                empty = empty.to_crs("EPSG:4326")
            pyogrio.write_dataframe(empty, tmp, layer=self.layer, driver=self.driver,
                                    geometry_type="MultiPolygon")
            return
        geometry, schema = first[0], first[1].schema

        def stream():
            for _, batch in [first, *batches]:
                if to_wgs84:  # KML is WGS 84 by definition
                    batch = _reproject_wkb(batch, geometry, crs, "EPSG:4326")
                yield batch

        reader = pa.RecordBatchReader.from_batches(schema, stream())
        pyogrio.write_arrow(reader, tmp, layer=self.layer, driver=self.driver,
                            geometry_name=geometry, geometry_type=self._layer_type,
                            crs="EPSG:4326" if to_wgs84 else _crs_wkt(crs))

    def _to_parquet(self, tmp: Path, provenance_json: str) -> None:
        """GeoParquet 1.0 (WKB geometry, PROJJSON CRS), written batch by batch."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        column = {"encoding": "WKB", "geometry_types": sorted(self._types)}
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
    tmp = _temp_name(out)
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        _remove(tmp)


def _write_shapefile(out: Path, provenance_json: str, write) -> None:
    """A shapefile is several files: ``write(tmp)`` them in a temporary folder, then move
    them all."""
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.stem}.tmp-", dir=out.parent))
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
    """Name plus sha256 of a file (or size + mtime for big files); folders hash their files."""
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
                       ) -> Path:
    """Burn the features written to ``source`` (column ``id``) into a label COG, block by block.

    Each block reads back only the features whose box meets it, so no step holds every
    geometry. Where objects overlap, the smaller one is on top.
    """
    import shapely
    from affine import Affine
    from rasterio import features

    with LabelRasterWriter(path, width, height, transform, crs, dtype="uint32",
                           overwrite=overwrite, provenance=provenance) as writer:
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
    return Path(path)


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
        self._tmp = _temp_name(self.path)
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
            raise TerrasamError(f"could not create {path}: {_first_line(exc)}") from exc

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

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
        self._dataset.write(array.astype(self.dtype, copy=False), 1, window=window)

    def close(self) -> Path:
        """Finish: convert to COG layout, store provenance, rename into place."""
        if self._closed:
            return self.path
        import rasterio
        import rasterio.shutil

        cog_tmp = _temp_name(self.path)
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
            os.replace(cog_tmp, self.path)
        except (rasterio.errors.RasterioError, OSError) as exc:
            raise TerrasamError(f"could not write {self.path}: {_first_line(exc)}") from exc
        finally:
            self._closed = True
            _remove(cog_tmp)
            _remove(self._tmp)
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
