"""EdgeTAM: config, Meta key layout, parity with transformers' EdgeTamModel, the CLI, and the
one-sentence error without timm.

Tests that build the model need timm (and the torchvision it imports): they skip without it.
The missing-timm tests run everywhere (timm's absence is simulated where it is installed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import synth
from terrasam.cli import main
from terrasam.errors import TerrasamError
from terrasam.models import edgetam, sam2
from terrasam.models.registry import MODELS

KEYS = Path(__file__).parent / "data" / "meta_keys" / "edgetam.json"
NEEDS_TIMM = "EdgeTAM's image encoder needs timm (pip install 'terrasam[edgetam]')"
MISSING = "EdgeTAM needs timm and torchvision"
HINT = "pip install 'terrasam[edgetam]'"


def _timm():
    pytest.importorskip("timm", reason=NEEDS_TIMM)


def _image(h=300, w=420, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 4 : h // 2, w // 3 : w // 2] = (220, 40, 40)
    return img


def _load(path, **kw):
    from terrasam.models import load_model

    return load_model(checkpoint=str(path), device="cpu", dtype="float32", **kw)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    _timm()
    from terrasam.testing import random_checkpoint

    return random_checkpoint("edgetam", tmp_path_factory.mktemp("edgetam") / "hf",
                             prompt_sensitive=True)


@pytest.fixture(scope="module")
def meta_file(tmp_path_factory):
    _timm()
    from terrasam.testing import random_checkpoint

    return random_checkpoint("edgetam", tmp_path_factory.mktemp("edgetam_meta"), format="meta",
                             prompt_sensitive=True)


# --- registry and listing (no timm needed) --------------------------------------------------


def test_registry_entry_and_models_listing():
    spec = MODELS["edgetam"]
    assert (spec.family, spec.variant, spec.image_size) == ("edgetam", "repvit_m1", 1024)
    assert spec.hf_repo == "yonigozlan/EdgeTAM-hf" and spec.meta_file == "edgetam.pt"
    assert spec.meta_url == "https://huggingface.co/facebook/EdgeTAM/resolve/main/edgetam.pt"
    result = CliRunner().invoke(main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    row = {r["id"]: r for r in json.loads(result.output)}["edgetam"]
    assert row["family"] == "edgetam" and row["params_m"] == pytest.approx(9.1)
    table = CliRunner().invoke(main, ["models"]).output
    line = next(x for x in table.splitlines() if x.startswith("edgetam "))
    assert "9.1M" in line and "yonigozlan/EdgeTAM-hf / edgetam.pt" in line


def test_meta_files_are_told_from_sam2():
    """detect_family: a timm trunk (image_encoder.trunk.body) is EdgeTAM, a Hiera one SAM 2."""
    from terrasam.models.weights import detect_family

    keys = json.loads(KEYS.read_text())["keys"]
    meta = {k: torch.empty(s, device="meta") for k, s in keys.items()}
    assert edgetam.looks_like(meta) and not sam2.looks_like(meta)
    assert detect_family(meta, Path("edgetam.pt")) is edgetam
    hiera = json.loads((KEYS.parent / "sam2.1_hiera_tiny.json").read_text())["keys"]
    hiera = {k: torch.empty(s, device="meta") for k, s in hiera.items()}
    assert sam2.looks_like(hiera) and not edgetam.looks_like(hiera)
    assert detect_family(hiera, Path("sam2.1_hiera_tiny.pt")) is sam2


# --- config and Meta layout ------------------------------------------------------------------


def test_full_config_is_the_published_edgetam():
    """repvit_m1 features of its 4 stages, SAM 2's neck and heads at width 256, 1024 px input;
    the registry counts this image model's parameters (Meta's file adds the video modules)."""
    _timm()
    config = edgetam.build_config("edgetam", "repvit_m1", "full")
    backbone = config.vision_config.backbone_config
    assert backbone.architecture == "repvit_m1"
    assert backbone.model_args == {"in_chans": 3, "features_only": True,
                                   "out_indices": [0, 1, 2, 3]}
    assert config.vision_config.backbone_channel_list == [384, 192, 96, 48]
    assert config.vision_config.fpn_hidden_size == 256
    assert config.vision_config.fpn_top_down_levels == [2, 3]
    assert config.prompt_encoder_config.image_size == 1024
    assert config.mask_decoder_config.mlp_dim == 2048
    for size in ("full", "tiny"):
        cfg = edgetam.build_config("edgetam", "repvit_m1", size)
        with torch.device("meta"):
            model = edgetam.model_class()(cfg)
        channels = model.vision_encoder.backbone.timm_model.feature_info.channels()
        assert channels[::-1] == cfg.vision_config.backbone_channel_list
        if size == "full":
            n = sum(p.numel() for p in model.parameters()) / 1e6
            assert abs(n - MODELS["edgetam"].params_m) < 0.01 * MODELS["edgetam"].params_m, n


def test_preprocessing_is_edgetams():
    """The conversion script saves Sam2ImageProcessorFast() with EdgeTAM: a 1024 x 1024 resize
    with ImageNet mean and std, which is sam2.preprocess's."""
    _timm()
    pytest.importorskip("torchvision", reason=NEEDS_TIMM)
    from transformers import Sam2ImageProcessorFast

    proc = Sam2ImageProcessorFast()
    assert (proc.size["height"], proc.size["width"]) == (1024, 1024)
    assert tuple(proc.image_mean) == sam2.IMAGE_MEAN and tuple(proc.image_std) == sam2.IMAGE_STD


