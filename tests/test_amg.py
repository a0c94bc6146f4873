"""Automatic mask generation: the pure functions, the generator against a naive
re-implementation of the reference algorithm, and the fast-mode options, on synthetic
flat-colour scenes decoded by oracle adapters (no model weights)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from scipy import ndimage

from oracle import OracleAdapter
from terrasam.amg import AMGParams, AMGProfile, MaskRecord, generate
from terrasam.amg_utils import (
    batched_nms,
    build_point_grid,
    fill_small_lowres,
    generate_crop_boxes,
    masks_to_boxes,
    nms,
    remove_small_regions,
    sample_uncovered_points,
    stability_score,
)
from terrasam.errors import TerrasamError
from terrasam.models.base import Adapter, Embedding

EIGHT = np.ones((3, 3), bool)


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is faster, and immune to a busy machine's thread contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- scenes and adapters


def partition_scene(size=256, min_side=10, max_side=70, seed=0):
    """A flat-colour image fully tiled by rectangles (a random guillotine partition).

    Returns (image uint8 (size, size, 3), labels int (size, size), 1..n)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    stack, n = [(0, 0, size, size)], 0
    while stack:
        x0, y0, x1, y1 = stack.pop()
        w, h = x1 - x0, y1 - y0
        big = max(w, h) > max_side or (max(w, h) > 2 * min_side and rng.random() < 0.5)
        if big and max(w, h) >= 2 * min_side:
            if w >= h:
                c = int(rng.integers(x0 + min_side, x1 - min_side + 1))
                stack += [(x0, y0, c, y1), (c, y0, x1, y1)]
            else:
                c = int(rng.integers(y0 + min_side, y1 - min_side + 1))
                stack += [(x0, y0, x1, c), (x0, c, x1, y1)]
        else:
            n += 1
            labels[y0:y1, x0:x1] = n
    return colourise(labels, seed), labels


def label_image(labels):
    """The image LabelAdapter reads: labels (< 256) in every channel."""
    assert labels.max() < 256
    return np.dstack([labels] * 3).astype(np.uint8)


def colourise(labels, seed=0):
    """Distinct colours (>= 24 apart in some channel, none near black) for labels 1..n;
    label 0 stays black (the oracle's background)."""
    rng = np.random.default_rng(seed)
    levels = np.arange(40, 256, 24)
    palette = np.array(np.meshgrid(levels, levels, levels)).reshape(3, -1).T
    palette = palette[rng.permutation(len(palette))]
    colours = np.vstack([[0, 0, 0], palette[: labels.max()]]).astype(np.uint8)
    return colours[labels]


