"""Small pure functions behind the automatic mask generator.

Point grids, crop boxes, stability score, mask boxes, box NMS, small-region removal and
prompt sampling for coverage passes. Each follows the semantics of Meta's reference
generators (segment_anything / sam2) where one exists, so that terrasam's generator can
reproduce their masks; none of them touches a model.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import torch
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity, as the references use


def build_point_grid(n_per_side: int) -> np.ndarray:
    """An (n*n, 2) grid of (x, y) points at cell centres of [0, 1]^2, x varying fastest."""
    half = 1.0 / (2 * n_per_side)
    side = np.linspace(half, 1.0 - half, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_layer_point_grids(n_per_side: int, n_layers: int, downscale: int) -> list[np.ndarray]:
    """One normalised grid per crop layer; layer i has n / downscale**i points per side."""
    return [build_point_grid(int(n_per_side / (downscale**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (x0, y0, x1, y1) and their layer: the whole image, then 2^i x 2^i crops
    per layer i >= 1 overlapping by a share of the short side."""
    im_h, im_w = im_size
    short = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for layer in range(n_layers):
        per_side = 2 ** (layer + 1)
        overlap = int(overlap_ratio * short * (2 / per_side))
        crop_w = int(math.ceil((overlap * (per_side - 1) + im_w) / per_side))
        crop_h = int(math.ceil((overlap * (per_side - 1) + im_h) / per_side))
        xs = [int((crop_w - overlap) * i) for i in range(per_side)]
        ys = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0, y0 in product(xs, ys):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer + 1)
    return boxes, layers


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks binarised at ``threshold + offset`` and ``threshold - offset``.

    The first is always inside the second, so the IoU is a ratio of pixel counts
    (NaN for a mask empty at both cut-offs, which no threshold keeps).
    """
    high = (logits > (mask_threshold + offset)).sum(-1, dtype=torch.int32).sum(-1)
    low = (logits > (mask_threshold - offset)).sum(-1, dtype=torch.int32).sum(-1)
    return high / low


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) int64 boxes (x0, y0, x1, y1) with *inclusive* x1, y1.

    An empty mask gets (0, 0, 0, 0), as in the reference generators.
    """
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.int64, device=masks.device)
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, ar_h, -1).amax(dim=1)
    y0 = torch.where(rows, ar_h, h).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=1)
    x0 = torch.where(cols, ar_w, w).amin(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    empty = ~rows.any(dim=1)
    return torch.where(empty[:, None], torch.zeros_like(boxes), boxes)


def box_near_crop_edge(
    boxes: np.ndarray, crop_box, image_box, atol: float = 20.0
) -> np.ndarray:
    """True for crop-local boxes within ``atol`` px of a crop edge that is not an image edge."""
    crop = np.asarray(crop_box, dtype=np.float32)
    image = np.asarray(image_box, dtype=np.float32)
    offset = np.array([crop[0], crop[1], crop[0], crop[1]], dtype=np.float32)
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) + offset
    near_crop = np.abs(b - crop[None]) <= atol
    near_image = np.abs(b - image[None]) <= atol
    return np.any(near_crop & ~near_image, axis=1)


