"""The adapters' step-by-step decoder equals the reference decoder forward, and IoU gating
only replaces the logits of the masks it drops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from terrasam.models import sam, sam2
from terrasam.models.registry import MODELS
from terrasam.testing import random_model

ATOL_LOGITS, ATOL_IOU = 1e-4, 1e-5
IDS = ["sam-vit-b", "sam-hq-vit-b", "sam2.1-hiera-tiny"]


def _image(h=150, w=200, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=IDS)
def tiny(request):
    model_id = request.param
    model = random_model(model_id, "tiny", seed=5, prompt_sensitive=True)
    cls = sam2.Sam2Adapter if model_id.startswith("sam2") else sam.SamAdapter
    adapter = cls(model, MODELS[model_id], "cpu", torch.float32)
    return model_id, adapter, adapter.embed(_image())


def _prompts(b, seed=0):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 150, (b, 2, 2))
    labels = rng.integers(0, 2, (b, 2))
    labels[:, 0] = 1
    boxes = np.sort(rng.uniform(0, 150, (b, 2, 2)), axis=1).reshape(b, 4)
    return pts, labels, boxes


def _hq_reference(adapter, emb, kw, mask_inputs, multimask):
    """Meta's SAM-HQ decoder (sam-hq's MaskDecoderHQ) from the transformers modules, in
    transformers' output layout. (transformers' own SamHQMaskDecoder upscales the image
    embedding from before the two-way transformer, transposed; Meta's upscales its output.)"""
    model, dec = adapter.model, adapter.model.mask_decoder
    sparse, dense = model.prompt_encoder(kw.get("input_points"), kw.get("input_labels"),
                                         kw.get("input_boxes"), mask_inputs)
    b = sparse.shape[1] if sparse is not None else mask_inputs.shape[0]
    sparse = sparse.reshape(b, -1, sparse.shape[-1]) if sparse is not None else None
    dense = dense if mask_inputs is not None else dense.expand(b, -1, -1, -1)
    feats = emb.features
    vit = emb.extra["intermediate_embeddings"][0].permute(0, 3, 1, 2)
    hq_feat = dec.encoder_conv2(dec.activation(dec.encoder_norm(dec.encoder_conv1(feats))))
    hq_feat = hq_feat + dec.compress_vit_conv2(
        dec.activation(dec.compress_vit_norm(dec.compress_vit_conv1(vit))))
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight, dec.hq_token.weight])
    tokens = tokens[None].expand(b, -1, -1)
    if sparse is not None:
        tokens = torch.cat([tokens, sparse], 1)
    src = feats + dense
    pos = model.get_image_wide_positional_embeddings().expand(b, -1, -1, -1)
    hs, keys = dec.transformer(tokens[:, None], src, pos, None)
    _, c, h, w = src.shape
    src = keys[:, 0].transpose(1, 2).reshape(b, c, h, w)
    up = dec.activation(dec.upscale_layer_norm(dec.upscale_conv1(src)))
    up = dec.activation(dec.upscale_conv2(up))
    up_hq = dec.mask_conv2(dec.activation(dec.mask_norm(dec.mask_conv1(up)))) + hq_feat
    hs = hs[:, 0]
    n = len(dec.output_hypernetworks_mlps)
    hyper = torch.stack([dec.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in range(n)], 1)
    masks = (hyper @ up.flatten(2)).view(b, n, *up.shape[-2:])
    masks_hq = (dec.hq_mask_mlp(hs[:, 1 + n])[:, None] @ up_hq.flatten(2)).view(b, 1, 4 * h, -1)
    iou = dec.iou_prediction_head(hs[:, 0])
    if multimask:
        iou, idx = torch.max(iou[:, 1:n], dim=1, keepdim=True)  # Meta: one mask
        masks = masks[:, 1:n].gather(1, idx[..., None, None].expand(-1, -1, *masks.shape[-2:]))
    else:
        iou, masks = iou[:, :1], masks[:, :1]
    return masks + masks_hq, iou