class LabelAdapter(Adapter):
    """A scripted model: the image's red channel is a label map; a point decodes to the
    object owning its label, with scripted masks, predicted IoUs and logit strengths.

    objects: {name: dict(labels=[...], iou=(a, b, c), soft=labels whose logits are weak)}.
    Low-resolution logits are at 1/factor of the image; upscale repeats pixels.
    """

    def __init__(self, objects, factor=1, family="sam"):
        self.model_id, self.family, self.image_size = "scripted", family, 1024
        self.mask_threshold, self.device, self.dtype = 0.0, torch.device("cpu"), torch.float32
        self.objects, self.factor = objects, factor
        self.owner = {lab: name for name, o in objects.items() for lab in o["labels"]}
        self.decoder_calls = 0
        self.mask_inputs_seen = 0
        self.honour_hint, self.hint_slack, self.hints, self.skipped = True, 0.0, [], 0

    def embed(self, image):
        h, w = image.shape[:2]
        return Embedding(features=image[..., 0].astype(np.int64), original_size=(h, w),
                         input_size=(h, w))

    def decode(self, embedding, points=None, point_labels=None, boxes=None, mask_inputs=None,
               multimask=True, iou_thresh=None):
        lab = embedding.features
        f = self.factor
        pts = torch.as_tensor(points).reshape(len(points), -1, 2).numpy()
        m = 3 if multimask else 1
        h, w = lab.shape
        logits = torch.full((len(pts), m, -(-h // f), -(-w // f)), -20.0)
        iou = torch.full((len(pts), m), 0.05)
        cache = embedding.extra.setdefault("logits", {})
        for i, (x, y) in enumerate(pts[:, 0]):
            name = self.owner.get(int(lab[int(y), int(x)]))
            if name is None:
                continue
            obj = self.objects[name]
            if name not in cache:
                full = np.where(np.isin(lab, obj["labels"]), 20.0, -20.0)
                full[np.isin(lab, obj.get("soft", []))] = 0.5
                cache[name] = torch.from_numpy(full[::f, ::f].astype(np.float32))
            logits[i] = cache[name]
            iou[i] = torch.tensor(obj.get("iou", (0.94, 0.96, 0.95))[:m])
        if mask_inputs is not None:
            self.mask_inputs_seen += len(mask_inputs)
        self.decoder_calls += len(pts)
        self.hints.append(iou_thresh)
        if iou_thresh is not None and self.honour_hint:
            # what real adapters do: no logits for masks the IoU filter drops (hint_slack > 0:
            # a faulty adapter that also skips some masks the filter keeps)
            skip = iou < iou_thresh + self.hint_slack
            self.skipped += int(skip.sum())
            logits[skip] = float("-inf")
        return logits, iou

    def upscale(self, low_res_logits, embedding):
        f = self.factor
        if f == 1:
            return low_res_logits
        up = low_res_logits.repeat_interleave(f, -2).repeat_interleave(f, -1)
        h, w = embedding.original_size
        return up[..., :h, :w]


def iou(a, b):
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return inter / union if union else 0.0


def matched(found, wanted, thr=0.9):
    """Share of masks in ``wanted`` with a mask in ``found`` at IoU >= thr."""
    if not wanted:
        return 1.0
    return sum(any(iou(w, f) >= thr for f in found) for w in wanted) / len(wanted)


def full_masks(records, shape):
    return [r.full_mask(*shape) for r in records]


# ---------------------------------------------------------------- a naive reference


def brute_nms(boxes, scores, thr):
    """Greedy NMS, one box at a time, float32 IoU as torchvision computes it."""
    boxes = np.asarray(boxes, np.float32)
    order = sorted(range(len(boxes)), key=lambda i: -float(scores[i]))  # stable
    keep = []
    for i in order:
        ok = True
        for k in keep:
            a, b = boxes[k], boxes[i]
            w = max(np.float32(0), min(a[2], b[2]) - max(a[0], b[0]))
            h = max(np.float32(0), min(a[3], b[3]) - max(a[1], b[1]))
            inter = np.float32(w * h)
            area_a = np.float32((a[2] - a[0]) * (a[3] - a[1]))
            area_b = np.float32((b[2] - b[0]) * (b[3] - b[1]))
            with np.errstate(invalid="ignore", divide="ignore"):
                v = np.float32(inter / np.float32(np.float32(area_a + area_b) - inter))
            if float(v) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def box_of(mask):
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0, 0, 0, 0]
    return [xs.min(), ys.min(), xs.max(), ys.max()]


def naive_small_regions(mask, thr):
    changed = False
    lab, n = ndimage.label(~mask, structure=EIGHT)
    sizes = np.bincount(lab.ravel())[1:]
    small = [i + 1 for i in range(n) if sizes[i] < thr]
    if small:
        mask, changed = mask | np.isin(lab, small), True
    lab, n = ndimage.label(mask, structure=EIGHT)
    sizes = np.bincount(lab.ravel())[1:]
    big = [i + 1 for i in range(n) if sizes[i] >= thr]
    if len(big) < n:
        changed = True
        mask = np.isin(lab, big or [int(np.argmax(sizes)) + 1])
    return mask, changed


def naive_generate(adapter, image, p: AMGParams):
    """The reference algorithm written plainly: every candidate upsampled to full size."""
    h, w = image.shape[:2]
    crops, layers = generate_crop_boxes((h, w), p.crop_n_layers, p.crop_overlap_ratio)
    grids = p.layer_grids()
    out = []
    for crop, layer in zip(crops, layers):
        x0, y0, x1, y1 = crop
        emb = adapter.embed(image[y0:y1, x0:x1])
        pts = grids[layer] * np.array([x1 - x0, y1 - y0], float)
        cands = []
        for s in range(0, len(pts), p.points_per_batch):
            bp = pts[s:s + p.points_per_batch]
            lo, ious = adapter.decode(emb, bp[:, None], np.ones((len(bp), 1)), multimask=True)
            up = adapter.upscale(lo, emb).numpy()
            for i in range(len(bp)):
                for m in range(up.shape[1]):
                    score = ious[i, m]
                    if p.pred_iou_thresh > 0 and not bool(score > p.pred_iou_thresh):
                        continue
                    hi, lo_ = (up[i, m] > 1).sum(), (up[i, m] > -1).sum()
                    stab = np.float32(hi) / np.float32(lo_) if lo_ else np.nan
                    if p.stability_score_thresh > 0 and not stab >= np.float32(
                            p.stability_score_thresh):
                        continue
                    mask = up[i, m] > 0
                    b = np.array(box_of(mask)) + [x0, y0, x0, y0]
                    near = [abs(b[k] - crop[k]) <= 20 and abs(b[k] - [0, 0, w, h][k]) > 20
                            for k in range(4)]
                    if any(near):
                        continue
                    full = np.zeros((h, w), bool)
                    full[y0:y1, x0:x1] = mask
                    cands.append(dict(mask=full, box=list(b), iou=float(score), crop=crop,
                                      point=bp[i] + [x0, y0]))
        keep = brute_nms([c["box"] for c in cands], [np.float32(c["iou"]) for c in cands],
                         p.box_nms_thresh)
        out += [cands[k] for k in keep]
    if len(crops) > 1:
        scores = [np.float32(1) / np.float32((c["crop"][2] - c["crop"][0])
                                             * (c["crop"][3] - c["crop"][1])) for c in out]
        out = [out[k] for k in brute_nms([c["box"] for c in out], scores, p.crop_nms_thresh)]
    if p.min_mask_region_area > 0 and out:
        scores = []
        for c in out:
            c["mask"], changed = naive_small_regions(c["mask"], p.min_mask_region_area)
            c["box"] = box_of(c["mask"])
            scores.append(0.0 if changed else 1.0)
        thr = max(p.box_nms_thresh, p.crop_nms_thresh)
        out = [out[k] for k in brute_nms([c["box"] for c in out], scores, thr)]
    return [c for c in out if c["mask"].any()]


def assert_same(records, reference, shape):
    assert len(records) == len(reference)
    for r, c in zip(records, reference):
        assert np.array_equal(r.full_mask(*shape), c["mask"])
        assert r.area == c["mask"].sum()
        assert np.allclose(r.point, c["point"])
        assert tuple(r.crop_box) == tuple(c["crop"])
        x0, y0, x1, y1 = box_of(c["mask"])
        assert r.bbox == (x0, y0, x1 + 1, y1 + 1)
        assert r.mask.shape == (y1 - y0 + 1, x1 - x0 + 1)


# ---------------------------------------------------------------- pure functions


def test_point_grid_and_crop_boxes():
    g = build_point_grid(4)
    assert g.shape == (16, 2)
    assert np.allclose(g[:4, 0], [0.125, 0.375, 0.625, 0.875]) and np.allclose(g[:4, 1], 0.125)
    boxes, layers = generate_crop_boxes((1024, 1024), 1, 512 / 1500)
    assert layers == [0, 1, 1, 1, 1]
    assert boxes == [[0, 0, 1024, 1024], [0, 0, 687, 687], [0, 338, 687, 1024],
                     [338, 0, 1024, 687], [338, 338, 1024, 1024]]
    boxes, layers = generate_crop_boxes((300, 500), 2, 512 / 1500)
    assert len(boxes) == 1 + 4 + 16 and layers.count(2) == 16
    assert all(b[2] <= 500 and b[3] <= 300 for b in boxes)


def test_stability_and_boxes():
    logits = torch.full((3, 6, 8), -5.0)
    logits[0, 1:4, 2:6] = 5.0  # 12 px, all strong
    logits[0, 1, 2] = 0.5  # one weak pixel: inside at 0, outside at +1
    logits[1, 2, 3] = 0.5  # only weak pixels
    s = stability_score(logits, 0.0, 1.0)
    assert s[0] == pytest.approx(11 / 12) and s[1] == 0.0 and torch.isnan(s[2])
    boxes = masks_to_boxes(logits > 0)
    assert boxes.tolist() == [[2, 1, 5, 3], [3, 2, 3, 2], [0, 0, 0, 0]]


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_bruteforce(thr):
    rng = np.random.default_rng(int(thr * 10))
    xy = rng.integers(0, 60, (300, 2))
    wh = rng.integers(0, 30, (300, 2))  # zero-area boxes too
    boxes = np.hstack([xy, xy + wh])
    boxes[:5] = boxes[5]  # identical boxes with tied scores
    scores = rng.choice([0.5, 0.7, 0.9, 0.95], 300).astype(np.float32)  # many ties
    keep = nms(torch.as_tensor(boxes), torch.as_tensor(scores), thr, block=64)
    assert keep.tolist() == brute_nms(boxes, scores, thr)
    # batched with one category is plain NMS
    assert batched_nms(torch.as_tensor(boxes), torch.as_tensor(scores), None, thr).tolist() == \
        keep.tolist()


def test_nms_ties_threshold_and_empty():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 7], [50, 50, 60, 60],
                          [0, 0, 0, 0], [0, 0, 0, 0]])
    scores = torch.tensor([0.8, 0.9, 0.9, 0.1, 1.0, 1.0])
    # box 2 has IoU exactly 0.7 with box 1: not suppressed at 0.7 (strictly greater)
    assert nms(boxes, scores, 0.7).tolist() == [4, 5, 1, 2, 3]
    assert nms(boxes, scores, 0.69).tolist() == [4, 5, 1, 3]
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []
    idxs = torch.tensor([0, 1, 0, 0, 1, 1])
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == [4, 5, 1, 2, 3]
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 1, 0, 1, 1]), 0.5).tolist() == \
        [4, 5, 1, 0, 3]


