"""Whole-raster segmentation: seams, nodata, holes, resume, --gsd, label raster, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from click.testing import CliRunner

import synth
from oracle import OracleAdapter
from terrasam import api
from terrasam.engines.workdir import WorkDir
from terrasam.errors import TerrasamError
from terrasam.vectorize import labels_to_geometries

FAST = {"tile_size": 128, "overlap": 32, "scale": "none", "points_per_side": 8, "quiet": True}


def iou(a, b) -> float:
    return shapely.area(shapely.intersection(a, b)) / shapely.area(shapely.union(a, b))


def match(gdf, polygons) -> dict:
    """truth label -> best IoU; also checks that no truth object is matched twice."""
    best = {}
    owners = []
    for label, truth in polygons.items():
        scores = [iou(g, truth) for g in gdf.geometry]
        best[label] = max(scores)
        owners.append(int(np.argmax(scores)))
    assert len(set(owners)) == len(owners), "two truth objects share one output object"
    return best


# objects across 2 tiles, across 4 tiles, a ring with a hole across a seam, one inside a tile
# and a diamond across a seam (tiles at 0, 96, 192; shared strips 96..128 and 192..224)
SEAM_SHAPES = [
    synth.rect(20, 80, 60, 150),
    synth.rect(70, 70, 170, 170),
    synth.ring(180, 180, 300, 300, 14),
    synth.rect(10, 250, 30, 280),
    synth.diamond(250, 60, 40),
]


class FailingOracle(OracleAdapter):
    """An oracle that dies (like a killed process) when asked to embed tile number ``fail_at``."""

    def __init__(self, fail_at, **kw):
        super().__init__(**kw)
        self.fail_at = fail_at

    def embed(self, image):
        if self.embed_calls + 1 == self.fail_at:
            raise RuntimeError("killed")
        return super().embed(image)


@pytest.fixture(scope="module")
def seams(tmp_path_factory):
    d = tmp_path_factory.mktemp("seams")
    scene = synth.make_scene(320, 320, shapes=SEAM_SHAPES, path=d / "in.tif")
    oracle = OracleAdapter(background=scene.background)
    gdf = api.segment(scene.path, d / "out.gpkg", adapter=oracle, label_raster=d / "labels.tif",
                      **FAST)
    return scene, gdf, d, oracle


def test_objects_across_two_and_four_tiles_are_one_polygon_each(seams):
    scene, gdf, d, oracle = seams
    assert len(gdf) == len(SEAM_SHAPES)  # 0 duplicates, nothing extra
    for label, score in match(gdf, scene.polygons).items():
        assert score >= 0.99, label
    by_size = gdf.set_index("id")
    assert sorted(by_size["tiles"].tolist()) == [1, 2, 2, 4, 4]
    ring = gdf.geometry[gdf.geometry.apply(lambda g: iou(g, scene.polygons[3])).idxmax()]
    assert len(ring.interiors) == 1  # the hole survives the seam
    assert gdf.crs.to_epsg() == 32614
    assert list(gdf["id"]) == list(range(1, len(gdf) + 1))
    assert set(gdf["prompt"]) == {"auto"} and set(gdf["model"]) == {"oracle"}
    assert gdf.attrs["terrasam"]["tiles"] == oracle.embed_calls == 9
    assert not (d / "out.gpkg.terrasam-work").exists()  # work directory removed on success


def test_written_vectors_and_provenance(seams):
    scene, gdf, d, _ = seams
    read = gpd.read_file(d / "out.gpkg")
    assert list(read["id"]) == list(gdf["id"])
    assert {"area_m2", "perimeter_m", "predicted_iou", "stability_score", "model", "prompt",
            "tiles"} <= set(read.columns)
    from terrasam.io import read_provenance

    prov = read_provenance(d / "out.gpkg")
    params = prov["parameters"]
    assert params["tile_size"] == 128 and params["overlap"] == 32 and params["gsd"] is None
    assert params["amg"]["points_per_side"] == 8
    assert params["amg"]["pred_iou_thresh"] == pytest.approx(0.88)


def test_label_raster_ids_match_vector_ids(seams):
    scene, gdf, d, _ = seams
    with rasterio.open(d / "labels.tif") as ds:
        labels = ds.read(1)
        assert ds.crs.to_epsg() == 32614 and ds.transform == scene.transform
        assert ds.profile["tiled"]
        transform = ds.transform
    from_raster = labels_to_geometries(labels, transform)
    assert set(from_raster) == set(gdf["id"])
    for oid, geom in zip(gdf["id"], gdf.geometry):
        assert iou(from_raster[oid], geom) == pytest.approx(1.0)


def test_nodata_frame_is_not_an_object_and_objects_stop_at_it(tmp_path):
    shapes = [synth.rect(0, 40, 60, 120), synth.rect(150, 100, 224, 150),
              synth.rect(100, 10, 130, 60)]
    scene = synth.make_scene(224, 224, shapes=shapes, nodata_border=12, path=tmp_path / "in.tif")
    oracle = OracleAdapter(background=scene.background)
    gdf = api.segment(scene.path, tmp_path / "out.gpkg", adapter=oracle, **FAST)
    assert len(gdf) == 3
    for label, score in match(gdf, scene.polygons).items():
        assert score >= 0.99, label
    frame = shapely.box(*scene.transform @ (12, 212), *scene.transform @ (212, 12))
    assert all(frame.buffer(1e-6).contains(g) for g in gdf.geometry)


def test_all_nodata_tiles_are_skipped(tmp_path):
    # the right half is nodata: its tiles are never read by the model
    scene = synth.make_scene(416, 128, shapes=[synth.rect(20, 20, 100, 100)])
    image = scene.image.copy()
    image[:, :, 230:] = 0
    synth.write_raster(tmp_path / "in.tif", image, transform=scene.transform, nodata=0)
    oracle = OracleAdapter(background=scene.background)
    gdf = api.segment(tmp_path / "in.tif", tmp_path / "out.gpkg", adapter=oracle, **FAST)
    assert oracle.embed_calls == 3 < 4
    assert len(gdf) == 1 and iou(gdf.geometry[0], scene.polygons[1]) == pytest.approx(1.0)


def test_resume_after_kill_gives_the_same_output_without_redoing_tiles(seams, tmp_path):
    scene, reference, _, _ = seams
    out = tmp_path / "out.gpkg"
    dying = FailingOracle(6, background=scene.background)
    with pytest.raises(RuntimeError, match="killed"):
        api.segment(scene.path, out, adapter=dying, **FAST)
    work = tmp_path / "out.gpkg.terrasam-work"
    assert not out.exists()
    assert len(list(work.glob("tile_*.npz"))) == 5

    again = OracleAdapter(background=scene.background)
    gdf = api.segment(scene.path, out, adapter=again, **FAST)
    assert again.embed_calls == 4  # only the 4 tiles that were not finished
    assert again.decoder_calls < reference.attrs["terrasam"]["tiles"] * 64
    assert gdf.attrs["terrasam"]["tiles_resumed"] == 5
    assert list(gdf.geometry.to_wkt()) == list(reference.geometry.to_wkt())
    cols = ["id", "predicted_iou", "stability_score", "tiles", "area_m2"]
    assert gdf[cols].equals(reference[cols])
    assert not work.exists()


def test_changed_parameters_do_not_reuse_spilled_tiles(tmp_path):
    scene = synth.make_scene(224, 224, shapes=[synth.rect(60, 60, 160, 160)],
                             path=tmp_path / "in.tif")
    out = tmp_path / "out.gpkg"
    with pytest.raises(RuntimeError):
        api.segment(scene.path, out, adapter=FailingOracle(3, background=scene.background),
                    **FAST)
    oracle = OracleAdapter(background=scene.background)
    gdf = api.segment(scene.path, out, adapter=oracle, **{**FAST, "points_per_side": 6},
                      keep_workdir=True)
    assert oracle.embed_calls == 4  # every tile again: the old ones were for 8 points a side
    assert len(gdf) == 1
    work = tmp_path / "out.gpkg.terrasam-work"
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["params"]["amg"]["points_per_side"] == 6
    assert len(list(work.glob("tile_*.npz"))) == 4


def test_workdir_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TerrasamError, match="not a terrasam work directory"):
        WorkDir(tmp_path, {"a": 1})
    assert (tmp_path / "notes.txt").exists()


def test_gsd_keeps_geometry_in_place(tmp_path):
    shapes = [synth.rect(20, 40, 120, 200), synth.rect(150, 150, 300, 250),
              synth.ring(40, 240, 180, 360, 24)]
    scene = synth.make_scene(384, 384, shapes=shapes, path=tmp_path / "in.tif")  # 0.5 m pixels
    oracle = OracleAdapter(background=scene.background, tolerance=40)
    gdf = api.segment(scene.path, tmp_path / "out.gpkg", adapter=oracle, gsd=1.0,
                      label_raster=tmp_path / "labels.tif", **FAST)
    info = gdf.attrs["terrasam"]
    assert info["grid"] == [192, 192] and info["tiles"] == 4  # the model saw 1 m pixels
    assert len(gdf) == 3
    for label, score in match(gdf, scene.polygons).items():
        assert score >= 0.98, label
    with rasterio.open(tmp_path / "labels.tif") as ds:
        assert ds.width == 192 and ds.res == (1.0, 1.0)
        assert ds.bounds == rasterio.open(scene.path).bounds


def test_existing_output_is_an_error_before_any_work(seams, tmp_path):
    scene = seams[0]
    out = tmp_path / "out.gpkg"
    out.write_text("keep me")
    oracle = OracleAdapter(background=scene.background)
    with pytest.raises(TerrasamError, match="exists; use --overwrite"):
        api.segment(scene.path, out, adapter=oracle, **FAST)
    with pytest.raises(TerrasamError, match="unsupported output format"):
        api.segment(scene.path, tmp_path / "o.gpkg", label_raster=tmp_path / "l.png",
                    adapter=oracle, **FAST)
    assert oracle.embed_calls == 0 and out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gpkg"]


# ------------------------------------------------------------------------------- the CLI

def terrasam_cli() -> list[str]:
    exe = Path(sys.executable).with_name("terrasam")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "terrasam"]


def test_cli_existing_output_exits_1_with_one_line(seams, tmp_path):
    scene = seams[0]
    out = tmp_path / "out.gpkg"
    out.write_text("keep me")
    proc = subprocess.run([*terrasam_cli(), "segment", str(scene.path), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"terrasam: error: {out} exists; use --overwrite "
                                                "to replace it"]
    assert out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gpkg"]


def test_cli_options_and_config_file_reach_the_api(monkeypatch, tmp_path):
    from terrasam.cli import main

    seen = {}

    def fake_segment(raster, output, **kw):
        seen.update(kw, raster=raster, output=output)
        frame = gpd.GeoDataFrame({"id": []}, geometry=[])
        frame.attrs["terrasam"] = {"objects": 0, "tiles": 0, "tiles_resumed": 0, "wall_s": 0.0,
                                   "output": output, "label_raster": None}
        return frame

    monkeypatch.setattr(api, "segment", fake_segment)
    config = tmp_path / "run.toml"
    config.write_text('tile-size = 512\npoints_per_side = 16\n[amg]\npred_iou_thresh = 0.7\n')
    result = CliRunner().invoke(main, [
        "segment", "in.tif", "-o", "out.gpkg", "--config", str(config), "--points-per-side",
        "24", "--bands", "4,3,2", "--gsd", "0.5", "--fast", "--min-area", "20m2"])
    assert result.exit_code == 0, result.output
    assert seen["tile_size"] == 512 and seen["points_per_side"] == 24  # the flag wins
    assert seen["pred_iou_thresh"] == 0.7 and seen["fast"] is True
    assert seen["bands"] == (4, 3, 2) and seen["gsd"] == 0.5 and seen["min_area"] == "20m2"
    assert "box_nms_thresh" not in seen  # unset knobs keep the family default
    assert result.output.strip() == "0 objects from 0 tiles in 0.0 s -> out.gpkg"

    config.write_text("tile_sise = 3\n")
    result = CliRunner().invoke(main, ["segment", "in.tif", "-o", "o.gpkg", "--config",
                                       str(config)])
    assert result.exit_code == 1
    assert "unknown option 'tile_sise' in config file" in result.output


@pytest.mark.slow
def test_cli_end_to_end_on_naip_with_a_random_checkpoint(sample_raster, tmp_path):
    from terrasam.testing import random_checkpoint

    ckpt = random_checkpoint("sam-vit-b", tmp_path / "ckpt", size="tiny", seed=0)
    src = tmp_path / "naip.tif"
    # a window of the shipped NAIP sample keeps it quick
    with rasterio.open(sample_raster) as ds:
        win = rasterio.windows.Window(100, 100, 384, 320)
        prof = ds.profile | {"width": 384, "height": 320,
                             "transform": ds.window_transform(win)}
        with rasterio.open(src, "w", **prof) as dst:
            dst.write(ds.read(window=win))
    out, labels = tmp_path / "fields.gpkg", tmp_path / "labels.tif"
    cmd = [*terrasam_cli(), "segment", str(src), "-o", str(out), "--checkpoint", str(ckpt),
           "--label-raster", str(labels), "--tile-size", "256", "--overlap", "64",
           "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh",
           "0", "--box-nms-thresh", "1.0", "--min-mask-region-area", "50", "--bands", "1,2,3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "objects from 4 tiles" in proc.stdout
    gdf = gpd.read_file(out)
    assert len(gdf) > 1 and gdf.crs.to_epsg() == 26914
    assert gdf.geometry.is_valid.all() and list(gdf["id"]) == list(range(1, len(gdf) + 1))
    with rasterio.open(labels) as ds:
        assert ds.crs.to_epsg() == 26914 and ds.profile["tiled"] and ds.res == (5.0, 5.0)
        ids, counts = np.unique(ds.read(1), return_counts=True)
    burnt = dict(zip(ids.tolist(), counts.tolist()))
    burnt.pop(0, None)
    assert set(burnt) == set(gdf["id"])
    # every object's burnt pixels are at most its area; the smallest one (drawn on top) exactly
    area = dict(zip(gdf["id"], gdf["area_m2"]))
    assert all(burnt[i] * 25.0 <= area[i] + 1e-6 for i in burnt)
    smallest = min(area, key=area.get)
    assert burnt[smallest] * 25.0 == pytest.approx(area[smallest])
    assert not (tmp_path / "fields.gpkg.terrasam-work").exists()


def test_progress_plain_lines_and_quiet():
    import io

    from terrasam.progress import Progress

    stream = io.StringIO()
    with Progress(20, "tiles", stream=stream, initial=5) as bar:
        for _ in range(15):
            bar.update()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "tiles: 5/20 already done, resuming"
    assert lines[-1].startswith("tiles: 20/20 (") and "ETA 0:00" in lines[-1]
    assert 2 <= len(lines) <= 10  # throttled: not one line per tile
    quiet = io.StringIO()
    with Progress(3, quiet=True, stream=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""


def test_fast_mode_runs_a_real_model_in_bfloat16(tmp_path):
    from terrasam.io import read_provenance
    from terrasam.testing import random_checkpoint

    ckpt = random_checkpoint("sam-vit-b", tmp_path / "ckpt", size="tiny", seed=0)
    scene = synth.make_scene(160, 160, path=tmp_path / "s.tif")
    out = tmp_path / "fast.gpkg"
    api.segment(scene.path, out, checkpoint=ckpt, fast=True, points_per_side=4,
                pred_iou_thresh=0.0, stability_score_thresh=0.0, quiet=True)
    prov = read_provenance(out)
    assert "bfloat16" in json.dumps(prov)
    assert prov["parameters"]["amg"]["fast"] is True