def test_meta_layout_matches_official_architecture():
    """hf_to_meta of the full config gives exactly the keys and shapes of Meta's EdgeTAM model
    (dumped from the official code), and meta_to_hf inverts it strictly."""
    _timm()
    want = json.loads(KEYS.read_text())["keys"]
    config = edgetam.build_config("edgetam", "repvit_m1", "full")
    with torch.device("meta"):
        hf = edgetam.model_class()(config).state_dict()
    meta = edgetam.hf_to_meta(hf, config)
    assert {k: list(v.shape) for k, v in meta.items()} == want
    config2, hf2, spec = edgetam.meta_to_hf(meta)
    assert spec.model_id == "edgetam"
    assert config2.to_dict() == config.to_dict()
    assert {k: v.shape for k, v in hf2.items()} == {k: v.shape for k, v in hf.items()}


def test_video_keys_are_dropped_and_image_keys_kept():
    _timm()
    from terrasam.testing import random_model

    model = random_model("edgetam", "tiny")
    meta = edgetam.hf_to_meta(model.state_dict(), model.config)
    assert "spatial_perceiver.layers.1.self_ff.3.weight" in meta
    assert "memory_attention.layers.1.linear2.weight" in meta
    _, hf, spec = edgetam.meta_to_hf(meta)
    assert spec.model_id == "edgetam"
    reference = model.state_dict()
    assert set(hf) == set(reference)
    for key in reference:
        if key != sam2._TIED:
            assert torch.equal(hf[key], reference[key]), key


def test_meta_to_hf_names_unknown_missing_and_misshaped_keys():
    _timm()
    config = edgetam.build_config("edgetam", "repvit_m1", "tiny")
    with torch.device("meta"):
        hf = edgetam.model_class()(config).state_dict()
    meta = edgetam.hf_to_meta(hf, config)
    with pytest.raises(TerrasamError, match="unexpected key 'extra_head.weight'"):
        edgetam.meta_to_hf({**meta, "extra_head.weight": torch.zeros(2)})
    key = "image_encoder.trunk.body.stem.conv1.c.weight"
    missing = {k: v for k, v in meta.items() if k != key}
    with pytest.raises(TerrasamError, match=f"no tensor '{key}'"):
        edgetam.meta_to_hf(missing)
    bad = {**meta, "sam_mask_decoder.iou_token.weight": torch.zeros(1, 7)}
    with pytest.raises(TerrasamError, match="'sam_mask_decoder.iou_token.weight' has shape"):
        edgetam.meta_to_hf(bad)
    with pytest.raises(TerrasamError, match="not an EdgeTAM checkpoint"):
        edgetam.meta_to_hf({"mask_decoder.iou_token.weight": torch.zeros(1)})


# --- parity with transformers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(hf_folder):
    """transformers' own EdgeTamModel, loaded by its own from_pretrained."""
    from transformers import EdgeTamModel

    return EdgeTamModel.from_pretrained(hf_folder).eval()


def _close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_hf_folder_matches_transformers_edgetam(hf_folder, reference):
    """Embeddings, then masks and IoU of a point prompt (multimask) and of a box prompt (single
    mask, dynamic selection) equal EdgeTamModel's forward on the same pixels."""
    adapter = _load(hf_folder)
    assert type(adapter) is edgetam.EdgeTamAdapter
    assert (adapter.model_id, adapter.family, adapter.image_size) == ("edgetam", "edgetam", 1024)
    img = _image()
    h, w = img.shape[:2]
    emb = adapter.embed(img)
    x = sam2.preprocess(img, 1024)
    with torch.inference_mode():
        want = reference.get_image_embeddings(x)
    for got, ref in zip([*emb.extra["high_res"], emb.features], want):
        _close(got, ref)
    pts = np.array([[[100.0, 80.0]], [[300.0, 200.0]]])
    logits, iou = adapter.decode(emb, pts, np.ones((2, 1)), multimask=True)
    scaled = torch.tensor(pts * [1024 / w, 1024 / h], dtype=torch.float32)
    with torch.inference_mode():
        out = reference(pixel_values=x, input_points=scaled[None],
                        input_labels=torch.ones(1, 2, 1, dtype=torch.long))
    assert logits.shape == (2, 3, 256, 256)
    _close(logits, out.pred_masks[0])
    _close(iou, out.iou_scores[0])
    assert not torch.allclose(logits[0], logits[1])  # the prompt matters
    boxes = np.array([[50.0, 40.0, 250.0, 180.0]])
    logits, iou = adapter.decode(emb, boxes=boxes, multimask=False)
    scaled = torch.tensor(boxes * ([1024 / w, 1024 / h] * 2), dtype=torch.float32)
    with torch.inference_mode():
        out = reference(pixel_values=x, input_boxes=scaled[None], multimask_output=False)
    _close(logits, out.pred_masks[0])
    _close(iou, out.iou_scores[0])