def test_remove_small_regions_holes_and_islands():
    mask = np.zeros((40, 40), bool)
    mask[5:25, 5:25] = True
    mask[10:13, 10:13] = False  # 9 px hole
    mask[15:25, 15:25] = False  # notch open to... the inside: 100 px hole at the corner
    mask[15:25, 15:25][:] = False
    mask[30:32, 30:32] = True  # 4 px island
    out, changed = remove_small_regions(mask, 20, "holes")
    assert changed and out[10:13, 10:13].all() and not out[20, 20]
    out, changed = remove_small_regions(out, 20, "islands")
    assert changed and not out[30:32, 30:32].any() and out[5, 5]
    assert remove_small_regions(out, 20, "islands") == (out, False) or \
        not remove_small_regions(out, 20, "islands")[1]
    tiny = np.zeros((10, 10), bool)
    tiny[1, 1] = tiny[5:7, 5:7] = True  # every island small: keep the largest
    out, changed = remove_small_regions(tiny, 50, "islands")
    assert changed and out.sum() == 4 and out[5, 5]


def test_fill_small_lowres_sam2_semantics():
    lo = torch.full((1, 20, 20), -3.0)
    lo[0, 2:12, 2:12] = 4.0
    lo[0, 5, 5] = -1.0  # 1 px hole
    lo[0, 16, 16] = 2.0  # 1 px sprinkle
    out = fill_small_lowres(lo, 2, 0.0)
    assert out[0, 5, 5] == 10.0 and out[0, 16, 16] == -10.0 and out[0, 3, 3] == 4.0
    assert torch.equal(fill_small_lowres(lo, 0, 0.0), lo)


