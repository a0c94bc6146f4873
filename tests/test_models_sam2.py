"""SAM 2 / 2.1: Meta key layout, checkpoint round trips, preprocessing and decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from terrasam.errors import TerrasamError
from terrasam.models import sam2
from terrasam.models.registry import MODELS

KEYS = Path(__file__).parent / "data" / "meta_keys"
NAMES = {"hiera_t": "tiny", "hiera_s": "small", "hiera_b+": "base_plus", "hiera_l": "large"}


def _random_model(variant="hiera_t", seed=0):
    """A tiny Sam2Model with informative random weights (through terrasam.testing)."""
    from terrasam.testing import randomize

    torch.manual_seed(seed)
    model = sam2.model_class()(sam2.build_config("sam2", variant, "tiny"))
    return randomize(model, seed, prompt_sensitive=True).eval()


def _image(h=300, w=420, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 4 : h // 2, w // 3 : w // 2] = (220, 40, 40)
    return img


@pytest.fixture(scope="module")
def tiny():
    model = _random_model()
    spec = MODELS["sam2.1-hiera-tiny"]
    return sam2.Sam2Adapter(model, spec, "cpu", torch.float32)


@pytest.fixture(scope="module")
def embedded(tiny):
    img = _image()
    return img, tiny.embed(img)


# --- Meta layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2", "2.1"])
@pytest.mark.parametrize("variant", sam2.VARIANTS)
def test_meta_layout_matches_official_architecture(variant, version):
    """hf_to_meta of each full config gives exactly the keys and shapes of Meta's model
    (dumped from the official sam2 package), and meta_to_hf inverts it strictly."""
    want = json.loads((KEYS / f"sam{version}_hiera_{NAMES[variant]}.json").read_text())["keys"]
    config = sam2.build_config("sam2", variant, "full")
    with torch.device("meta"):
        model = sam2.model_class()(config)
    hf = model.state_dict()
    meta = sam2.hf_to_meta(hf, config, version=version)
    assert {k: list(v.shape) for k, v in meta.items()} == want
    config2, hf2, spec = sam2.meta_to_hf(meta)
    assert spec.model_id == f"sam{version}-hiera-{NAMES[variant].replace('_', '-')}"
    assert config2.to_dict() == config.to_dict()
    assert {k: v.shape for k, v in hf2.items()} == {k: v.shape for k, v in hf.items()}


def test_full_configs_match_registry_parameter_counts():
    """The registry counts the image model terrasam runs (Meta's files add the video memory)."""
    for variant in sam2.VARIANTS:
        with torch.device("meta"):
            model = sam2.model_class()(sam2.build_config("sam2", variant, "full"))
        n = sum(p.numel() for p in model.parameters()) / 1e6
        spec = MODELS[f"sam2.1-hiera-{NAMES[variant].replace('_', '-')}"]
        assert abs(n - spec.params_m) < 0.01 * spec.params_m, (variant, n)


def test_tiny_variants_are_recognised_from_shapes():
    for variant in sam2.VARIANTS:
        config = sam2.build_config("sam2", variant, "tiny")
        with torch.device("meta"):
            hf = sam2.model_class()(config).state_dict()
        for version in ("2", "2.1"):
            _, _, spec = sam2.meta_to_hf(sam2.hf_to_meta(hf, config, version=version))
            assert spec.variant == variant
            assert spec.model_id.startswith(f"sam{version}-")


def test_meta_to_hf_refuses_unknown_and_misshaped_keys():
    config = sam2.build_config("sam2", "hiera_t", "tiny")
    with torch.device("meta"):
        hf = sam2.model_class()(config).state_dict()
    meta = sam2.hf_to_meta(hf, config)
    assert sam2.looks_like(meta)
    with pytest.raises(TerrasamError, match="unexpected key 'extra_head.weight'"):
        sam2.meta_to_hf({**meta, "extra_head.weight": torch.zeros(2)})
    bad = dict(meta)
    bad["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    with pytest.raises(TerrasamError, match="matches none of Meta's Hiera"):
        sam2.meta_to_hf(bad)
    missing = {k: v for k, v in meta.items() if k != "sam_mask_decoder.conv_s0.weight"}
    with pytest.raises(TerrasamError, match="matches none"):
        sam2.meta_to_hf(missing)
    sam1 = {"image_encoder.patch_embed.proj.weight": torch.zeros(1),
            "mask_decoder.iou_token.weight": torch.zeros(1)}
    assert not sam2.looks_like(sam1)
    with pytest.raises(TerrasamError, match="not a SAM 2 checkpoint"):
        sam2.meta_to_hf(sam1)


def test_video_keys_are_dropped_and_image_keys_kept():
    config = sam2.build_config("sam2", "hiera_t", "tiny")
    model = _random_model()
    meta = sam2.hf_to_meta(model.state_dict(), config, version="2")
    assert "memory_attention.layers.3.linear2.weight" in meta and "no_obj_embed_spatial" not in meta
    _, hf, spec = sam2.meta_to_hf(meta)
    assert spec.model_id == "sam2-hiera-tiny"
    assert not any(k.startswith(("memory", "mask_downsample", "obj_ptr")) for k in hf)
    reference = model.state_dict()
    assert set(hf) == set(reference)
    for key in reference:
        if key != sam2._TIED:
            assert torch.equal(hf[key], reference[key]), key


# --- loading through the real path ---------------------------------------------------------


def _load(path):
    from terrasam.models import load_model

    return load_model(checkpoint=str(path), device="cpu", dtype="float32")


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, fmt, tiny, embedded):
    from terrasam.testing import random_checkpoint

    path = random_checkpoint("sam2.1-hiera-tiny", tmp_path / "ckpt", size="tiny", format=fmt,
                             prompt_sensitive=True)
    if fmt == "meta":
        assert path.name == "sam2.1_hiera_tiny.pt"
        assert set(torch.load(path, weights_only=True)) == {"model"}
    loaded = _load(path)
    assert type(loaded) is sam2.Sam2Adapter and loaded.family == "sam2"
    assert loaded.model_id == "sam2.1-hiera-tiny"
    img, _ = embedded
    ref = sam2.Sam2Adapter(_random_model(), MODELS["sam2.1-hiera-tiny"], "cpu", torch.float32)
    e1, e2 = ref.embed(img), loaded.embed(img)
    assert torch.equal(e1.features, e2.features)
    pts = np.array([[[100.0, 80.0]], [[200.0, 150.0]]])
    for a, b in zip(ref.decode(e1, pts), loaded.decode(e2, pts)):
        assert torch.equal(a, b)


# --- preprocessing -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1500, 1100), (300, 420)])
def test_preprocess_matches_reference(shape):
    """Square resize without aspect preservation, antialiased bilinear (PIL's float resize is
    the reference for torchvision's antialiased tensor Resize), ImageNet normalisation."""
    img = _image(*shape)
    got = sam2.preprocess(img, 1024)
    assert got.shape == (1, 3, 1024, 1024)
    ref = np.stack([np.asarray(Image.fromarray(img[..., c].astype(np.float32) / 255.0, "F")
                               .resize((1024, 1024), Image.Resampling.BILINEAR))
                    for c in range(3)])
    ref = (ref - np.array(sam2.IMAGE_MEAN)[:, None, None]) / np.array(sam2.IMAGE_STD)[:, None, None]
    assert np.abs(got[0].numpy() - ref).max() < 1e-4


# --- decoding ------------------------------------------------------------------------------


def _hf_forward(adapter, emb, **kw):
    with torch.inference_mode():
        out = adapter.model(image_embeddings=[*emb.extra["high_res"], emb.features], **kw)
    return out.pred_masks[0], out.iou_scores[0]


def test_embedding_shapes(tiny, embedded):
    img, emb = embedded
    assert emb.original_size == img.shape[:2] and emb.input_size == (1024, 1024)
    assert emb.features.shape == (1, 32, 64, 64)
    assert [t.shape[-1] for t in emb.extra["high_res"]] == [256, 128]


@pytest.mark.parametrize("multimask", [True, False])
def test_points_decode_like_transformers_forward(tiny, embedded, multimask):
    """Points are normalised by the original (h, w) and scaled to 1024; the result equals
    Sam2Model.forward on the same embedding (including dynamic multimask selection)."""
    img, emb = embedded
    h, w = img.shape[:2]
    pts = np.array([[[100.0, 80.0], [300.0, 200.0]], [[20.0, 250.0], [410.0, 10.0]]])
    labels = np.array([[1, 0], [1, 1]])
    logits, iou = tiny.decode(emb, pts, labels, multimask=multimask)
    m = 3 if multimask else 1
    assert logits.shape == (2, m, 256, 256) and iou.shape == (2, m)
    scaled = torch.tensor(pts * [1024 / w, 1024 / h], dtype=torch.float32)
    ref_logits, ref_iou = _hf_forward(tiny, emb, input_points=scaled[None],
                                      input_labels=torch.tensor(labels)[None],
                                      multimask_output=multimask)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)


