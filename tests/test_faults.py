"""Faults: disk full, kills, stale temporaries, corrupt spill files, zero objects, GDAL's
warnings, the GeoPackage version."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import shapely
from click.testing import CliRunner

import synth
from oracle import OracleAdapter
from terrasam import api
from terrasam import io as tio
from terrasam.errors import TerrasamError

TESTS = Path(__file__).resolve().parent
FAST = {"tile_size": 128, "overlap": 32, "scale": "none", "points_per_side": 8, "quiet": True}
CLI_FAST = ["--tile-size", "128", "--overlap", "32", "--points-per-side", "8", "--scale", "none"]
SHAPES = [synth.rect(20, 20, 60, 70), synth.rect(150, 160, 200, 230), synth.rect(250, 30, 300, 90)]

# runs the CLI with the oracle as model; MODE "fsize=N" limits the size of every file written
# (SIGXFSZ ignored, so writes fail with EFBIG as on a full disk), "kill-at-close" dies by
# SIGKILL when the outputs are about to be put in place
WRAPPER = """
import os, resource, signal, sys
sys.path.insert(0, {tests!r})
from oracle import OracleAdapter
from terrasam.models.ref import ModelRef
import terrasam.cli
oracle = OracleAdapter(background={background!r})
ModelRef.for_run = classmethod(lambda cls, *a, **k: cls.of(oracle))
mode = sys.argv[1]
if mode.startswith("fsize="):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(mode[len("fsize="):])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
elif mode == "kill-at-close":
    from terrasam import io
    io.VectorWriter.close = lambda self, *a, **k: os.kill(os.getpid(), signal.SIGKILL)
