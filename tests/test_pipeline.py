"""The one pipeline: tile jobs through the engine, model references, streaming output."""

from __future__ import annotations

import pickle
import time

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely

import synth
from oracle import OracleAdapter
from terrasam import api, pipeline
from terrasam import io as tio
from terrasam.amg import AmgJob, AMGParams
from terrasam.engines.local import Timings, run_tiles
from terrasam.engines.workdir import WorkDir
from terrasam.errors import TerrasamError
from terrasam.models.ref import ModelRef
from terrasam.raster import open_raster
from terrasam.text import TextJob
from terrasam.tiling import MaskRecord, pack_records, unpack_records

FAST = {"tile_size": 128, "overlap": 32, "scale": "none", "points_per_side": 8, "quiet": True}
SHAPES = [synth.rect(20, 80, 60, 150), synth.rect(70, 70, 170, 170),
          synth.ring(180, 180, 300, 300, 14), synth.rect(10, 250, 30, 280),
          synth.diamond(250, 60, 40)]


class TextOracle(OracleAdapter):
    """A fake SAM 3: "rect" finds the colour components of objects 1 and 2, "ring" object 3;
    dies (like a killed process) when asked for tile number ``fail_at``."""

    def __init__(self, fail_at=None, **kw):
        super().__init__(**kw)
        self.family = "sam3"
        self.fail_at = fail_at
        self.text_calls = 0

    def embed(self, image):
        if self.fail_at is not None and self.embed_calls + 1 == self.fail_at:
            raise RuntimeError("killed")
        return super().embed(image)

    def segment_text(self, image, text, score_threshold=0.5, mask_threshold=0.5,
                     embedding=None):
        assert embedding is not None  # one embedding per tile serves every concept
        self.text_calls += 1
        out = []
        for i in {"rect": (1, 2), "ring": (3,)}[text]:
            same = np.all(np.abs(image.astype(int) - np.array(synth.colour(i))) <= 8, axis=-1)
            if same.any():
                out.append({"mask": same, "score": 0.9, "box": None})
        return out


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return synth.make_scene(320, 320, shapes=SHAPES,
                            path=tmp_path_factory.mktemp("pipe") / "in.tif")


def test_records_round_trip_through_the_spill_format():
    tile = type("T", (), {"x0": 5, "y0": 7, "width": 9, "height": 9})()
    mask = np.array([[1, 0, 1], [1, 1, 0]], bool)
    records = [MaskRecord(mask, (1, 2, 4, 4), 4, 0.9, 0.8, (2.0, 3.0), (0, 0, 9, 9), concept=3)]
    back = unpack_records(pack_records(tile, records), tile)
    assert len(back) == 1 and back[0].concept == 3 and back[0].bbox == (1, 2, 4, 4)
    assert np.array_equal(back[0].mask, mask) and back[0].point == (2.0, 3.0)
    other = type("T", (), {"x0": 0, "y0": 7, "width": 9, "height": 9})()
    assert unpack_records(pack_records(tile, records), other) is None


def test_jobs_and_model_references_are_small_picklable_values(tmp_path):
    job = AmgJob(AMGParams.for_family("sam2", points_per_side=4))
    assert pickle.loads(pickle.dumps(job)).describe() == job.describe()
    text = TextJob(("pool", " roof "))
    assert pickle.loads(pickle.dumps(text)).concepts == ("pool", "roof")
    with pytest.raises(TerrasamError, match="must not be empty"):
        TextJob(("pool", " "))
    ref = ModelRef.for_run("sam-vit-b", tmp_path / "w.pth", fast=True)
    assert ref.dtype == "bfloat16" and ref.checkpoint == str(tmp_path / "w.pth")
    assert pickle.loads(pickle.dumps(ref)) == ref
    assert ModelRef.for_run(text=True).model == "sam3"
    assert ModelRef.for_run(dtype="float32", fast=True).dtype == "float32"
    with pytest.raises(TerrasamError, match="cannot be sent to other processes"):
        pickle.dumps(ModelRef.of(OracleAdapter()))


def test_engine_runs_any_job_and_loads_the_model_only_when_needed(scene, tmp_path):
    oracle = OracleAdapter(background=scene.background)
    loads = []

    class CountingRef(ModelRef):
        def load(self):
            loads.append(1)
            return oracle

    with open_raster(scene.path, scale="none") as reader:
        grid, tiles = pipeline.plan_grid(reader, 1024, 128, 32)
        job = AmgJob(AMGParams.for_family("sam", points_per_side=8))
        work = WorkDir(tmp_path / "w", {"run": 1})
        timings = Timings()
        first = [(t.index, len(r)) for t, r in run_tiles(tiles, reader, job, CountingRef(),
                                                           workdir=work, timings=timings)]
        assert len(loads) == 1 and timings.tiles_run == 9 and timings.profile.tiles == 9
        assert 0 < timings.profile.coverage < 1
        again = Timings()
        second = [(t.index, len(r)) for t, r in run_tiles(tiles, reader, job, CountingRef(),
                                                            workdir=work, timings=again)]
    assert second == first and again.tiles_resumed == 9
    assert len(loads) == 1  # every tile came from the work directory: no model loaded


