"""SAM and SAM-HQ: Meta key layout, conversion, loading from both formats, adapter maths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from terrasam.models import get_spec, load_model
from terrasam.models import sam as samfam
from terrasam.models.sam import SamAdapter, preprocess_shape
from terrasam.testing import random_checkpoint, random_model

META_KEYS = Path(__file__).parent / "data" / "meta_keys"
IDS = ["sam-vit-b", "sam-hq-vit-b"]


def _image(h=150, w=200, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    img[20:90, 30:140] = (200, 40, 40)
    img[100:140, 120:190] = (30, 190, 70)
    return img


def _adapter(model, model_id):
    return SamAdapter(model, get_spec(model_id), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module", params=IDS)
def tiny(request, tmp_path_factory):
    """(model id, in-memory adapter, embedding of _image()) for a tiny random model."""
    model_id = request.param
    adapter = _adapter(random_model(model_id, "tiny", seed=3), model_id)
    return model_id, adapter, adapter.embed(_image())


# --- Meta layout ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sam", "sam_hq"])
@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_full_config_matches_official_meta_keys(family, variant):
    official = json.loads((META_KEYS / f"{family}_{variant}.json").read_text())["keys"]
    config = samfam.build_config(family, variant, "full")
    with torch.device("meta"):
        hf_model = samfam.model_class(family)(config)
    hf_sd = hf_model.state_dict()
    meta = samfam.hf_to_meta(hf_sd, config)
    assert {k: list(v.shape) for k, v in meta.items()} == official

    # a checkpoint with exactly the official keys converts back, architecture inferred
    fake = {k: torch.empty(shape, device="meta") for k, shape in official.items()}
    config2, hf_sd2, spec = samfam.meta_to_hf(fake)
    assert {k: tuple(v.shape) for k, v in hf_sd2.items()} == {
        k: tuple(v.shape) for k, v in hf_sd.items()}
    assert spec.family == family and spec.variant == variant
    assert spec.model_id == ("sam-hq-" if family == "sam_hq" else "sam-") + variant.replace("_", "-")
    v1, v2 = config.vision_config, config2.vision_config
    assert list(v2.global_attn_indexes) == list(v1.global_attn_indexes)
    assert (v2.hidden_size, v2.num_hidden_layers, v2.num_attention_heads, v2.window_size) == (
        v1.hidden_size, v1.num_hidden_layers, v1.num_attention_heads, v1.window_size)


@pytest.mark.parametrize("model_id", IDS)
def test_tiny_state_dict_round_trip(model_id):
    model = random_model(model_id, "tiny", seed=1)
    hf_sd = model.state_dict()
    meta = samfam.hf_to_meta(hf_sd, model.config)
    assert samfam.looks_like(meta)
    assert ("mask_decoder.hf_token.weight" in meta) == (model_id == "sam-hq-vit-b")
    config, back, spec = samfam.meta_to_hf(meta)
    assert set(back) == set(hf_sd)
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)
    assert spec.family == get_spec(model_id).family and spec.model_id.endswith("-custom")
    assert config.vision_config.global_attn_indexes == [1]
    assert config.vision_config.window_size == 8


# --- loading from both formats -------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_loaded_checkpoint_gives_identical_outputs(tiny, fmt, tmp_path):
    model_id, ref, ref_emb = tiny
    path = random_checkpoint(model_id, tmp_path / "ckpt", size="tiny", format=fmt, seed=3)
    if fmt == "meta":
        assert path.name == get_spec(model_id).meta_file
    adapter = load_model(model_id, checkpoint=path, device="cpu", dtype="float32")
    assert adapter.family == get_spec(model_id).family and adapter.model_id == model_id
    emb = adapter.embed(_image())
    assert torch.equal(emb.features, ref_emb.features)
    pts = np.array([[[50.0, 40.0]], [[150.0, 120.0]]])
    boxes = np.array([[20.0, 10.0, 150.0, 100.0], [110.0, 90.0, 199.0, 149.0]])
    lo, iou = adapter.decode(emb, pts, np.ones((2, 1)), boxes)
    lo_ref, iou_ref = ref.decode(ref_emb, pts, np.ones((2, 1)), boxes)
    assert torch.equal(lo, lo_ref) and torch.equal(iou, iou_ref)
    assert torch.equal(adapter.upscale(lo, emb), ref.upscale(lo_ref, ref_emb))


def test_meta_checkpoint_family_inferred_without_model_id(tmp_path):
    path = random_checkpoint("sam-hq-vit-b", tmp_path, size="tiny", format="meta")
    adapter = load_model(checkpoint=path, device="cpu")
    assert adapter.family == "sam_hq" and adapter.model_id == "sam-hq-custom"
    path = random_checkpoint("sam-vit-b", tmp_path, size="tiny", format="meta")
    adapter = load_model(checkpoint=path, device="cpu")
    assert adapter.family == "sam" and adapter.model_id == "sam-custom"


# --- adapter maths -------------------------------------------------------------------------

def test_preprocess_shape_rounds_like_segment_anything():
    assert preprocess_shape(150, 200, 1024) == (768, 1024)
    assert preprocess_shape(1500, 2250, 1024) == (683, 1024)  # 682.67 rounds up
    assert preprocess_shape(333, 1000, 1024) == (341, 1024)  # 340.99 -> 341
    assert preprocess_shape(1024, 1024, 1024) == (1024, 1024)


def test_points_are_mapped_to_the_resized_frame(tiny):
    """A 512 px image and its own 1024 px PIL-bilinear resize are the same model input, so a
    point at (x, y) on the first must decode exactly like (2x, 2y) on the second."""
    model_id, adapter, _ = tiny
    small = _image(512, 512, seed=5)
    big = np.array(Image.fromarray(small).resize((1024, 1024), Image.Resampling.BILINEAR))
    e_small, e_big = adapter.embed(small), adapter.embed(big)
    assert e_small.input_size == e_big.input_size == (1024, 1024)
    assert torch.equal(e_small.features, e_big.features)
    pts = np.array([[[100.0, 60.0]], [[300.5, 410.0]]])
    boxes = np.array([[10.0, 20.0, 200.0, 220.0], [250.0, 300.0, 500.0, 480.0]])
    a = adapter.decode(e_small, pts, boxes=boxes)
    b = adapter.decode(e_big, pts * 2, boxes=boxes * 2)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-6)


def test_batched_decode_equals_one_prompt_at_a_time(tiny):
    model_id, adapter, emb = tiny
    pts = np.array([[[50.0, 40.0], [10.0, 10.0]], [[150.0, 120.0], [60.0, 70.0]],
                    [[5.0, 140.0], [0.0, 0.0]]])
    labels = np.array([[1, 0], [1, 1], [1, -1]])
    lo, iou = adapter.decode(emb, pts, labels, multimask=True)
    m = 1 if model_id.startswith("sam-hq") else 3  # Meta's SAM-HQ returns its best mask only
    assert lo.shape == (3, m, 256, 256) and iou.shape == (3, m)
    assert lo.dtype == torch.float32
    for i in range(3):
        lo_i, iou_i = adapter.decode(emb, pts[i:i + 1], labels[i:i + 1])
        assert torch.allclose(lo[i], lo_i[0], atol=1e-4)
        assert torch.allclose(iou[i], iou_i[0], atol=1e-5)
    single, iou1 = adapter.decode(emb, pts, labels, multimask=False)
    assert single.shape == (3, 1, 256, 256) and iou1.shape == (3, 1)


def test_mask_inputs_refine_per_prompt(tiny):
    model_id, adapter, emb = tiny
    pts = np.array([[[50.0, 40.0]], [[150.0, 120.0]]])
    lo, iou = adapter.decode(emb, pts, multimask=False)
    refined, _ = adapter.decode(emb, pts, mask_inputs=lo, multimask=False)
    assert refined.shape == (2, 1, 256, 256)
    first, _ = adapter.decode(emb, pts[:1], mask_inputs=lo[:1], multimask=False)
    assert torch.allclose(refined[0], first[0], atol=1e-4)
    assert not torch.allclose(refined, lo)  # the mask prompt changes the prediction


def test_upscale_crops_the_padding(tiny):
    model_id, adapter, emb = tiny  # 150 x 200 image: input 768 x 1024, rows >= 192 are padding
    low = torch.full((1, 1, 256, 256), -5.0)
    low[..., 200:, :] = 5.0
    up = adapter.upscale(low, emb)
    assert up.shape == (1, 1, 150, 200)
    assert (up < 0).all()
    low = torch.full((2, 256, 256), -5.0)
    low[:, :, :64] = 5.0  # left quarter of the 1024-wide input = left quarter of the image
    up = adapter.upscale(low, emb)
    assert up.shape == (2, 150, 200)
    assert (up[:, :, :48] > 0).all() and (up[:, :, 52:] < 0).all()


def test_hq_embedding_carries_the_first_global_block(tiny):
    model_id, adapter, emb = tiny
    if model_id != "sam-hq-vit-b":
        assert emb.extra == {}
        return
    (inter,) = emb.extra["intermediate_embeddings"]
    assert inter.shape == (1, 64, 64, 32)


def test_bad_image_is_refused(tiny):
    _, adapter, _ = tiny
    with pytest.raises(ValueError, match="uint8"):
        adapter.embed(np.zeros((10, 10, 3), dtype=np.float32))


# --- random weights ------------------------------------------------------------------------

def test_random_weights_are_not_degenerate(tiny):
    model_id, adapter, emb = tiny
    assert emb.features.std() > 0.1
    pts = np.array([[[50.0, 40.0]], [[150.0, 120.0]], [[10.0, 140.0]]])
    lo, iou = adapter.decode(emb, pts)
    masks = adapter.upscale(lo, emb) > 0
    frac = masks.float().mean(dim=(-1, -2))
    assert ((frac > 0.02) & (frac < 0.98)).all(), frac  # masks vary across the image
    assert torch.isfinite(iou).all() and iou.std() > 0


def test_random_checkpoints_are_seeded():
    a = random_model("sam-vit-b", seed=7).state_dict()
    b = random_model("sam-vit-b", seed=7).state_dict()
    c = random_model("sam-vit-b", seed=8).state_dict()
    key = "vision_encoder.layers.0.attn.qkv.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


@pytest.mark.parametrize("model_id", IDS)
def test_prompt_sensitive_masks_differ_between_points(model_id):
    adapter = _adapter(random_model(model_id, prompt_sensitive=True), model_id)
    emb = adapter.embed(_image())
    pts = np.array([[[50.0, 40.0]], [[150.0, 120.0]], [[10.0, 140.0]], [[190.0, 10.0]]])
    masks = adapter.upscale(adapter.decode(emb, pts)[0], emb)[:, 0] > 0
    for i in range(4):
        for j in range(i + 1, 4):
            assert (masks[i] ^ masks[j]).float().mean() > 0.02
