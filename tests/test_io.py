"""Writers: every format re-read equal, provenance, atomic writes, overwrite rules, label COG."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine

from terrasam import __version__
from terrasam import io as tio
from terrasam.errors import TerrasamError
from terrasam.vectorize import mask_to_geometry, to_frame

UTM = Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 4_000_000.0)
FORMATS = [".gpkg", ".shp", ".parquet", ".geojson", ".fgb"]


@pytest.fixture
def gdf():
    ring = np.zeros((40, 40), bool)
    ring[5:35, 5:35] = True
    ring[15:25, 15:25] = False
    two = np.zeros((40, 40), bool)
    two[0:3, 0:3] = True
    two[10:14, 36:40] = True
    square = np.zeros((40, 40), bool)
    square[36:40, 0:4] = True
    geoms = [mask_to_geometry(m, UTM) for m in (ring, two, square)]
    return to_frame(geoms, "EPSG:32614", {
        "predicted_iou": [0.91, 0.55, 0.875],
        "stability_score": [0.97, 0.9, 0.95],
        "model": ["sam-vit-b"] * 3,
        "prompt": ["auto", "auto", "point"],
    })


@pytest.fixture
def provenance(tmp_path):
    raster = tmp_path / "scene.tif"
    raster.write_bytes(b"not really a tiff")
    return tio.make_provenance(input=raster, model="sam-vit-b", points_per_side=16,
                               bands=(4, 3, 2), simplify="0.5m")


def read_back(path: Path):
    if path.suffix == ".parquet":
        return gpd.read_parquet(path)
    return pyogrio.read_dataframe(path)


def leftovers(folder: Path, keep=()) -> list[str]:
    """Files that are neither expected outputs nor GDAL's own read-side .aux.xml."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in keep and not p.name.endswith(".aux.xml"))


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("ext", FORMATS)
def test_every_format_reads_back_equal(tmp_path, gdf, provenance, ext):
    out = tio.write_vectors(gdf, tmp_path / f"objects{ext}", provenance)
    assert out == tmp_path / f"objects{ext}" and out.exists()
    # FlatGeobuf's spatial index stores features in Hilbert order: compare by id
    back = read_back(out).sort_values("id", ignore_index=True)
    names = tio.SHAPEFILE_NAMES if ext == ".shp" else {}
    expected = gdf.rename(columns=names)
    assert list(back.columns) == list(expected.columns)
    # GeoJSON is RFC 7946: WGS 84 lon/lat with 7 decimals (about 1 cm)
    epsg, tolerance = (4326, 2e-2) if ext == ".geojson" else (32614, 1e-9)
    assert back.crs.to_epsg() == epsg
    if ext == ".geojson":
        back = back.to_crs(gdf.crs)
    assert back.crs.equals(gdf.crs)
    assert len(back) == len(gdf)
    for column in expected.columns.drop("geometry"):
        if expected[column].dtype.kind == "f":
            np.testing.assert_allclose(back[column].to_numpy(), expected[column].to_numpy())
        else:
            assert back[column].tolist() == expected[column].tolist()
    for written, read in zip(gdf.geometry, back.geometry):
        assert read.is_valid
        assert shapely.symmetric_difference(written, read).area < tolerance * written.area
        assert sum(len(p.interiors) for p in shapely.get_parts(read)) == sum(
            len(p.interiors) for p in shapely.get_parts(written))
    assert leftovers(tmp_path, keep={"scene.tif"}) == sorted(
        p.name for p in tmp_path.iterdir()
        if p.name.startswith("objects") and not p.name.endswith(".aux.xml"))
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("ext", FORMATS + [".kml"])
def test_provenance_round_trip(tmp_path, gdf, provenance, ext):
    if ext == ".kml" and ".kml" not in tio._vector_formats():
        pytest.skip("this GDAL cannot write KML")
    out = tio.write_vectors(gdf, tmp_path / f"objects{ext}", provenance)
    stored = tio.read_provenance(out)
    assert stored["terrasam"] == __version__
    assert stored["model"] == "sam-vit-b"
    assert stored["input"]["name"] == "scene.tif"
    assert stored["input"]["sha256"] == hashlib.sha256(b"not really a tiff").hexdigest()
    assert stored["parameters"] == {"points_per_side": 16, "bands": [4, 3, 2], "simplify": "0.5m"}
    assert stored["output"]["features"] == 3
    sidecar = tmp_path / f"objects{ext}.terrasam.json"
    # GeoPackage and GeoParquet keep it inside the file; the others beside it
    assert sidecar.exists() == (ext not in (".gpkg", ".parquet"))