def test_sample_uncovered_points_finds_region_centres():
    free = np.zeros((100, 100), bool)
    free[10:31, 60:81] = True  # 21 x 21 square: centre (70.5, 20.5) pixel centre
    free[80:84, 5:9] = True  # too small for radius 3
    pts, radii = sample_uncovered_points(free, 3.0, 10)
    assert tuple(pts[0]) == (70.5, 20.5) and radii[0] == pytest.approx(11.0)
    assert len(pts) > 1 and np.all(radii[1:] < radii[0]) and np.all(radii >= 3)
    assert np.all(free[pts[:, 1].astype(int), pts[:, 0].astype(int)])
    assert not np.any(pts[:, 1] >= 80)  # the 4 x 4 region is too small
    assert len(sample_uncovered_points(free, 3.0, 1)[0]) == 1


# ---------------------------------------------------------------- parameters


def test_params_family_defaults_and_errors():
    sam, sam2 = AMGParams.for_family("sam"), AMGParams.for_family("sam2")
    assert (sam.pred_iou_thresh, sam2.pred_iou_thresh, AMGParams.for_family("sam3")
            .pred_iou_thresh) == (0.88, 0.8, 0.8)
    assert sam.points_per_side == 32 and sam.points_per_batch == 64
    assert sam.crop_overlap_ratio == pytest.approx(512 / 1500) and not sam2.use_m2m
    grid = AMGParams.for_family("sam", point_grids=[[[0.5, 0.5]]])
    assert grid.points_per_side is None and len(grid.layer_grids()[0]) == 1
    with pytest.raises(TerrasamError, match="did you mean 'pred_iou_thresh'"):
        AMGParams.for_family("sam", pred_iou_tresh=0.5)
    with pytest.raises(TerrasamError, match="box_nms_thresh must be between 0 and 1"):
        AMGParams.for_family("sam", box_nms_thresh=1.5)
    with pytest.raises(TerrasamError, match="points_per_side must be an integer >= 1"):
        AMGParams.for_family("sam", points_per_side=0)
    with pytest.raises(TerrasamError, match="exactly one of points_per_side and point_grids"):
        AMGParams(points_per_side=None).validate()
    with pytest.raises(TerrasamError, match="point_grids must be a list of 2"):
        AMGParams.for_family("sam", point_grids=[[[0.5, 0.5]]], crop_n_layers=1)
    with pytest.raises(TerrasamError, match="unknown model family"):
        AMGParams.for_family("yolo")
    assert AMGParams(fast=True).pruning and not AMGParams(fast=True, prompt_pruning=False).pruning