def _threshold_below(t: float) -> np.float32:
    """The float32 cut c with ``x > c`` iff ``x > t`` (t compared as a double) for float32 x."""
    c = np.float32(t)
    if float(c) > t:
        c = np.nextafter(c, np.float32(-np.inf))
    return c


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
        block: int = 1024) -> torch.Tensor:
    """Greedy box non-maximum suppression with torchvision's semantics.

    Boxes are sorted by score, descending and stable (ties keep input order); a box is
    dropped when its IoU with an already kept box is > ``iou_threshold``; IoU is computed
    in float32 as ``inter / (area_i + area_j - inter)`` with area ``(x1-x0)*(y1-y0)``.
    Returns kept indices in the order kept (decreasing score).
    """
    n = int(boxes.shape[0])
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
    b = boxes.float().cpu()[order]
    x0, y0, x1, y1 = b.unbind(1)
    areas = (x1 - x0) * (y1 - y0)
    cut = torch.tensor(_threshold_below(iou_threshold))
    removed = np.zeros(n, dtype=bool)
    keep = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        if removed[start:stop].all():
            continue
        rows = slice(start, stop)
        w = (torch.minimum(x1[rows, None], x1[None, start:])
             - torch.maximum(x0[rows, None], x0[None, start:])).clamp(min=0)
        h = (torch.minimum(y1[rows, None], y1[None, start:])
             - torch.maximum(y0[rows, None], y0[None, start:])).clamp(min=0)
        inter = w * h
        iou = inter / (areas[rows, None] + areas[None, start:] - inter)
        over = (iou > cut).numpy()  # NaN (two empty boxes) never suppresses
        for i in range(start, stop):
            if removed[i]:
                continue
            keep.append(i)
            removed[i + 1:] |= over[i - start, i + 1 - start:]
    return order[torch.as_tensor(keep, dtype=torch.int64)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor | None,
                iou_threshold: float) -> torch.Tensor:
    """NMS within each category of ``idxs`` (None: one category), torchvision's order."""
    if idxs is None or len(torch.unique(idxs)) <= 1:
        return nms(boxes, scores, iou_threshold)
    kept = [torch.nonzero(idxs.cpu() == c).flatten()[nms(boxes[idxs == c], scores[idxs == c],
                                                          iou_threshold)]
            for c in torch.unique(idxs.cpu())]
    keep = torch.sort(torch.cat(kept)).values
    return keep[torch.sort(scores.float().cpu()[keep], descending=True, stable=True).indices]


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str
                         ) -> tuple[np.ndarray, bool]:
    """Fill background components ("holes") or drop mask components ("islands") smaller
    than ``area_thresh`` pixels (8-connectivity). Returns (mask, changed).

    As in segment_anything: holes are every background component, including ones touching
    the image border; when every island is small, the largest one is kept.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', not {mode!r}")
    holes = mode == "holes"
    labels, n = ndimage.label(~mask if holes else mask, structure=_EIGHT)
    if n == 0:
        return mask, False
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    if holes:
        fill = np.concatenate([[False], small])
        return mask | fill[labels], True
    keep = np.concatenate([[False], ~small])
    if not keep.any():
        keep[int(np.argmax(sizes)) + 1] = True
    return keep[labels], True


def fill_small_lowres(logits: torch.Tensor, max_area: int, threshold: float) -> torch.Tensor:
    """SAM 2 predictor post-processing on low-resolution logits (N, h, w): background
    components of <= ``max_area`` pixels are raised to ``threshold + 10`` (holes filled),
    then foreground components of <= ``max_area`` are lowered to ``threshold - 10``."""
    if max_area <= 0 or logits.numel() == 0:
        return logits
    arr = logits.detach().float().cpu().numpy()
    out = arr.copy()
    for i in range(arr.shape[0]):
        # both passes look at the input logits, as the reference does
        for fg, value in ((False, threshold + 10.0), (True, threshold - 10.0)):
            region = arr[i] > threshold if fg else arr[i] <= threshold
            labels, n = ndimage.label(region, structure=_EIGHT)
            if n == 0:
                continue
            small = np.bincount(labels.ravel(), minlength=n + 1) <= max_area
            small[0] = False
            out[i][small[labels]] = value
    return torch.from_numpy(out).to(device=logits.device, dtype=logits.dtype)


def sample_uncovered_points(free: np.ndarray, min_radius: float, max_points: int
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Prompts for the most interior pixels of the ``free`` (uncovered) area.

    Greedy: take the pixel farthest from any non-free pixel, then exclude the disk of that
    radius around it, and repeat while the farthest distance is >= ``min_radius``.
    Returns points (K, 2) as (x, y) pixel centres and their radii (K,).
    """
    if max_points <= 0 or not free.any():
        return np.zeros((0, 2)), np.zeros(0)
    padded = np.pad(free, 1, constant_values=False)  # the image edge bounds a region too
    dist = ndimage.distance_transform_edt(padded)[1:-1, 1:-1].astype(np.float32)
    h, w = dist.shape
    points, radii = [], []
    while len(points) < max_points:
        flat = int(np.argmax(dist))
        r = float(dist.flat[flat])
        if r < max(min_radius, 1.0):
            break
        y, x = divmod(flat, w)
        points.append((x + 0.5, y + 0.5))
        radii.append(r)
        rr = int(math.ceil(r))
        ys, xs = slice(max(0, y - rr), min(h, y + rr + 1)), slice(max(0, x - rr), min(w, x + rr + 1))
        gy, gx = np.ogrid[ys, xs]
        dist[ys, xs][(gy - y) ** 2 + (gx - x) ** 2 <= r * r] = 0.0
    return np.asarray(points, dtype=np.float64).reshape(-1, 2), np.asarray(radii)


def disk(shape: tuple[int, int], x: float, y: float, r: float) -> tuple[slice, slice, np.ndarray]:
    """The window and boolean footprint of a disk of radius r centred at pixel (x, y)."""
    h, w = shape
    cx, cy, rr = int(x), int(y), int(math.ceil(r))
    ys, xs = slice(max(0, cy - rr), min(h, cy + rr + 1)), slice(max(0, cx - rr), min(w, cx + rr + 1))
    gy, gx = np.ogrid[ys, xs]
    return ys, xs, (gy - cy) ** 2 + (gx - cx) ** 2 <= r * r