def test_kml_is_written_in_wgs84(tmp_path, gdf, provenance):
    if ".kml" not in tio._vector_formats():
        pytest.skip("this GDAL cannot write KML")
    out = tio.write_vectors(gdf, tmp_path / "objects.kml", provenance)
    back = pyogrio.read_dataframe(out)
    expected = gdf.to_crs("EPSG:4326")
    assert back.crs.to_epsg() == 4326 and len(back) == 3
    for written, read in zip(expected.geometry, back.geometry):
        assert shapely.symmetric_difference(written, read).area < 1e-6 * written.area


def test_shapefile_long_names_mapped_consistently(tmp_path, gdf, provenance):
    gdf = gdf.assign(confidence_level=[1, 2, 3], confidence_limit=[4, 5, 6])
    out = tio.write_vectors(gdf, tmp_path / "objects.shp", provenance)
    back = pyogrio.read_dataframe(out)
    assert list(back.columns) == ["id", "area_m2", "perim_m", "pred_iou", "stab_score", "model",
                                  "prompt", "confidence", "confiden_1", "geometry"]
    assert back["confiden_1"].tolist() == [4, 5, 6]
    mapping = tio.read_provenance(out)["output"]["field_names"]
    assert mapping["predicted_iou"] == "pred_iou" and mapping["confidence_limit"] == "confiden_1"


# --------------------------------------------------------------------------- output rules


def test_refuses_to_overwrite_with_exact_message(tmp_path, gdf, provenance):
    out = tmp_path / "objects.gpkg"
    tio.write_vectors(gdf, out, provenance)
    with pytest.raises(TerrasamError) as err:
        tio.write_vectors(gdf.iloc[:1], out, provenance)
    assert str(err.value) == f"{out} exists; use --overwrite to replace it"
    with pytest.raises(TerrasamError, match="exists; use --overwrite"):
        tio.check_output(out)
    tio.write_vectors(gdf.iloc[:1], out, provenance, overwrite=True)
    assert len(pyogrio.read_dataframe(out)) == 1


def test_overwriting_a_shapefile_replaces_all_parts(tmp_path, gdf, provenance):
    out = tmp_path / "objects.shp"
    tio.write_vectors(gdf, out, provenance)
    (tmp_path / "objects.qix").write_bytes(b"stale index")
    tio.write_vectors(gdf.iloc[:2], out, provenance, overwrite=True)
    assert len(pyogrio.read_dataframe(out)) == 2
    assert not (tmp_path / "objects.qix").exists()
    assert tio.read_provenance(out)["output"]["features"] == 2


def test_check_output_errors(tmp_path, monkeypatch):
    with pytest.raises(TerrasamError) as err:
        tio.check_output(tmp_path / "objects.xyz")
    assert str(err.value).startswith("unsupported output format '.xyz'; use one of .gpkg, .shp, "
                                     ".parquet, .geojson, .fgb")
    # no extension: a GeoPackage, the documented default
    assert tio.check_output(tmp_path / "objects") == tmp_path / "objects.gpkg"
    with pytest.raises(TerrasamError, match="unsupported output format '.tif'"):
        tio.check_output(tmp_path / "labels.tif")
    assert tio.check_output(tmp_path / "labels.tif", kind="raster") == tmp_path / "labels.tif"
    with pytest.raises(TerrasamError, match=r"output folder .*missing does not exist"):
        tio.check_output(tmp_path / "missing" / "objects.gpkg")
    monkeypatch.setattr(tio.os, "access", lambda path, mode: False)
    with pytest.raises(TerrasamError, match=f"cannot write to folder {tmp_path}"):
        tio.check_output(tmp_path / "objects.gpkg")


# --------------------------------------------------------------------------- atomicity


def _failing_ogr(path, *args, **kwargs):
    Path(path).write_bytes(b"half a file")
    raise OSError("No space left on device")