def test_bad_inputs_are_user_errors():
    a = OracleAdapter()
    with pytest.raises(TerrasamError, match="uint8"):
        generate(a, np.zeros((8, 8, 3), np.float32), AMGParams(points_per_side=2))
    with pytest.raises(TerrasamError, match="valid mask"):
        generate(a, np.zeros((8, 8, 3), np.uint8), AMGParams(points_per_side=2),
                 valid=np.ones((4, 4), bool))


# ---------------------------------------------------------------- the generator, exact mode


def test_exact_mode_matches_naive_reference_with_crops_and_small_regions():
    _, labels = partition_scene(192, min_side=8, max_side=60, seed=3)
    image = label_image(labels)
    # make some masks with holes and islands: objects owning several labels
    objects = {k: dict(labels=[k]) for k in range(1, labels.max() + 1)}
    ks = list(objects)
    objects[ks[0]]["labels"] += [ks[-1]]  # an island far away
    objects.pop(ks[-1])
    objects[ks[1]]["iou"] = (0.5, 0.6, 0.7)  # fails pred_iou_thresh
    objects[ks[2]]["soft"] = [ks[2]]  # unstable
    p = AMGParams(points_per_side=12, points_per_batch=16, crop_n_layers=1,
                  min_mask_region_area=150)
    for factor in (2,):  # low-res logits at half size: upscale() must be used
        adapter = LabelAdapter(objects, factor=factor)
        im = image if factor == 1 else np.repeat(np.repeat(image[::2, ::2], 2, 0), 2, 1)
        records = generate(adapter, im, p)
        reference = naive_generate(LabelAdapter(objects, factor=factor), im, p)
        assert len(records) > 10
        assert_same(records, reference, im.shape[:2])