def _reference(model_id, adapter, emb, pts=None, labels=None, boxes=None, mask_inputs=None,
               multimask=True):
    """The decoder forward of the reference implementation on the same prompts."""
    b = len(next(x for x in (pts, boxes, mask_inputs) if x is not None))
    with torch.inference_mode():
        if model_id.startswith("sam2"):
            h, w = emb.original_size
            scale = torch.tensor([1024 / w, 1024 / h], dtype=torch.float64)
            coords, labs = [], []
            if boxes is not None:
                coords.append(torch.as_tensor(boxes).reshape(-1, 2, 2) * scale)
                labs.append(torch.tensor([[2, 3]]).expand(b, 2))
            if pts is not None:
                coords.append(torch.as_tensor(pts) * scale)
                labs.append(torch.as_tensor(labels))
            kw = {}
            if coords:
                kw = {"input_points": torch.cat(coords, 1).float()[:, None],
                      "input_labels": torch.cat(labs, 1)[:, None]}
            high = [t.expand(b, -1, -1, -1) for t in emb.extra["high_res"]]
            if not coords:  # as sam2's predictor: no padding point without point prompts
                return _sam2_masks_only(adapter, emb, high, mask_inputs, multimask)
            out = adapter.model(image_embeddings=[*high, emb.features.expand(b, -1, -1, -1)],
                                input_masks=mask_inputs, multimask_output=multimask, **kw)
            return out.pred_masks[:, 0], out.iou_scores[:, 0]
        scale = adapter._scale(emb)
        kw = {}
        if pts is not None:
            kw["input_points"] = (torch.as_tensor(pts) * scale).float()[None]
            kw["input_labels"] = torch.as_tensor(labels)[None]
        if boxes is not None:
            bx = torch.as_tensor(boxes).reshape(-1, 2, 2) * scale
            kw["input_boxes"] = bx.reshape(1, -1, 4).float()
        if model_id == "sam-hq-vit-b":
            return _hq_reference(adapter, emb, kw, mask_inputs, multimask)
        feats = emb.features
        if mask_inputs is not None:  # mask prompts are per image in transformers
            kw = {k: v.transpose(0, 1) for k, v in kw.items()}
            feats = feats.expand(b, -1, -1, -1)
        out = adapter.model(image_embeddings=feats, input_masks=mask_inputs,
                            multimask_output=multimask, **kw)
        return out.pred_masks.reshape(b, -1, 256, 256), out.iou_scores.reshape(b, -1)


def _sam2_masks_only(adapter, emb, high, mask_inputs, multimask):
    """transformers' Sam2MaskDecoder forward without sparse tokens (Sam2Model.forward would
    add a padding point; Meta's SAM2ImagePredictor does not)."""
    model, b = adapter.model, len(mask_inputs)
    pe = model.prompt_encoder
    sparse = torch.zeros(b, 1, 0, pe.hidden_size)
    out = model.mask_decoder(
        image_embeddings=emb.features.expand(b, -1, -1, -1),
        image_positional_embeddings=model.get_image_wide_positional_embeddings().expand(
            b, -1, -1, -1),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=pe.mask_embed(mask_inputs),
        multimask_output=multimask, high_resolution_features=high)
    return out[0][:, 0], out[1][:, 0]


def _check(got, want):
    (lo, iou), (lo_ref, iou_ref) = got, want
    assert lo.shape == lo_ref.shape and iou.shape == iou_ref.shape
    assert (iou - iou_ref).abs().max() < ATOL_IOU
    assert (lo - lo_ref).abs().max() < ATOL_LOGITS * max(1.0, lo_ref.abs().max().item())
    # thresholded masks agree except within 1e-4 of the threshold
    differ = (lo > 0) != (lo_ref > 0)
    assert not differ[lo_ref.abs() > 1e-4].any()


@pytest.mark.parametrize(("kind", "multimask", "b"), [
    ("points", True, 17), ("boxes", False, 1), ("points+boxes", True, 1),
    ("points+boxes", False, 17)])