@pytest.mark.parametrize("ext", [".gpkg", ".shp", ".geojson", ".fgb"])
def test_failed_write_leaves_nothing(tmp_path, gdf, provenance, monkeypatch, ext):
    monkeypatch.setattr(pyogrio, "write_dataframe", lambda df, path, **kw: _failing_ogr(path))
    out = tmp_path / f"objects{ext}"
    with pytest.raises(TerrasamError) as err:
        tio.write_vectors(gdf, out, provenance)
    assert str(err.value) == f"disk full while writing {out}"
    assert leftovers(tmp_path) == ["scene.tif"]


def test_other_write_failures_keep_their_cause(tmp_path, gdf, provenance, monkeypatch):
    def denied(df, path, **kw):
        raise OSError("Permission denied")

    monkeypatch.setattr(pyogrio, "write_dataframe", denied)
    out = tmp_path / "objects.gpkg"
    with pytest.raises(TerrasamError) as err:
        tio.write_vectors(gdf, out, provenance)
    assert str(err.value) == f"could not write {out}: Permission denied"


def test_failed_parquet_write_leaves_nothing(tmp_path, gdf, provenance, monkeypatch):
    import pyarrow.parquet as pq

    def failing(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_batch", failing)
    with pytest.raises(TerrasamError, match="^disk full while writing .*objects.parquet$"):
        tio.write_vectors(gdf, tmp_path / "objects.parquet", provenance)
    assert leftovers(tmp_path) == ["scene.tif"]


def test_failed_overwrite_keeps_the_old_file(tmp_path, gdf, provenance, monkeypatch):
    out = tio.write_vectors(gdf, tmp_path / "objects.geojson", provenance)
    before = out.read_bytes()
    monkeypatch.setattr(pyogrio, "write_dataframe", lambda df, path, **kw: _failing_ogr(path))
    with pytest.raises(TerrasamError):
        tio.write_vectors(gdf.iloc[:1], out, provenance, overwrite=True)
    assert out.read_bytes() == before
    assert leftovers(tmp_path) == ["objects.geojson", "objects.geojson.terrasam.json", "scene.tif"]


def test_programming_errors_are_not_disguised(tmp_path, gdf, provenance, monkeypatch):
    def broken(df, path, **kw):
        Path(path).write_bytes(b"x")
        raise KeyError("bug")

    monkeypatch.setattr(pyogrio, "write_dataframe", broken)
    with pytest.raises(KeyError):
        tio.write_vectors(gdf, tmp_path / "objects.gpkg", provenance)
    assert leftovers(tmp_path) == ["scene.tif"]


# --------------------------------------------------------------------------- provenance


def test_make_provenance_contents(tmp_path, monkeypatch):
    raster = tmp_path / "big.tif"
    raster.write_bytes(b"0" * 100)
    weights = tmp_path / "sam.pth"
    weights.write_bytes(b"weights" * 10)
    monkeypatch.setattr(tio, "_HASH_LIMIT", 50)  # make the raster count as "big"
    prov = tio.make_provenance(input=raster, model="sam-vit-b", checkpoint=weights,
                               out=tmp_path / "x.gpkg", iou=np.float32(0.5), n=np.int64(3))
    assert prov["input"]["name"] == "big.tif" and prov["input"]["size"] == 100
    assert "sha256" not in prov["input"] and prov["input"]["mtime"].endswith("+00:00")
    assert prov["checkpoint"] == {"name": "sam.pth", "size": 70,
                                  "sha256": hashlib.sha256(b"weights" * 10).hexdigest()}
    assert prov["parameters"] == {"out": str(tmp_path / "x.gpkg"), "iou": 0.5, "n": 3}
    assert prov["created"].endswith("+00:00")
    assert prov["software"]["python"] == ".".join(map(str, sys.version_info[:3]))
    json.dumps(prov)  # plain JSON throughout


def test_make_provenance_hashes_model_folders(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"abc")
    first = tio.make_provenance(checkpoint=folder)["checkpoint"]["sha256"]
    (folder / "model.safetensors").write_bytes(b"abd")
    assert tio.make_provenance(checkpoint=folder)["checkpoint"]["sha256"] != first


def test_make_provenance_does_not_import_torch():
    code = ("import sys, terrasam.io as t; p = t.make_provenance(model='m'); "
            "print('torch' in sys.modules, 'torch' in p['software'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["False", "True"]


def test_read_provenance_errors(tmp_path, gdf):
    with pytest.raises(TerrasamError, match="does not exist"):
        tio.read_provenance(tmp_path / "nothing.gpkg")
    plain = tmp_path / "plain.gpkg"
    gdf.to_file(plain, engine="pyogrio")
    with pytest.raises(TerrasamError, match="holds no terrasam provenance"):
        tio.read_provenance(plain)


# --------------------------------------------------------------------------- label raster


def _write_labels(path, labels, transform=UTM, step=300, **kwargs):
    height, width = labels.shape
    with tio.LabelRasterWriter(path, width, height, transform, "EPSG:32614", **kwargs) as writer:
        for row in range(0, height, step):
            for col in range(0, width, step):
                block = labels[row:row + step, col:col + step]
                writer.write(block, (col, row, block.shape[1], block.shape[0]))
    return path


def test_label_raster_is_a_cog(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 100_000, (1300, 1100)).astype(np.uint32)
    labels[:, 1000:] = 0
    out = _write_labels(tmp_path / "labels.tif", labels, provenance={"model": "sam-vit-b"})
    with rasterio.open(out) as src:
        assert src.dtypes == ("uint32",) and src.nodata == 0
        assert src.crs.to_epsg() == 32614 and src.transform == UTM
        assert src.profile["tiled"] and src.block_shapes == [(512, 512)]
        assert src.compression.name.lower() == "deflate"
        structure = src.tags(ns="IMAGE_STRUCTURE")
        assert structure.get("PREDICTOR") == "2"
        assert structure.get("LAYOUT") == "COG"
        assert src.overviews(1) == [2, 4]
        np.testing.assert_array_equal(src.read(1), labels)
        overview = src.read(1, out_shape=(650, 550))
        assert set(np.unique(overview)) <= set(np.unique(labels))  # nearest: no blended ids
    assert tio.read_provenance(out) == {"model": "sam-vit-b"}
    assert leftovers(tmp_path) == ["labels.tif"]


def test_small_label_raster_unwritten_pixels_are_zero(tmp_path):
    path = tmp_path / "labels.tif"
    with tio.LabelRasterWriter(path, 300, 200, UTM, "EPSG:32614", dtype="uint16") as writer:
        writer.write(np.full((50, 60), 65535, np.uint16), rasterio.windows.Window(10, 20, 60, 50))
    with rasterio.open(path) as src:
        data = src.read(1)
        assert src.dtypes == ("uint16",) and src.overviews(1) == []
    assert data.sum() == 65535 * 3000 and (data[20:70, 10:70] == 65535).all()


def test_label_raster_failure_leaves_nothing(tmp_path):
    path = tmp_path / "labels.tif"
    with pytest.raises(TerrasamError, match="label 70000 does not fit a uint16 label raster"):
        with tio.LabelRasterWriter(path, 100, 100, UTM, "EPSG:32614", dtype="uint16") as w:
            w.write(np.ones((10, 10), np.uint32), (0, 0, 10, 10))
            w.write(np.full((10, 10), 70_000, np.uint32), (10, 0, 10, 10))
    assert list(tmp_path.iterdir()) == []


def test_label_raster_refuses_existing(tmp_path):
    path = tmp_path / "labels.tif"
    path.write_bytes(b"old")
    with pytest.raises(TerrasamError, match=f"^{path} exists; use --overwrite to replace it$"):
        tio.LabelRasterWriter(path, 10, 10, UTM, "EPSG:32614")
    with pytest.raises(TerrasamError, match="label raster type must be one of uint8"):
        tio.LabelRasterWriter(path, 10, 10, UTM, "EPSG:32614", dtype="float32", overwrite=True)
    _write_labels(path, np.arange(100, dtype=np.uint32).reshape(10, 10), overwrite=True)
    with rasterio.open(path) as src:
        assert src.read(1)[9, 9] == 99


def test_label_raster_without_cog_driver(tmp_path, monkeypatch):
    monkeypatch.setattr(tio, "_has_cog_driver", lambda: False)
    blocks = np.arange(1, 31, dtype=np.uint32).reshape(6, 5)
    labels = np.kron(blocks, np.ones((200, 200), np.uint32))
    out = _write_labels(tmp_path / "labels.tif", labels, step=512)
    with rasterio.open(out) as src:
        assert src.profile["tiled"] and src.block_shapes == [(512, 512)]
        assert src.compression.name.lower() == "deflate"
        assert src.overviews(1) == [2, 4]
        np.testing.assert_array_equal(src.read(1), labels)
    assert leftovers(tmp_path) == ["labels.tif"]
