"""The Dask engine on a loopback LocalCluster: same output as the local engine, lost workers,
failing tiles, the command line."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import rasterio

import synth
from terrasam import api
from terrasam.errors import TerrasamError

distributed = pytest.importorskip("distributed")

AMG = {"tile_size": 128, "overlap": 32, "points_per_side": 4, "pred_iou_thresh": 0.0,
       "stability_score_thresh": 0.0, "box_nms_thresh": 1.0, "min_mask_region_area": 20,
       "scale": "none", "quiet": True}


@pytest.fixture(scope="module")
def cluster():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from terrasam.testing import random_checkpoint

    return random_checkpoint("sam-vit-b", tmp_path_factory.mktemp("dask") / "ckpt",
                             size="tiny", seed=0)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return synth.make_scene(448, 448, path=tmp_path_factory.mktemp("dask") / "in.tif")


@pytest.fixture(scope="module")
def reference(scene, model, tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the workers: the same arithmetic, bit for bit
    try:
        return api.segment(scene.path, tmp_path_factory.mktemp("ref") / "ref.gpkg",
                           checkpoint=model, **AMG)
    finally:
        torch.set_num_threads(threads)


def same(a, b) -> bool:
    cols = ["id", "predicted_iou", "stability_score", "tiles", "area_m2"]
    return list(a.geometry.to_wkt()) == list(b.geometry.to_wkt()) and a[cols].equals(b[cols])


def test_dask_output_is_identical_to_the_local_engine(cluster, scene, model, reference,
                                                      tmp_path):
    gdf = api.segment(scene.path, tmp_path / "out.gpkg", checkpoint=model, engine="dask",
                      client=cluster, **AMG)
    assert len(reference) > 10 and same(gdf, reference)
    info = gdf.attrs["terrasam"]
    assert info["tiles"] == info["tiles_run"] == 25 and info["model_s"] > 0
    assert not (tmp_path / "out.gpkg.terrasam-work").exists()
    assert cluster.status == "running"  # a client given by the caller is not closed


def test_a_killed_worker_changes_nothing(cluster, scene, model, reference, tmp_path):
    out = tmp_path / "out.gpkg"
    work = tmp_path / "out.gpkg.terrasam-work"
    pids = cluster.run(os.getpid)
    result, error = {}, []

    def run():
        try:
            result["gdf"] = api.segment(scene.path, out, checkpoint=model, engine="dask",
                                        client=cluster, **AMG)
        except BaseException as exc:  # reported by the main thread
            error.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 120
    while len(list(work.glob("tile_*.npz"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = sorted(pids.values())[0]
    os.kill(victim, signal.SIGKILL)  # a real kill of a worker process mid-run
    worker.join(timeout=300)
    assert not error, error
    assert len(list(pids.values())) == 2
    assert same(result["gdf"], reference)
    cluster.wait_for_workers(2, timeout=60)  # the nanny restarted it


def test_a_failing_tile_ends_the_run_in_one_sentence(cluster, scene, model, tmp_path):
    bad = tmp_path / "bad.tif"
    with rasterio.open(scene.path) as src:
        profile = src.profile | {"tiled": True, "blockxsize": 128, "blockysize": 128,
                                 "compress": "deflate"}
        with rasterio.open(bad, "w", **profile) as dst:
            dst.write(src.read())
    with rasterio.open(bad) as ds:
        offset = int(ds.get_tag_item("BLOCK_OFFSET_2_2", "TIFF", bidx=1))
        size = int(ds.get_tag_item("BLOCK_SIZE_2_2", "TIFF", bidx=1))
    with open(bad, "r+b") as f:  # a corrupt block in the middle of the raster
        f.seek(offset)
        f.write(np.random.default_rng(0).integers(0, 255, size, np.uint8).tobytes())
    with pytest.raises(TerrasamError) as err:
        api.segment(bad, tmp_path / "out.gpkg", checkpoint=model, engine="dask", client=cluster,
                    **{**AMG, "scale": "none"})
    message = str(err.value)
    assert message.startswith("tile ") and "failed on a Dask worker" in message
    assert "(window col 192, row 192," in message and "\n" not in message
    assert not (tmp_path / "out.gpkg").exists()


def test_without_distributed_the_engine_says_how_to_install_it(monkeypatch, scene, tmp_path):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(TerrasamError, match=r'pip install "terrasam\[dask\]"'):
        api.segment(scene.path, tmp_path / "o.gpkg", engine="dask-local", **AMG)


def test_engine_options_are_checked_before_any_work(scene, tmp_path):
    with pytest.raises(TerrasamError, match="--engine dask needs --scheduler"):
        api.segment(scene.path, tmp_path / "o.gpkg", engine="dask", **AMG)
    with pytest.raises(TerrasamError, match="unknown engine 'spark'"):
        api.segment(scene.path, tmp_path / "o.gpkg", engine="spark", **AMG)


def test_cli_runs_on_a_local_dask_cluster(scene, model, reference, tmp_path):
    import geopandas as gpd
    from click.testing import CliRunner

    from terrasam.cli import main

    out = tmp_path / "cli.gpkg"
    args = ["segment", str(scene.path), "-o", str(out), "--checkpoint", str(model),
            "--engine", "dask-local", "--workers", "2", "--tile-size", "128", "--overlap", "32",
            "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
            "--box-nms-thresh", "1.0", "--min-mask-region-area", "20", "--scale", "none", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    written = gpd.read_file(out)
    assert written.geometry.geom_equals(reference.geometry).all()