def test_text_job_runs_through_the_engine_with_spill_and_resume(scene, tmp_path):
    out = tmp_path / "text.gpkg"
    kw = {"tile_size": 128, "overlap": 32, "scale": "none"}
    reference = api.prompt(scene.path, tmp_path / "ref.gpkg", text=["rect", "ring"],
                           adapter=TextOracle(background=scene.background), **kw)
    assert sorted(reference.prompt) == ["rect", "rect", "ring"]
    assert set(zip(reference.prompt, reference.prompt_id)) == {("rect", 1), ("ring", 2)}
    assert reference.attrs["terrasam"]["text"]["tiles"] == 9

    with pytest.raises(RuntimeError, match="killed"):
        api.prompt(scene.path, out, text=["rect", "ring"],
                   adapter=TextOracle(fail_at=6, background=scene.background), **kw)
    work = tmp_path / "text.gpkg.terrasam-work"
    assert not out.exists() and len(list(work.glob("tile_*.npz"))) == 5

    again = TextOracle(background=scene.background)
    gdf = api.prompt(scene.path, out, text=["rect", "ring"], adapter=again, **kw)
    assert again.embed_calls == 4 and again.text_calls == 8  # 4 tiles, both concepts each
    assert gdf.attrs["terrasam"]["text"]["tiles_resumed"] == 5
    assert list(gdf.geometry.to_wkt()) == list(reference.geometry.to_wkt())
    assert list(gdf["id"]) == list(reference["id"]) == [1, 2, 3]
    assert not work.exists()
    written = gpd.read_file(out)  # a MultiPolygon layer: the same shapes
    assert set(written.geom_type) == {"MultiPolygon"}
    assert written.geometry.geom_equals(reference.geometry).all()


def test_streamed_output_is_identical_to_one_batch(scene, tmp_path, monkeypatch):
    oracle = OracleAdapter(background=scene.background)
    one = api.segment(scene.path, tmp_path / "one.gpkg", adapter=oracle, **FAST)
    flushes = []
    real_flush = tio.VectorWriter.flush

    def counting_flush(self):
        flushes.append(self._buffered)
        real_flush(self)

    monkeypatch.setattr(pipeline, "BATCH_OBJECTS", 2)
    monkeypatch.setattr(tio.VectorWriter, "flush", counting_flush)
    monkeypatch.setitem(tio.VectorWriter.__init__.__kwdefaults__, "batch_rows", 2)
    streamed = api.segment(scene.path, tmp_path / "many.gpkg", adapter=oracle,
                           label_raster=tmp_path / "labels.tif", return_frame=False, **FAST)
    assert len([n for n in flushes if n]) >= 3  # written in several appends
    assert len(streamed) == 0 and "predicted_iou" in streamed.columns  # columns only
    assert streamed.attrs["terrasam"]["objects"] == len(one) == len(SHAPES)
    many = gpd.read_file(tmp_path / "many.gpkg")
    # batches of 2 finished objects are numbered in the same stream order
    assert list(many["id"]) == list(range(1, len(SHAPES) + 1))
    assert sorted(one.geometry.normalize().to_wkt()) == sorted(
        shapely.get_geometry(g, 0).normalize().wkt for g in many.geometry)
    with rasterio.open(tmp_path / "labels.tif") as ds:
        labels = ds.read(1)
    assert set(np.unique(labels)) == {0, *many["id"]}
    for oid, geom in zip(many["id"], many.geometry):
        assert np.count_nonzero(labels == oid) * 0.25 == pytest.approx(geom.area)


def test_no_stray_sidecars_beside_outputs(scene, tmp_path):
    oracle = OracleAdapter(background=scene.background)
    out = tmp_path / "o.gpkg"
    gdf = api.segment(scene.path, out, adapter=oracle, label_raster=tmp_path / "l.tif",
                      preview=tmp_path / "p.png", map=tmp_path / "m.html", **FAST)
    tio.read_provenance(out)
    tio.read_provenance(tmp_path / "l.tif")
    gpd.read_file(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.tif", "m.html", "o.gpkg", "p.png"]
    assert gdf.attrs["terrasam"]["coverage"] > 0  # the summary keeps coverage


def test_all_existing_outputs_are_named_in_one_message(scene, tmp_path):
    for name in ("o.gpkg", "l.tif", "p.png"):
        (tmp_path / name).write_text("keep")
    oracle = OracleAdapter(background=scene.background)
    with pytest.raises(TerrasamError, match=r"o.gpkg, .*l.tif, .*p.png exist; use --overwrite "
                                            r"to replace them"):
        api.segment(scene.path, tmp_path / "o.gpkg", adapter=oracle,
                    label_raster=tmp_path / "l.tif", preview=tmp_path / "p.png", **FAST)
    assert oracle.embed_calls == 0


def test_prompt_with_gsd_on_a_huge_raster_starts_at_once(tmp_path, monkeypatch):
    big = synth.write_large_raster(tmp_path / "big.tif", empty_fraction=0.0)

    def no_grid(*a, **k):
        raise AssertionError("a point prompt must not build a tile grid")

    monkeypatch.setattr("terrasam.tiling.make_grid", no_grid)
    oracle = OracleAdapter(background=(0, 0, 0))
    t0 = time.perf_counter()
    gdf = api.prompt(big, points=[(500_000 + 10_000.5, 4_100_000 - 10_000.5)], gsd=2.0,
                     adapter=oracle, scale="none")
    assert time.perf_counter() - t0 < 10
    assert len(gdf) == 1 and oracle.embed_calls == 1


@pytest.mark.parametrize("side,most", [(1, 1), (2, 4)])
def test_tiny_rasters_give_each_set_of_pixels_once(side, most, tmp_path):
    from terrasam.testing import random_checkpoint

    ckpt = random_checkpoint("sam-vit-b", tmp_path / "ckpt", size="tiny", seed=0)
    rgb = np.random.default_rng(0).integers(0, 255, (3, side, side), dtype=np.uint8)
    src = synth.write_raster(tmp_path / "in.tif", rgb)
    gdf = api.segment(src, tmp_path / "out.gpkg", checkpoint=ckpt, quiet=True,
                      points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0)
    assert 1 <= len(gdf) <= most
    assert len({g.wkb for g in gdf.geometry}) == len(gdf)  # no two geometries equal