def test_meta_file_round_trip_gives_the_hf_folders_outputs(meta_file, hf_folder):
    assert meta_file.name == "edgetam.pt"
    raw = torch.load(meta_file, weights_only=True)
    assert set(raw) == {"model"} and "spatial_perceiver.latents" in raw["model"]
    from_meta, from_hf = _load(meta_file), _load(hf_folder)
    assert type(from_meta) is edgetam.EdgeTamAdapter and from_meta.model_id == "edgetam"
    img = _image(seed=1)
    e1, e2 = from_meta.embed(img), from_hf.embed(img)
    for a, b in zip([*e1.extra["high_res"], e1.features], [*e2.extra["high_res"], e2.features]):
        _close(a, b)
    pts = np.array([[[100.0, 80.0]], [[200.0, 150.0]]])
    for a, b in zip(from_meta.decode(e1, pts), from_hf.decode(e2, pts)):
        _close(a, b)


# --- the CLI and the backends ----------------------------------------------------------------


def test_segment_through_the_cli(hf_folder, tmp_path):
    scene = synth.make_scene(160, 160, path=tmp_path / "scene.tif")
    out = tmp_path / "objects.gpkg"
    result = CliRunner().invoke(main, [
        "segment", str(scene.path), "-o", str(out), "--model", "edgetam", "--checkpoint",
        str(hf_folder), "--points-per-side", "4", "--pred-iou-thresh", "0",
        "--stability-score-thresh", "0", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    import geopandas as gpd

    objects = gpd.read_file(out)
    assert len(objects) > 0 and set(objects.model) == {"edgetam"}
    assert objects.crs == scene.crs


def test_onnx_backend_is_refused_before_the_model_loads(hf_folder, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from terrasam.models import onnx_backend, weights

    if "edgetam" in onnx_backend.FAMILIES:
        pytest.skip("the ONNX backend exports EdgeTAM's encoder")

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(weights, "load_weights", refuse)
    with pytest.raises(TerrasamError) as err:
        _load(hf_folder, model_id="edgetam", backend="onnx")
    assert str(err.value) == ("--backend onnx runs SAM, SAM-HQ and SAM 2/2.1 image encoders; "
                              "run edgetam with --backend torch.")


# --- without timm (runs everywhere) ----------------------------------------------------------


@pytest.fixture
def no_timm(monkeypatch):
    """timm as if not installed (None in sys.modules makes `import timm` fail)."""
    monkeypatch.setitem(sys.modules, "timm", None)


def _one_sentence(msg: str) -> None:
    assert "\n" not in msg and msg.startswith(MISSING) and msg.endswith(HINT), msg


def test_without_timm_loading_is_one_sentence(no_timm, tmp_path, monkeypatch):
    from terrasam.models import weights

    def no_download(*a, **k):
        raise AssertionError("weights were looked up")

    monkeypatch.setattr(weights, "download", no_download)
    with pytest.raises(TerrasamError) as err:
        _load_id("edgetam")
    _one_sentence(str(err.value))
    # a Hugging Face folder (written without timm: config + a weights file)
    folder = tmp_path / "hf"
    edgetam.build_config("edgetam", "repvit_m1", "tiny").save_pretrained(folder)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(TerrasamError) as err:
        _load(folder)
    _one_sentence(str(err.value))
    # a Meta file
    pt = tmp_path / "edgetam.pt"
    torch.save({"model": {"image_encoder.trunk.body.stem.conv1.c.weight": torch.zeros(1),
                          "sam_mask_decoder.iou_token.weight": torch.zeros(1)}}, pt)
    with pytest.raises(TerrasamError) as err:
        _load(pt)
    _one_sentence(str(err.value))


def _load_id(model_id):
    from terrasam.models import load_model

    return load_model(model_id, device="cpu", dtype="float32")


def test_without_timm_the_cli_says_what_to_install(no_timm, tmp_path):
    scene = synth.make_scene(64, 64, path=tmp_path / "scene.tif")
    out = tmp_path / "objects.gpkg"
    result = CliRunner().invoke(main, ["segment", str(scene.path), "-o", str(out), "--model",
                                       "edgetam", "--device", "cpu", "--quiet"])
    assert result.exit_code == 1, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"terrasam: error: {MISSING}"), result.output
    assert HINT in lines[0] and not out.exists()