terrasam.cli.main(sys.argv[2:], prog_name="terrasam")
"""


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    return synth.make_scene(320, 320, shapes=SHAPES, path=d / "in.tif")


def run_cli(tmp_path, scene, mode, *args):
    script = tmp_path / "wrap.py"
    script.write_text(WRAPPER.format(tests=str(TESTS), background=tuple(scene.background)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, str(script), mode, *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def beside(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("ext", [".gpkg", ".geojson"])
def test_disk_full_says_so_and_leaves_nothing(tmp_path, scene, ext):
    out = tmp_path / "out" / f"objects{ext}"
    out.parent.mkdir()
    proc = run_cli(tmp_path, scene, "fsize=60000", "segment", scene.path, "-o", out,
                   "--label-raster", out.parent / "labels.tif", "--workdir", tmp_path / "work",
                   *CLI_FAST, "-q")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"terrasam: error: disk full while writing {out}"]
    assert beside(out.parent) == []


def test_disk_full_in_the_work_directory(tmp_path, scene):
    out = tmp_path / "objects.gpkg"
    proc = run_cli(tmp_path, scene, "fsize=3000", "segment", scene.path, "-o", out, *CLI_FAST,
                   "-q")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("terrasam: error: disk full while writing ")
    assert "objects.gpkg.terrasam-work" in lines[0]
    # no tile was finished, so the work directory had nothing to resume from: it is gone too
    assert beside(tmp_path) == ["wrap.py"]


def test_disk_full_errors_are_recognised(tmp_path):
    import errno

    out = tmp_path / "x.gpkg"
    for exc in (OSError(errno.ENOSPC, "No space left on device"),
                OSError(errno.EFBIG, "File too large"),
                RuntimeError("sqlite3_step() failed: database or disk is full")):
        assert str(tio.write_failure(out, exc)) == f"disk full while writing {out}"
    # a cause that is not the disk keeps its own words
    failure = tio.write_failure(out, RuntimeError("Failed to commit transaction"))
    assert str(failure) == f"could not write {out}: Failed to commit transaction"
    assert beside(tmp_path) == []  # the probe leaves nothing


# --------------------------------------------------------------------------- both or neither


def test_label_raster_failure_leaves_no_vectors(tmp_path, scene, monkeypatch):
    import errno

    class Full:  # the label raster's dataset on a disk that is full
        def __init__(self, ds):
            self.ds = ds

        def write(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.ds, name)

    real = tio.LabelRasterWriter.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self._dataset = Full(self._dataset)

    monkeypatch.setattr(tio.LabelRasterWriter, "__init__", init)
    out, labels = tmp_path / "objects.gpkg", tmp_path / "labels.tif"
    with pytest.raises(TerrasamError) as err:
        api.segment(scene.path, out, label_raster=labels,
                    adapter=OracleAdapter(background=scene.background), **FAST)
    assert str(err.value) == f"disk full while writing {labels}"
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith("terrasam-work")] == []


def test_vector_failure_leaves_no_label_raster(tmp_path, scene, monkeypatch):
    real = tio.VectorWriter._to_parquet

    def full(self, tmp, provenance_json):
        real(self, tmp, provenance_json)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tio.VectorWriter, "_to_parquet", full)
    out, labels = tmp_path / "objects.parquet", tmp_path / "labels.tif"
    with pytest.raises(TerrasamError, match="^disk full while writing .*objects.parquet$"):
        api.segment(scene.path, out, label_raster=labels,
                    adapter=OracleAdapter(background=scene.background), **FAST)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith("terrasam-work")] == []


# --------------------------------------------------------------------------- kills


def test_sigkill_leftovers_are_removed_by_the_next_run(tmp_path, scene):
    out, labels = tmp_path / "objects.gpkg", tmp_path / "labels.tif"
    args = ["segment", scene.path, "-o", out, "--label-raster", labels, *CLI_FAST, "-q"]
    proc = run_cli(tmp_path, scene, "kill-at-close", *args)
    assert proc.returncode == -signal.SIGKILL
    hidden = [n for n in beside(tmp_path) if ".tmp-" in n]
    assert any(n.startswith(".objects.tmp-") for n in hidden)  # the staging GeoPackage
    assert any(n.startswith(".labels.tmp-") for n in hidden)  # the finished label raster
    assert not out.exists() and not labels.exists()
    proc = run_cli(tmp_path, scene, "none", *args)
    assert proc.returncode == 0, proc.stderr
    assert beside(tmp_path) == ["labels.tif", "objects.gpkg", "wrap.py"]


def test_stale_temporaries_of_dead_processes_only_are_removed(tmp_path):
    gone, alive = dead_pid(), os.getppid()
    stale = [f".objects.tmp-{gone}-0123abcd.stage.gpkg", f".objects.tmp-{gone}-89abcdef.gpkg",
             f".objects.gpkg.terrasam.tmp-{gone}-00000000.json"]
    keep = [f".objects.tmp-{alive}-0123abcd.stage.gpkg", f".other.tmp-{gone}-0123abcd.gpkg",
            "objects.tmp-1-0123abcd.gpkg"]
    for name in stale + keep:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / f".objects.tmp-{gone}-fedcba98").mkdir()  # a shapefile's folder
    (tmp_path / f".objects.tmp-{gone}-fedcba98" / "objects.shp").write_bytes(b"")
    removed = tio.remove_stale_temporaries(tmp_path / "objects.gpkg")
    assert len(removed) == 4
    assert beside(tmp_path) == sorted(keep)


def test_writers_clean_up_before_writing(tmp_path):
    gone = dead_pid()
    (tmp_path / f".objects.tmp-{gone}-0123abcd.stage.gpkg").write_bytes(b"")
    (tmp_path / f".labels.tmp-{gone}-0123abcd.tif").write_bytes(b"")
    gdf = gpd.GeoDataFrame({"id": [1]}, geometry=[shapely.box(0, 0, 1, 1)], crs="EPSG:32614")
    tio.write_vectors(gdf, tmp_path / "objects.fgb", {})
    with tio.LabelRasterWriter(tmp_path / "labels.tif", 8, 8, synth.utm_transform(),
                               "EPSG:32614") as w:
        w.write(np.ones((8, 8), np.uint32), (0, 0, 8, 8))
    assert beside(tmp_path) == ["labels.tif", "objects.fgb", "objects.fgb.terrasam.json"]


def test_every_temporary_name_is_recognisable(tmp_path):
    out = tmp_path / "objects.gpkg"
    names = [tio.temp_name(out), tio.temp_name(out, ".stage.gpkg"), tio.temp_name(out, ""),
             tio.temp_name(tio._sidecar(out))]
    for name in names:
        m = tio._TEMP.match(name.name)
        assert m and m["pid"] == str(os.getpid())
        assert m["stem"] in ("objects", "objects.gpkg.terrasam")


# --------------------------------------------------------------------------- spill files


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_unreadable_spill_file_is_recomputed_with_a_warning(tmp_path, damage):
    scene = synth.make_scene(128, 128, shapes=[synth.rect(30, 30, 90, 100)],
                             path=tmp_path / "in.tif")
    out, work = tmp_path / "out.gpkg", tmp_path / "work"
    first = api.segment(scene.path, out, adapter=OracleAdapter(background=scene.background),
                        workdir=work, keep_workdir=True, **FAST)
    tile = work / "tile_000000.npz"
    data = tile.read_bytes()
    tile.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x93NUMPY" * 50,
                      "empty": b""}[damage])
    again = OracleAdapter(background=scene.background)
    with pytest.warns(UserWarning, match="^work directory tile 0 was unreadable; recomputing "
                                         "it$"):
        gdf = api.segment(scene.path, out, adapter=again, workdir=work, overwrite=True, **FAST)
    assert again.embed_calls == 1
    assert gdf.attrs["terrasam"]["tiles_resumed"] == 0
    assert list(gdf.geometry.to_wkt()) == list(first.geometry.to_wkt())
    assert not work.exists()


# --------------------------------------------------------------------------- zero objects


@pytest.fixture(scope="module")
def empty_scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("empty")
    return synth.make_scene(128, 128, shapes=[], path=d / "in.tif")


def test_zero_objects_counts_what_each_filter_rejected(tmp_path, empty_scene):
    gdf = api.segment(empty_scene.path, tmp_path / "out.gpkg",
                      adapter=OracleAdapter(background=empty_scene.background), **FAST)
    rejected = gdf.attrs["terrasam"]["rejected"]
    assert len(gdf) == 0 and gdf.attrs["terrasam"]["objects"] == 0
    # 8 x 8 points, three masks each, every one empty with a low predicted IoU
    assert rejected["candidates"] == 192 and rejected["iou"] == 192
    assert rejected["masks"] == 0 and rejected["pred_iou_thresh"] == pytest.approx(0.88)


def test_rejected_counts_add_up_with_every_filter(tmp_path, scene):
    gdf = api.segment(scene.path, tmp_path / "out.gpkg",
                      adapter=OracleAdapter(background=scene.background), **FAST)
    r = gdf.attrs["terrasam"]["rejected"]
    assert len(gdf) == 3 and r["masks"] > 0 and r["nms"] > 0
    # every candidate is either dropped by one filter or kept as a mask
    kept = r["candidates"] - sum(r[k] for k in ("iou", "stability", "edge", "nodata", "nms"))
    assert kept == r["masks"]


def test_cli_zero_objects_exits_0_with_a_hint(tmp_path, empty_scene, monkeypatch):
    from terrasam.cli import main
    from terrasam.models.ref import ModelRef

    oracle = OracleAdapter(background=empty_scene.background)
    monkeypatch.setattr(ModelRef, "for_run", classmethod(lambda cls, *a, **k: cls.of(oracle)))
    out = tmp_path / "out.gpkg"
    result = CliRunner().invoke(main, ["segment", str(empty_scene.path), "-o", str(out),
                                       *CLI_FAST])
    assert result.exit_code == 0, result.output
    hints = [line for line in result.output.splitlines() if line.startswith("terrasam: hint")]
    assert hints == ["terrasam: hint: 0 objects: 192 candidate masks were rejected (192 below "
                     "--pred-iou-thresh 0.88, 0 below --stability-score-thresh 0.95, 0 "
                     "duplicates (NMS), 0 on nodata); try lowering --pred-iou-thresh"]
    assert pyogrio.read_info(out)["features"] == 0


def test_zero_objects_hint_names_the_biggest_filter():
    from terrasam.cli.segment import zero_objects_hint

    hint = zero_objects_hint({"candidates": 1234, "masks": 0, "iou": 812, "stability": 400,
                              "edge": 0, "nodata": 0, "nms": 22, "pred_iou_thresh": 0.88,
                              "stability_score_thresh": 0.95})
    assert hint == ("0 objects: 1,234 candidate masks were rejected (812 below --pred-iou-thresh "
                    "0.88, 400 below --stability-score-thresh 0.95, 22 duplicates (NMS), 0 on "
                    "nodata); try lowering --pred-iou-thresh")
    hint = zero_objects_hint({"candidates": 10, "masks": 0, "iou": 0, "stability": 2,
                              "edge": 0, "nodata": 8, "nms": 0})
    assert hint.endswith("; check --nodata and the raster's mask")
    assert "removed them all" in zero_objects_hint({"candidates": 10, "masks": 4})


@pytest.mark.parametrize("ext", [".gpkg", ".shp", ".parquet", ".fgb", ".geojson"])
def test_empty_outputs_keep_their_geometry_type(tmp_path, empty_scene, ext):
    out = tmp_path / f"out{ext}"
    api.segment(empty_scene.path, out, adapter=OracleAdapter(background=empty_scene.background),
                **FAST)
    if ext == ".parquet":
        import pyarrow.parquet as pq

        geo = json.loads(pq.read_schema(out).metadata[b"geo"])
        assert geo["columns"]["geometry"]["geometry_types"] == ["MultiPolygon"]
        assert len(gpd.read_parquet(out)) == 0
    elif ext == ".geojson":
        # GeoJSON declares no layer type: an empty FeatureCollection is all it can say
        data = json.loads(out.read_text())
        assert data["type"] == "FeatureCollection" and data["features"] == []
    else:
        info = pyogrio.read_info(out)
        # a Shapefile's polygon type holds multipolygons
        assert info["geometry_type"] == ("Polygon" if ext == ".shp" else "MultiPolygon")
        assert "id" in list(info["fields"])


def test_prompt_zero_objects_hint(tmp_path, empty_scene, monkeypatch):
    from terrasam.cli import main
    from terrasam.models.ref import ModelRef

    oracle = OracleAdapter(background=empty_scene.background)
    monkeypatch.setattr(ModelRef, "for_run", classmethod(lambda cls, *a, **k: cls.of(oracle)))
    out = tmp_path / "out.gpkg"
    result = CliRunner().invoke(main, ["prompt", str(empty_scene.path), "-o", str(out),
                                       "--point", "500020,4099980", "--scale", "none"])
    assert result.exit_code == 0, result.output
    hints = [line for line in result.output.splitlines() if line.startswith("terrasam: hint")]
    assert len(hints) == 1 and hints[0].startswith("terrasam: hint: 0 objects: the masks of the "
                                                   "1 prompts were empty")
    assert pyogrio.read_info(out)["geometry_type"] == "MultiPolygon"


# --------------------------------------------------------------------------- GeoPackage version


def test_geopackage_is_version_1_2_with_its_provenance(tmp_path):
    gdf = gpd.GeoDataFrame({"id": [1]}, geometry=[shapely.box(0, 0, 1, 1)], crs="EPSG:32614")
    out = tio.write_vectors(gdf, tmp_path / "objects.gpkg", {"model": "m"})
    with sqlite3.connect(out) as db:
        (application_id,) = db.execute("PRAGMA application_id").fetchone()
        (user_version,) = db.execute("PRAGMA user_version").fetchone()
    assert application_id == 0x47504B47  # "GPKG"
    assert user_version == 10200
    assert tio.read_provenance(out)["model"] == "m"
    empty = tio.write_vectors(gdf.iloc[:0], tmp_path / "empty.gpkg", {"model": "m"})
    with sqlite3.connect(empty) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (10200,)
    assert tio.read_provenance(empty)["output"]["features"] == 0


# --------------------------------------------------------------------------- GDAL warnings


def odd_tiff(path: Path, size: int = 128) -> Path:
    """A 4-sample RGB TIFF without ExtraSamples: libtiff warns on every open."""
    import struct

    rgb = synth.make_scene(size, size, shapes=[synth.rect(30, 30, 90, 100)]).rgb
    data = np.concatenate([rgb, np.full((1, size, size), 255, np.uint8)])
    data = data.transpose(1, 2, 0).tobytes()
    tags = [(256, 3, size), (257, 3, size), (258, 3, 8), (259, 3, 1), (262, 3, 2), (273, 4, 0),
            (277, 3, 4), (278, 3, size), (279, 4, len(data))]
    start = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        value = start if tag == 273 else value
        ifd += struct.pack("<HHIHH" if kind == 3 else "<HHII", tag, kind, 1, value,
                           *((0,) if kind == 3 else ()))
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + data)
    return path


def test_gdal_warnings_show_once_and_not_with_quiet(tmp_path, monkeypatch):
    from terrasam.cli import main
    from terrasam.models.ref import ModelRef

    src = odd_tiff(tmp_path / "odd.tif")
    oracle = OracleAdapter(background=synth.BACKGROUND)
    monkeypatch.setattr(ModelRef, "for_run", classmethod(lambda cls, *a, **k: cls.of(oracle)))
    args = ["segment", str(src), "-o", str(tmp_path / "out.gpkg"), *CLI_FAST, "--bands", "1,2,3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    tiff = [line for line in result.output.splitlines() if "TIFFReadDirectory" in line]
    assert tiff == ["terrasam: warning: odd.tif: TIFFReadDirectory:Sum of Photometric "
                    "type-related color channels and ExtraSamples doesn't match "
                    "SamplesPerPixel. Defining non-color channels as ExtraSamples."]
    result = CliRunner().invoke(main, [*args, "--overwrite", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "TIFFReadDirectory" not in result.output
    # terrasam's own warning about the result stays
    assert [line for line in result.output.splitlines() if "warning" in line] == [
        "terrasam: warning: the raster has no georeferencing: the objects are in pixel "
        "coordinates (column, row) with no CRS"]


def test_router_shows_each_message_once():
    from terrasam.warn import routed

    shown = []
    with routed(echo=shown.append) as router:
        import logging

        logging.getLogger("rasterio._env").warning("CPLE_AppDefined in a.tif: TIFFX:bad tag")
        logging.getLogger("rasterio._env").warning("CPLE_AppDefined in TIFFX:bad tag")
        logging.getLogger("rasterio._env").error("CPLE_AppDefined in write failed")
        warnings.warn_explicit("bad key", RuntimeWarning, "/x/site-packages/pyogrio/raw.py", 1)
        warnings.warn_explicit("bad key", RuntimeWarning, "/x/site-packages/pyogrio/raw.py", 2)
        router.quiet = True
        logging.getLogger("pyogrio._err").warning("another one")
    assert shown == ["terrasam: warning: a.tif: TIFFX:bad tag", "terrasam: warning: bad key"]