def test_decode_equals_reference_forward(tiny, kind, multimask, b):
    model_id, adapter, emb = tiny
    pts, labels, boxes = _prompts(b, seed=b)
    kw = {"points": pts, "point_labels": labels} if "points" in kind else {}
    if "boxes" in kind:
        kw["boxes"] = boxes
    got = adapter.decode(emb, multimask=multimask, **kw)
    want = _reference(model_id, adapter, emb, kw.get("points"), kw.get("point_labels"),
                      kw.get("boxes"), multimask=multimask)
    _check(got, want)


@pytest.mark.parametrize(("with_points", "b"), [(True, 5), (True, 1), (False, 3)])
def test_mask_inputs_equal_reference_forward(tiny, with_points, b):
    model_id, adapter, emb = tiny
    if not with_points and not model_id.startswith("sam2"):
        pytest.skip("SAM 1 mask-only prompts: transformers has no point batch for them")
    pts, labels, _ = _prompts(b, seed=2)
    low, _ = adapter.decode(emb, pts, labels, multimask=False)
    low = low.clamp(-32, 32)
    kw = {"points": pts, "point_labels": labels} if with_points else {}
    got = adapter.decode(emb, mask_inputs=low, multimask=False, **kw)
    want = _reference(model_id, adapter, emb, kw.get("points"), kw.get("point_labels"),
                      mask_inputs=low, multimask=False)
    _check(got, want)


@pytest.mark.parametrize("multimask", [True, False])
def test_iou_gating_drops_only_masks_below_threshold(tiny, multimask):
    model_id, adapter, emb = tiny
    pts, labels, _ = _prompts(17, seed=7)
    lo, iou = adapter.decode(emb, pts, labels, multimask=multimask)
    thresh = float(iou.flatten().median())
    glo, giou = adapter.decode(emb, pts, labels, multimask=multimask, iou_thresh=thresh)
    keep = iou >= thresh
    assert 0 < keep.sum() < keep.numel()
    if model_id.startswith("sam2") and not multimask:
        # dynamic single-mask selection needs the logits: a skipped prompt's IoU is only
        # known to be below the threshold
        assert torch.equal(giou[keep], iou[keep]) and (giou[~keep] < thresh).all()
    else:
        assert torch.equal(giou, iou)
    assert torch.isneginf(glo[~keep]).all()
    assert (glo[keep] - lo[keep]).abs().max() < 1e-5  # BLAS blocking may differ with b
    none_lo, none_iou = adapter.decode(emb, pts, labels, multimask=multimask, iou_thresh=2.0)
    assert torch.isneginf(none_lo).all()


def test_per_image_work_is_cached_per_embedding(tiny):
    model_id, adapter, emb = tiny
    pts, labels, _ = _prompts(3)
    adapter.decode(emb, pts, labels)
    first = adapter._per_image(emb)
    assert adapter._per_image(emb) is first
    other = adapter.embed(_image(seed=1))
    assert adapter._per_image(other) is not first


@pytest.mark.slow
@pytest.mark.parametrize("model_id", ["sam-vit-b", "sam2.1-hiera-tiny"])
def test_full_size_decoder_equals_reference(model_id):
    """Full-size decoder weights on a random full-size embedding (no image encoder run)."""
    model = random_model(model_id, "full", seed=1)
    cls = sam2.Sam2Adapter if model_id.startswith("sam2") else sam.SamAdapter
    adapter = cls(model, MODELS[model_id], "cpu", torch.float32)
    from terrasam.models.base import Embedding

    g = torch.Generator().manual_seed(0)
    extra = {}
    if model_id.startswith("sam2"):
        extra["high_res"] = [torch.randn(1, 32, 256, 256, generator=g),
                             torch.randn(1, 64, 128, 128, generator=g)]
    emb = Embedding(torch.randn(1, 256, 64, 64, generator=g), (1024, 1024), (1024, 1024), extra)
    pts, labels, boxes = _prompts(6)
    pts, boxes = pts * 6, boxes * 6
    for multimask in (True, False):
        got = adapter.decode(emb, pts, labels, boxes=boxes, multimask=multimask)
        _check(got, _reference(model_id, adapter, emb, pts, labels, boxes, multimask=multimask))