def test_boxes_are_corner_points_with_labels_2_and_3(tiny, embedded):
    img, emb = embedded
    h, w = img.shape[:2]
    boxes = np.array([[50.0, 40.0, 250.0, 180.0], [10.0, 10.0, 400.0, 290.0]])
    logits, iou = tiny.decode(emb, boxes=boxes, multimask=False)
    scaled = torch.tensor(boxes * ([1024 / w, 1024 / h] * 2), dtype=torch.float32)
    # transformers' own box path: corners with embeddings 2 and 3 plus a padding point
    ref_logits, ref_iou = _hf_forward(tiny, emb, input_boxes=scaled[None], multimask_output=False)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)
    # a box plus a point inside it differs from the box alone
    both, _ = tiny.decode(emb, np.array([[[150.0, 110.0]], [[200.0, 150.0]]]), np.ones((2, 1)),
                          boxes=boxes, multimask=False)
    assert not torch.allclose(both, logits)


def test_batch_equals_single_prompts_and_mask_inputs(tiny, embedded):
    _, emb = embedded
    pts = np.array([[[100.0, 80.0]], [[300.0, 200.0]], [[5.0, 5.0]]])
    logits, iou = tiny.decode(emb, pts)
    for i in range(3):
        one, one_iou = tiny.decode(emb, pts[i : i + 1])
        torch.testing.assert_close(one, logits[i : i + 1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(one_iou, iou[i : i + 1], atol=1e-5, rtol=1e-5)
    # mask prompts (use_m2m): one per prompt, each decoded against the shared embedding
    masks = logits[:, :1] * 40.0  # beyond the clamp the official predictor applies
    with_masks, _ = tiny.decode(emb, pts, mask_inputs=masks, multimask=False)
    assert with_masks.shape == (3, 1, 256, 256)
    for i in range(3):
        one, _ = tiny.decode(emb, pts[i : i + 1], mask_inputs=masks[i : i + 1].clamp(-32, 32),
                             multimask=False)
        torch.testing.assert_close(one, with_masks[i : i + 1], atol=1e-4, rtol=1e-4)
    plain, _ = tiny.decode(emb, pts, multimask=False)
    assert not torch.allclose(plain, with_masks)


def test_upscale_goes_straight_to_original_size(tiny, embedded):
    img, emb = embedded
    low = torch.randn(2, 3, 256, 256)
    up = tiny.upscale(low, emb)
    assert up.shape == (2, 3, *img.shape[:2])
    ref = torch.nn.functional.interpolate(low, img.shape[:2], mode="bilinear",
                                          align_corners=False)
    assert torch.equal(up, ref)
    with pytest.raises(ValueError, match="needs points"):
        tiny.decode(emb)
