"""SlimSAM (SAM ViT-B pruned by Chen et al.): the published configs, loading by id and by
folder, the Meta layout, and the AMG through the CLI."""

from __future__ import annotations

import os
import subprocess

import geopandas as gpd
import numpy as np
import pytest
import torch

from synth import write_raster
from terrasam.io import read_provenance
from terrasam.models import get_spec, load_model
from terrasam.models import sam as samfam
from terrasam.testing import randomize
from test_segment import terrasam_cli
from test_weights import _fake_hub_snapshot

# The two fields the published config.json files set (nielsr/slimsam-{50,77}-uniform; every
# other field is SamConfig's default) and the size of their float32 model.safetensors.
PUBLISHED = {"slimsam-77": ({"hidden_size": 168, "mlp_dim": 696}, 38.9),
             "slimsam-50": ({"hidden_size": 384, "mlp_dim": 1536}, 111.8)}


def _published_folder(model_id, folder, seed=0):
    """A folder laid out as the published checkpoint: its config fields, random weights."""
    import transformers as tf

    vision, _ = PUBLISHED[model_id]
    torch.manual_seed(seed)
    model = tf.SamModel(tf.SamConfig(vision_config=vision))
    randomize(model, seed, prompt_sensitive=True).eval()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def slim77(tmp_path_factory):
    return _published_folder("slimsam-77", tmp_path_factory.mktemp("slim") / "slimsam-77")


@pytest.mark.parametrize("model_id", list(PUBLISHED))
def test_full_config_is_the_published_architecture(model_id):
    import transformers as tf

    spec = get_spec(model_id)
    ours = samfam.build_config(spec.family, spec.variant, "full")
    vision, megabytes = PUBLISHED[model_id]
    published = tf.SamConfig(vision_config=vision)
    assert ours.vision_config.to_dict() == published.vision_config.to_dict()
    with torch.device("meta"):
        n = sum(p.numel() for p in samfam.model_class("sam")(ours).parameters())
    assert n * 4 / 1e6 == pytest.approx(megabytes, abs=0.1)  # the published file's size
    assert spec.params_m == pytest.approx(n / 1e6, abs=0.05)
    assert spec.hf_repo == f"nielsr/{model_id}-uniform" and spec.meta_url is None


def test_loads_by_id_from_the_cache_and_by_folder(slim77, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_hub_snapshot(tmp_path / "hf_home" / "hub", "nielsr/slimsam-77-uniform", slim77)
    by_id = load_model("slimsam-77", device="cpu")
    by_folder = load_model(checkpoint=slim77, device="cpu")
    assert by_id.spec.model_id == by_folder.spec.model_id == "slimsam-77"
    assert by_id.checkpoint_sha256 == by_folder.checkpoint_sha256
    image = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    emb = by_folder.embed(image)
    assert emb.features.shape[-3:] == (256, 64, 64)
    logits, iou = by_folder.decode(emb, points=np.array([[[200.0, 150.0]]]),
                                   point_labels=np.array([[1]]))
    assert logits.shape == (1, 3, 256, 256) and iou.shape == (1, 3)
    assert by_folder.upscale(logits, emb).shape == (1, 3, 300, 400)


def test_meta_layout_is_recognised_as_slimsam(slim77):
    import transformers as tf

    model = tf.SamModel.from_pretrained(slim77)
    meta = samfam.hf_to_meta(model.state_dict(), model.config)
    config, back, spec = samfam.meta_to_hf(meta)
    assert spec.model_id == "slimsam-77"
    assert config.vision_config.mlp_dim == 696 and config.vision_config.num_attention_heads == 12
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_segment_through_the_cli(slim77, tmp_path):
    img = np.zeros((3, 200, 260), dtype=np.uint8)
    img[:, 40:120, 50:150] = 200
    img[1, 130:180, 170:240] = 220
    src = write_raster(tmp_path / "in.tif", img)
    out = tmp_path / "out.gpkg"
    cmd = [*terrasam_cli(), "segment", str(src), "-o", str(out), "--checkpoint", str(slim77),
           "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
           "--min-area", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    gdf = gpd.read_file(out)
    assert len(gdf) >= 1 and gdf.crs.to_epsg() == 32614 and gdf.geometry.is_valid.all()
    assert set(gdf["model"]) == {"slimsam-77"}
    assert read_provenance(out)["model"] == "slimsam-77"
