"""SAM 3 with a tiny random checkpoint in facebook/sam3's layout (detector + tracker) and a
tiny tokenizer: text concepts, exemplars, point/box prompts through the tracker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from terrasam.errors import TerrasamError
from terrasam.models import sam3


def tiny_tokenizer():
    """A CLIP BPE tokenizer over lowercase letters plus a few merges (no hub files)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for suffix in ("", "</w>"):
        for c in letters:
            vocab[c + suffix] = len(vocab)
    merges = [("p", "o"), ("o", "l</w>"), ("po", "ol</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from terrasam.testing import random_checkpoint

    path = random_checkpoint("sam3", tmp_path_factory.mktemp("sam3") / "tiny", size="tiny",
                             format="hf", prompt_sensitive=True)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(folder):
    from terrasam.models import load_model

    return load_model(checkpoint=str(folder), device="cpu", dtype="float32")


def _image(h=240, w=330):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[60:150, 100:250] = (30, 120, 230)
    return img


def test_tokenizer_is_the_tiny_one(adapter):
    ids, mask = adapter._text("Swimming pool")
    assert ids.shape == mask.shape == (1, sam3.TEXT_LENGTH)
    assert ids[0, 0].item() == 0 and int(mask.sum()) == 11  # bos, 8 + 1 word pieces, eos
    assert ids[0, 10].item() == 1 and ids[0, 9].item() == 56  # "pool</w>" is one merged token


def test_segment_text_matches_reference_post_processing(adapter):
    img = _image()
    h, w = img.shape[:2]
    emb = adapter.embed(img)
    results = adapter.segment_text(img, "swimming pool", score_threshold=0.0, mask_threshold=0.5,
                                   embedding=emb)
    n = adapter.model.config.detr_decoder_config.num_queries
    assert len(results) == n
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    for r in results:
        assert r["mask"].shape == (h, w) and r["mask"].dtype == bool
        assert len(r["box"]) == 4
    # reference: the whole model on pixel values, post-processed step by step
    ids, mask = adapter._text("swimming pool")
    with torch.inference_mode():
        out = adapter.model(pixel_values=sam3.preprocess(img, 1008), input_ids=ids,
                            attention_mask=mask)
    ref_scores = torch.sigmoid(out.pred_logits[0]) * torch.sigmoid(out.presence_logits[0])
    order = torch.argsort(ref_scores, descending=True)
    np.testing.assert_allclose(scores, ref_scores[order].numpy(), rtol=1e-5, atol=1e-6)
    for r, q in zip(results, order.tolist()):
        prob = torch.sigmoid(out.pred_masks[0, q])[None, None]
        up = torch.nn.functional.interpolate(prob, size=(h, w), mode="bilinear")[0, 0]
        agree = np.mean(r["mask"] == (up > 0.5).numpy())
        assert agree > 0.999
        x0, y0, x1, y1 = out.pred_boxes[0, q].tolist()
        np.testing.assert_allclose(r["box"], [x0 * w, y0 * h, x1 * w, y1 * h], rtol=1e-4)
    # thresholds filter instances and pixels
    high = sorted(scores)[len(scores) // 2]
    kept = adapter.segment_text(img, "swimming pool", score_threshold=high, embedding=emb)
    assert len(kept) == sum(s > high for s in scores)
    strict = adapter.segment_text(img, "swimming pool", score_threshold=0.0, mask_threshold=0.9,
                                  embedding=emb)
    assert sum(r["mask"].sum() for r in strict) < sum(r["mask"].sum() for r in results)


def test_embedding_reuse_gives_same_results(adapter):
    img = _image()
    emb = adapter.embed(img)
    a = adapter.segment_text(img, "pool", score_threshold=0.0, embedding=emb)
    b = adapter.segment_text(img, "pool", score_threshold=0.0)
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b])
    c = adapter.segment_text(img, "tree", score_threshold=0.0, embedding=emb)
    assert [r["score"] for r in a] != pytest.approx([r["score"] for r in c])


@pytest.mark.parametrize("shape", [(1500, 1100), (240, 330)])
def test_preprocess_matches_reference(shape):
    """Resize to 1008 x 1008 (PIL's antialiased bilinear on uint8 as the reference), [0, 1],
    normalised with the processor's mean and std (0.5)."""
    img = _image(*shape)
    got = sam3.preprocess(img, 1008)[0].numpy()
    ref = np.asarray(Image.fromarray(img).resize((1008, 1008), Image.Resampling.BILINEAR))
    ref = (ref.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    assert got.shape == (3, 1008, 1008)
    assert np.abs(got - ref).max() <= 2.5 * 2 / 255  # uint8 rounding differences only
    assert np.abs(got - ref).mean() < 0.5 * 2 / 255


def test_meta_checkpoints_are_refused(adapter):
    meta = {"detector.backbone.vision_backbone.trunk.patch_embed.proj.weight": torch.zeros(1)}
    assert sam3.looks_like(meta)
    assert not sam3.looks_like({"image_encoder.trunk.pos_embed": torch.zeros(1)})
    with pytest.raises(TerrasamError, match="Hugging Face folder"):
        sam3.meta_to_hf(meta)
    with pytest.raises(TerrasamError, match="empty"):
        adapter.segment_text(_image(64, 64), "  ")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    from terrasam.models import load_model
    from terrasam.testing import random_checkpoint

    path = random_checkpoint("sam3", tmp_path / "notok", size="tiny", format="hf")
    adapter = load_model(checkpoint=str(path), device="cpu", dtype="float32")
    with pytest.raises(TerrasamError, match="tokenizer"):
        adapter.segment_text(_image(64, 64), "pool")


# ------------------------------------------------------------------ the checkpoint's layout


def test_checkpoint_is_in_facebook_sam3_layout(folder):
    import json

    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "sam3_video"
    assert config["tracker_config"]["model_type"] == "sam3_tracker_video"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        tops = {k.split(".")[0] for k in f.keys()}
        keys = list(f.keys())
    assert tops == {"detector_model", "tracker_model", "tracker_neck"}
    assert not any(k.startswith("tracker_model.vision_encoder") for k in keys)  # shared backbone
    assert not any(k.startswith("tracker_model.tracker_model.") for k in keys)


# ------------------------------------------------------------------ points and boxes


def _reference_tracker(folder):
    """transformers' own loading of the tracker (its sam3_tracker weight renaming)."""
    from transformers import Sam3TrackerModel
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = Sam3TrackerModel.from_pretrained(folder, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    return model.eval()


def test_decode_matches_transformers_tracker(adapter, folder):
    img = _image()
    h, w = img.shape[:2]
    emb = adapter.embed(img)
    pts = np.array([[[50.0, 60.0], [200.0, 100.0]], [[250.0, 150.0], [30.0, 200.0]]])
    labels = np.array([[1, 0], [1, 1]])
    boxes = np.array([[40.0, 30.0, 160.0, 120.0], [180.0, 90.0, 320.0, 230.0]])
    low, iou = adapter.decode(emb, points=pts, point_labels=labels, multimask=True)
    assert low.shape == (2, 3, 288, 288) and iou.shape == (2, 3) and adapter.low_res_size == 288
    low_b, iou_b = adapter.decode(emb, boxes=boxes, multimask=False)
    assert low_b.shape == (2, 1, 288, 288) and iou_b.shape == (2, 1)
    up = adapter.upscale(low[:, 0], emb)
    assert up.shape == (2, h, w)
    ref = _reference_tracker(folder)
    scale = torch.tensor([1008 / w, 1008 / h])
    x = sam3.preprocess(img, 1008).expand(2, -1, -1, -1)
    with torch.inference_mode():
        out = ref(pixel_values=x, input_points=(torch.tensor(pts).float() * scale)[:, None],
                  input_labels=torch.tensor(labels)[:, None])
        out_b = ref(pixel_values=x,
                    input_boxes=(torch.tensor(boxes).float().reshape(2, 2, 2) * scale)
                    .reshape(2, 1, 4), multimask_output=False)
    torch.testing.assert_close(low, out.pred_masks[:, 0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(iou, out.iou_scores[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low_b, out_b.pred_masks[:, 0], atol=2e-4, rtol=1e-4)
    # the prompt decides the mask
    masks = (up > 0).numpy()
    assert (masks[0] != masks[1]).mean() > 0.01


def test_tracker_shares_the_detector_backbone(adapter):
    backbone = adapter.model.vision_encoder.backbone
    assert adapter.tracker.model.vision_encoder.backbone is backbone
    calls = []
    handle = backbone.register_forward_hook(lambda *a: calls.append(1))
    try:
        img = _image(128, 128)
        emb = adapter.embed(img)
        adapter.segment_text(img, "pool", score_threshold=0.0, embedding=emb)
        adapter.decode(emb, points=np.array([[[64.0, 64.0]]]))
        adapter.decode(emb, boxes=np.array([[10.0, 10.0, 90.0, 70.0]]))
    finally:
        handle.remove()
    assert len(calls) == 1  # one ViT run serves text and points/boxes
    assert "tracker" in emb.extra


def test_detector_only_folder_refuses_points_in_one_sentence(tmp_path):
    from terrasam.models import load_model
    from terrasam.testing import random_model

    random_model("sam3", size="tiny").save_pretrained(tmp_path / "detector")
    adapter = load_model(checkpoint=str(tmp_path / "detector"), device="cpu", dtype="float32")
    emb = adapter.embed(_image(64, 64))
    with pytest.raises(TerrasamError, match="only the concept detector") as err:
        adapter.decode(emb, points=np.array([[[10.0, 10.0]]]))
    assert "\n" not in str(err.value) and "sam3_video" in str(err.value)


def test_missing_tracker_tensor_is_named(folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from terrasam.models import load_model

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["tracker_model.mask_decoder.iou_token.weight"]
    save_file(state, str(broken / "model.safetensors"))
    adapter = load_model(checkpoint=str(broken), device="cpu", dtype="float32")
    with pytest.raises(TerrasamError, match="mask_decoder.iou_token.weight"):
        adapter.decode(adapter.embed(_image(64, 64)), points=np.array([[[10.0, 10.0]]]))


# ------------------------------------------------------------------ exemplars


def test_roi_align_samples_bilinearly():
    """A linear map averages to its value at each bin centre; a constant stays constant."""
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(20.0), indexing="ij")
    feats = torch.stack([2 * xs + ys, torch.full_like(xs, 3.0)])[None]
    box = (2.0, 3.0, 12.5, 11.0)
    out = sam3.roi_align(feats, torch.tensor([box]), 7)
    assert out.shape == (1, 2, 7, 7)
    cx = box[0] + (torch.arange(7) + 0.5) * (box[2] - box[0]) / 7
    cy = box[1] + (torch.arange(7) + 0.5) * (box[3] - box[1]) / 7
    torch.testing.assert_close(out[0, 0], 2 * cx[None, :] + cy[:, None], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0, 1], torch.full((7, 7), 3.0))
    # samples past the last row/column take the edge value; further than 1 px outside: 0
    edge = sam3.roi_align(feats, torch.tensor([[18.0, 14.0, 20.5, 16.5]]), 1)
    assert 0 < edge[0, 1, 0, 0] <= 3.0


def test_exemplar_prompt_matches_sam3_forward_with_boxes(adapter, monkeypatch):
    """concept_prompt + segment_concept == Sam3Model.forward(input_boxes=...) (torchvision's
    roi_align stood in for by terrasam's)."""
    import types

    import transformers.models.sam3.modeling_sam3 as ms

    monkeypatch.setattr(ms, "torchvision", types.SimpleNamespace(ops=types.SimpleNamespace(
        roi_align=lambda f, b, s: sam3.roi_align(f, b[0], s))), raising=False)
    img = _image()
    h, w = img.shape[:2]
    emb = adapter.embed(img)
    boxes = np.array([[100.0, 60.0, 250.0, 150.0], [10.0, 10.0, 60.0, 50.0]])
    made = adapter.concept_prompt("pool", [(emb, boxes, [1, 0])])
    assert made.features.shape[1] == sam3.TEXT_LENGTH + 3 and made.label == "pool"
    got = adapter.segment_concept(img, made, score_threshold=0.0, embedding=emb)
    ids, mask = adapter._text("pool")
    norm = sam3._box_cxcywh(torch.tensor(boxes) / torch.tensor([w, h, w, h]))[None].float()
    with torch.inference_mode():
        out = adapter.model(pixel_values=sam3.preprocess(img, 1008), input_ids=ids,
                            attention_mask=mask, input_boxes=norm,
                            input_boxes_labels=torch.tensor([[1, 0]]))
    ref = torch.sigmoid(out.pred_logits[0]) * torch.sigmoid(out.presence_logits[0])
    np.testing.assert_allclose([r["score"] for r in got],
                               torch.sort(ref, descending=True).values.numpy(), atol=1e-5)
    text_only = adapter.segment_text(img, "pool", score_threshold=0.0, embedding=emb)
    assert [r["score"] for r in got] != pytest.approx([r["score"] for r in text_only])
    visual = adapter.concept_prompt(None, [(emb, boxes[:1], [1])])
    assert visual.label == "exemplar" and visual.features.shape[1] == sam3.TEXT_LENGTH + 2


def test_registry_parameter_count_is_detector_plus_tracker_without_the_shared_backbone():
    from transformers import Sam3TrackerConfig, Sam3TrackerModel

    from terrasam.models import get_spec

    config = sam3.build_video_config("full")
    tracker_config = config.tracker_config
    if isinstance(tracker_config, dict):
        tracker_config = Sam3TrackerConfig(**tracker_config)
    with torch.device("meta"):
        detector = sam3.model_class()(sam3.build_config("sam3", "sam3", "full"))
        tracker = Sam3TrackerModel(tracker_config)
    n = sum(p.numel() for p in detector.parameters()) + sum(
        v.numel() for k, v in tracker.state_dict().items()
        if not k.startswith("vision_encoder.backbone."))
    assert get_spec("sam3").params_m == pytest.approx(n / 1e6, abs=0.05)
