"""SAM 3: text-concept segmentation with a tiny random model and a tiny tokenizer."""

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
                             format="hf")
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


def test_point_prompts_and_meta_checkpoints_are_refused(adapter):
    emb = adapter.embed(_image(64, 64))
    with pytest.raises(TerrasamError, match="--text"):
        adapter.decode(emb, points=np.array([[[10.0, 10.0]]]))
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