def test_oracle_finds_every_object_exactly():
    rng = np.random.default_rng(1)
    labels = np.zeros((256, 256), np.int32)
    for k in range(1, 9):
        y, x = 20 + 56 * ((k - 1) // 4), 16 + 60 * ((k - 1) % 4)
        labels[y:y + int(rng.integers(30, 50)), x:x + int(rng.integers(30, 50))] = k
    image = colourise(labels, 1)
    adapter = OracleAdapter()
    prof = AMGProfile()
    records = generate(adapter, image, AMGParams(points_per_side=16), profile=prof)
    assert len(records) == 8
    masks = full_masks(records, labels.shape)
    assert matched(masks, [labels == k for k in range(1, 9)], thr=1.0) == 1.0
    assert all(isinstance(r, MaskRecord) and r.predicted_iou == pytest.approx(0.96)
               and r.stability_score == 1.0 for r in records)
    assert prof.decoder_calls == adapter.decoder_calls == 256 and prof.embed_calls == 1
    assert prof.masks == 8 and prof.coverage == pytest.approx((labels > 0).mean())
    assert prof.total_s >= prof.decode_s > 0


def test_filters_predicted_iou_and_stability():
    labels = np.zeros((96, 96), np.int32)
    labels[10:40, 10:40], labels[10:40, 55:85], labels[55:85, 10:40] = 1, 2, 3
    labels[60:80, 60:80] = 4
    soft = np.zeros_like(labels)
    soft[10:40, 55:85] = 0
    objects = {1: dict(labels=[1]), 2: dict(labels=[2], iou=(0.5, 0.6, 0.87)),
               3: dict(labels=[3, 5], soft=[5]), 4: dict(labels=[4], soft=[4])}
    labels[55:85, 10:20] = 5  # a third of object 3 is weak: stability 2/3
    image = np.dstack([labels, labels, labels]).astype(np.uint8)
    found = {tuple(r.bbox) for r in generate(LabelAdapter(objects), image,
                                             AMGParams(points_per_side=8))}
    assert found == {(10, 10, 40, 40)}
    low = generate(LabelAdapter(objects), image,
                   AMGParams(points_per_side=8, pred_iou_thresh=0.8, stability_score_thresh=0.6))
    assert {r.bbox for r in low} == {(10, 10, 40, 40), (55, 10, 85, 40), (10, 55, 40, 85)}
    assert sorted(round(r.stability_score, 3) for r in low) == [0.667, 1.0, 1.0]
    none = generate(LabelAdapter(objects), image,
                    AMGParams(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0))
    assert len(none) == 4  # object 4 only has weak logits: mask > 0 but unstable


def test_crop_layers_prefer_smaller_crops_and_drop_cut_masks():
    labels = np.zeros((256, 256), np.int32)
    labels[30:60, 30:60] = 1  # inside the top-left crop
    labels[100:160, 100:160] = 2  # spans the centre: cut by every layer-1 crop's edge
    image = colourise(labels, 2)
    records = generate(OracleAdapter(), image, AMGParams(points_per_side=8, crop_n_layers=1))
    by_box = {r.bbox: r for r in records}
    assert set(by_box) == {(30, 30, 60, 60), (100, 100, 160, 160)}
    assert by_box[(30, 30, 60, 60)].crop_box != (0, 0, 256, 256)  # the smaller crop won
    assert by_box[(100, 100, 160, 160)].crop_box == (0, 0, 256, 256)


def test_min_mask_region_area_fills_holes_and_drops_islands():
    labels = np.zeros((128, 128), np.int32)
    labels[10:60, 10:60] = 1
    labels[20:24, 20:24] = 2  # 16 px hole: filled
    labels[30:50, 30:50] = 3  # 400 px hole: kept
    labels[100:104, 100:104] = 4  # 16 px island of object 1: removed
    objects = {1: dict(labels=[1, 4])}
    image = np.dstack([labels] * 3).astype(np.uint8)
    p = AMGParams(points_per_side=16, min_mask_region_area=100)
    (rec,) = generate(LabelAdapter(objects), image, p)
    full = rec.full_mask(128, 128)
    assert rec.bbox == (10, 10, 60, 60) and full[20:24, 20:24].all()
    assert not full[30:50, 30:50].any() and not full[100:104, 100:104].any()
    assert rec.area == 2500 - 400
    # without the option the island stays and the box spans it
    (rec,) = generate(LabelAdapter(objects), image, AMGParams(points_per_side=16))
    assert rec.bbox == (10, 10, 104, 104) and rec.area == 2500 - 16 - 400 + 16


def test_m2m_refines_every_candidate():
    _, labels = partition_scene(128, min_side=16, max_side=48, seed=5)
    image = label_image(labels)
    adapter = LabelAdapter({k: dict(labels=[k]) for k in range(1, labels.max() + 1)},
                           family="sam2")
    prof = AMGProfile()
    p = AMGParams.for_family("sam2", points_per_side=8, use_m2m=True)
    records = generate(adapter, image, p, profile=prof)
    assert adapter.mask_inputs_seen == 64 * 3 and prof.decoder_calls == 64 + 64 * 3
    assert matched(full_masks(records, labels.shape),
                   [labels == k for k in np.unique(labels)], 1.0) >= 0.5


def records_equal(a, b):
    assert len(a) == len(b)
    for r, q in zip(a, b):
        assert np.array_equal(r.mask, q.mask)
        assert (r.bbox, r.area, r.point, r.crop_box) == (q.bbox, q.area, q.point, q.crop_box)
        assert (r.predicted_iou, r.stability_score) == (q.predicted_iou, q.stability_score)


def test_iou_hint_changes_nothing():
    _, labels = partition_scene(128, min_side=12, max_side=40, seed=7)
    image = label_image(labels)
    # predicted IoUs below, exactly at (dropped: the filter is "> thresh") and above 0.9
    choices = [(0.9, 0.95, 0.85), (0.5, 0.9, 0.93), (0.91, 0.6, 0.9), (0.2, 0.3, 0.9)]
    objects = {k: dict(labels=[k], iou=choices[k % 4]) for k in range(1, labels.max() + 1)}

    def run(honour, slack=0.0, **kw):
        adapter = LabelAdapter(objects, factor=2, family=kw.pop("family", "sam"))
        adapter.honour_hint, adapter.hint_slack = honour, slack
        prof = AMGProfile()
        p = AMGParams(points_per_side=10, points_per_batch=32, decode_batch=32,
                      pred_iou_thresh=0.9, stability_score_thresh=0.0, box_nms_thresh=1.0, **kw)
        return generate(adapter, image, p, profile=prof), adapter, prof

    ignored, _, prof_ignored = run(False)
    hinted, adapter, prof = run(True)
    assert len(ignored) > 50 and adapter.skipped > 100
    assert set(adapter.hints) == {0.9}
    records_equal(hinted, ignored)
    assert prof.decoder_calls == prof_ignored.decoder_calls == 100
    # an adapter that skips masks the filter keeps: decoded again without the hint
    faulty, adapter, prof = run(True, slack=0.04)
    records_equal(faulty, ignored)
    assert None in adapter.hints and prof.decoder_calls > 100
    # with m2m the hint goes to the refinement, not to the first decode
    m2m_ignored, _, _ = run(False, use_m2m=True, family="sam2")
    m2m, adapter, _ = run(True, use_m2m=True, family="sam2")
    records_equal(m2m, m2m_ignored)
    # 4 batches of prompts, then 3 + 3 + 3 + 1 refinement calls of <= 32 candidates
    assert adapter.hints == ([None] + [0.9] * 3) * 3 + [None, 0.9] and adapter.skipped


def test_no_iou_filter_no_hint():
    adapter = LabelAdapter({1: dict(labels=[1])})
    generate(adapter, np.ones((32, 32, 3), np.uint8),
             AMGParams(points_per_side=4, pred_iou_thresh=0.0))
    assert adapter.hints == [None]


def test_mask_stats_numpy_and_torch_paths_agree():
    from terrasam.amg import _mask_stats, _mask_stats_torch

    rng = np.random.default_rng(0)
    up = torch.from_numpy((rng.normal(size=(6, 40, 50)) * 2).astype(np.float32))
    up[1] = -5.0  # empty at both cut-offs
    up[2] = 0.5  # empty above the high cut only: stability 0
    up[3] = -3.0
    up[3, 5:9, 7:30] = 3.0
    u = up.numpy()
    stab, boxes = _mask_stats(u, u.max(2), 0.0, 1.0)
    stab_t, boxes_t = _mask_stats_torch(up, 0.0, 1.0)
    assert np.isnan(stab[1]) and stab[2] == 0.0 and stab[3] == 1.0
    assert tuple(boxes[3]) == (7, 5, 29, 8) and tuple(boxes[1]) == (-1, -1, -1, -1)
    assert np.array_equal(stab, stab_t, equal_nan=True) and np.array_equal(boxes, boxes_t)
    naive = [np.float32((m > 1).sum()) / np.float32((m > -1).sum()) for m in u[[0, 4, 5]]]
    assert np.array_equal(stab[[0, 4, 5]], naive)
    assert [tuple(b) for b in boxes[[0, 4, 5]]] == [tuple(box_of(m > 0)) for m in u[[0, 4, 5]]]


# ---------------------------------------------------------------- valid (nodata) handling


def test_valid_mask_skips_nodata_prompts_and_masks():
    labels = np.zeros((128, 128), np.int32)
    labels[10:50, 10:50] = 1  # all valid
    labels[70:110, 80:120] = 2  # all nodata
    labels[70:110, 40:80] = 3  # 3/4 valid: kept, clipped
    labels[10:50, 60:100] = 4  # 1/4 valid: dropped
    image = colourise(labels, 4)
    valid = np.zeros((128, 128), bool)
    valid[:, :70] = True
    a, b = OracleAdapter(), OracleAdapter()
    p = AMGParams(points_per_side=16)
    base = generate(a, image, p)
    recs = generate(b, image, p, valid=valid)
    assert len(base) == 4 and b.decoder_calls < a.decoder_calls
    assert b.decoder_calls == int((build_point_grid(16)[:, 0] * 128 < 70).sum())
    assert {r.bbox for r in recs} == {(10, 10, 50, 50), (40, 70, 70, 110)}
    assert all(not (r.full_mask(128, 128) & ~valid).any() for r in recs)
    # an all-valid mask changes nothing
    again = generate(OracleAdapter(), image, p, valid=np.ones((128, 128), bool))
    assert [r.bbox for r in again] == [r.bbox for r in base]


# ---------------------------------------------------------------- fast mode


def test_prompt_pruning_keeps_objects_with_far_fewer_decoder_calls():
    _, labels = partition_scene(192, min_side=8, max_side=48, seed=7)
    image = label_image(labels)
    objects = {k: dict(labels=[k]) for k in range(1, labels.max() + 1)}
    full_prof, fast_prof = AMGProfile(), AMGProfile()
    full = generate(LabelAdapter(objects), image, AMGParams(points_per_side=32),
                    profile=full_prof)
    fast = generate(LabelAdapter(objects), image, AMGParams(points_per_side=32, fast=True),
                    profile=fast_prof)
    kept = matched(full_masks(fast, labels.shape), full_masks(full, labels.shape), 0.9)
    assert len(full) > 40 and kept >= 0.95
    assert full_prof.decoder_calls == 1024
    assert fast_prof.decoder_calls <= 0.3 * full_prof.decoder_calls


def test_coverage_passes_raise_coverage():
    _, labels = partition_scene(256, min_side=10, max_side=40, seed=11)
    image = label_image(labels)
    objects = {k: dict(labels=[k]) for k in range(1, labels.max() + 1)}
    profs = []
    for passes in (0, 3):
        prof = AMGProfile()
        generate(LabelAdapter(objects), image,
                 AMGParams(points_per_side=6, coverage_passes=passes, coverage_min_radius=4),
                 profile=prof)
        profs.append(prof)
    assert profs[0].coverage < 0.75
    assert profs[1].coverage >= 0.95 and profs[1].masks > profs[0].masks
    assert profs[1].decoder_calls > profs[0].decoder_calls


def test_fast_with_coverage_on_nodata_scene():
    image, labels = partition_scene(256, min_side=10, max_side=60, seed=13)
    valid = np.ones((256, 256), bool)
    valid[:, 200:] = False
    prof = AMGProfile()
    recs = generate(OracleAdapter(), image, AMGParams(points_per_side=16, fast=True,
                                                       coverage_passes=2), valid=valid,
                    profile=prof)
    assert prof.valid_pixels == valid.sum() and prof.coverage > 0.9
    assert all(r.bbox[2] <= 200 for r in recs)


# ---------------------------------------------------------------- tiny random real models


def _model_helpers():
    """load_model and random_checkpoint when the model layer provides them, else None."""
    try:
        models = importlib.import_module("terrasam.models")
        testing = importlib.import_module("terrasam.testing")
    except ImportError:
        return None
    if not (hasattr(models, "load_model") and hasattr(testing, "random_checkpoint")):
        return None
    return models.load_model, testing.random_checkpoint


@pytest.mark.parametrize("model_id", ["sam-vit-b", "sam2.1-hiera-tiny"])
def test_tiny_random_model_runs_exact_and_fast(model_id, tmp_path):
    helpers = _model_helpers()
    if helpers is None:
        pytest.skip("terrasam.models.load_model / terrasam.testing.random_checkpoint missing")
    load_model, random_checkpoint = helpers
    path = random_checkpoint(model_id, tmp_path / "ckpt", size="tiny", format="meta", seed=0,
                             prompt_sensitive=True)
    adapter = load_model(model_id, checkpoint=str(path), device="cpu")
    image, _ = partition_scene(160, min_side=16, max_side=60, seed=2)
    p = AMGParams.for_family(adapter.family, points_per_side=6, pred_iou_thresh=0.0,
                             stability_score_thresh=0.0, box_nms_thresh=1.0)
    prof = AMGProfile()
    records = generate(adapter, image, p, profile=prof)
    assert prof.decoder_calls == 36 and prof.embed_calls == 1
    for r in records:
        x0, y0, x1, y1 = r.bbox
        assert r.mask.shape == (y1 - y0, x1 - x0) and r.area == r.mask.sum() > 0
        assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 160
    # the same masks from the naive full-resolution pipeline (empty masks aside)
    reference = naive_generate(adapter, image, p)
    assert_same(records, reference, (160, 160))
    # with an IoU filter the adapter gets the hint and may skip logits: still the same masks
    ious = adapter.decode(adapter.embed(image), build_point_grid(6)[:, None] * 160,
                          np.ones((36, 1)), multimask=True)[1].numpy()
    p.pred_iou_thresh = float(np.clip(np.quantile(ious, 0.4), 0.0, 1.0))
    hinted = generate(adapter, image, p)
    assert 0 < len(hinted) < len(records)
    assert_same(hinted, naive_generate(adapter, image, p), (160, 160))
    fast = generate(adapter, image, AMGParams.for_family(adapter.family, points_per_side=6,
                                                          fast=True, coverage_passes=1))
    assert isinstance(fast, list)
