"""An oracle model for tests: the "mask" under a prompt is the colour component it falls in.

Synthetic scenes paint each object in its own flat colour, so the right answer for a point
prompt is known exactly. The oracle implements the real Adapter contract, with "low-resolution"
logits at the image's own resolution (upscale is the identity), so tests can demand exact
geometry from everything above the model layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from terrasam.models.base import Adapter, Embedding
from terrasam.tiling import MaskRecord, TileProfile


class OracleAdapter(Adapter):
    """Decodes a point to the 4-connected component of pixels sharing its colour.

    background: an RGB colour whose component is "nothing" (empty mask, low IoU).
    tolerance: max per-channel difference to count as the same colour (resampling blurs edges).
    """

    def __init__(self, background=(0, 0, 0), tolerance=8, iou=0.96, image_size=1024,
                 flat=False):
        self.model_id = "oracle"
        self.family = "sam"
        self.image_size = image_size
        self.mask_threshold = 0.0
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.background = np.asarray(background, dtype=np.int16)
        self.tolerance = tolerance
        self.iou = iou
        # flat=True: colours are exactly flat (no resampling), so the components are labelled
        # once per image instead of once per prompt (fast enough for the scale benchmark)
        self.flat = flat
        self.decoder_calls = 0  # prompts decoded
        self.embed_calls = 0

    def embed(self, image: np.ndarray) -> Embedding:
        self.embed_calls += 1
        h, w = image.shape[:2]
        extra = {}
        if self.flat:
            code = (image[..., 0].astype(np.int32) << 16) | (image[..., 1].astype(np.int32) << 8) \
                | image[..., 2].astype(np.int32)
            labels = np.zeros((h, w), np.int32)
            bg = (int(self.background[0]) << 16) | (int(self.background[1]) << 8) \
                | int(self.background[2])
            for c in np.unique(code):
                if c == bg:
                    continue
                lab, n = ndimage.label(code == c)
                labels[lab > 0] = lab[lab > 0] + labels.max()
            extra["labels"] = labels
        return Embedding(features=np.asarray(image, dtype=np.int16), original_size=(h, w),
                         input_size=(h, w), extra=extra)

    def _component(self, image: np.ndarray, x: float, y: float, labels=None) -> np.ndarray | None:
        h, w = image.shape[:2]
        col, row = int(np.floor(x)), int(np.floor(y))
        if not (0 <= col < w and 0 <= row < h):
            return None
        if labels is not None:
            return labels == labels[row, col] if labels[row, col] else None
        colour = image[row, col]
        if np.all(np.abs(colour - self.background) <= self.tolerance):
            return None
        same = np.all(np.abs(image - colour) <= self.tolerance, axis=-1)
        labels, _ = ndimage.label(same)
        return labels == labels[row, col]

    def decode(self, embedding, points=None, point_labels=None, boxes=None, mask_inputs=None,
               multimask=True, iou_thresh=None):
        image = embedding.features
        h, w = embedding.original_size
        if points is not None:
            pts = torch.as_tensor(points).cpu().numpy().reshape(len(points), -1, 2)
            labels = (np.ones(pts.shape[:2], int) if point_labels is None
                      else torch.as_tensor(point_labels).cpu().numpy().reshape(pts.shape[:2]))
            b = len(pts)
        else:
            bx = torch.as_tensor(boxes).cpu().numpy().reshape(-1, 4)
            b = len(bx)
        m = 3 if multimask else 1
        logits = torch.full((b, m, h, w), -20.0)
        iou = torch.full((b, m), 0.05)
        for i in range(b):
            if points is not None:
                mask = np.zeros((h, w), bool)
                for (x, y), lab in zip(pts[i], labels[i]):
                    comp = self._component(image, x, y, embedding.extra.get("labels"))
                    if comp is None:
                        continue
                    if lab == 1:
                        mask |= comp
                    elif lab == 0:
                        mask &= ~comp
            else:
                # a box: the largest colour component whose centre lies inside it
                x0, y0, x1, y1 = bx[i]
                mask = self._component(image, (x0 + x1) / 2, (y0 + y1) / 2,
                                       embedding.extra.get("labels"))
                if mask is None:
                    mask = np.zeros((h, w), bool)
            if mask.any():
                logits[i, :] = torch.where(torch.from_numpy(mask), 20.0, -20.0)
                iou[i] = torch.tensor([self.iou - 0.02, self.iou, self.iou - 0.01][:m])
        self.decoder_calls += b
        return logits, iou

    def upscale(self, low_res_logits, embedding):
        return low_res_logits


@dataclass(frozen=True)
class ComponentsJob:
    """The oracle as a tile job: each 8-connected group of non-background pixels is one object.

    No decoder at all, so runs with hundreds of thousands of objects measure everything
    around the model (engine, spill, stitching, vectorising, writing)."""

    background: tuple = (20, 20, 20)
    concepts: tuple = ("auto",)

    def __call__(self, adapter, rgb, valid, profile=None):
        fg = np.any(rgb != np.asarray(self.background, np.uint8), axis=-1)
        if valid is not None:
            fg &= valid
        labels, _ = ndimage.label(fg, structure=np.ones((3, 3), bool))
        records = []
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            mask = labels[sl] == i
            records.append(MaskRecord(mask, (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop),
                                      int(mask.sum()), 0.96, 0.96))
        if profile is not None:
            profile.tiles += 1
            profile.masks += len(records)
        return records

    def describe(self) -> dict:
        return {"job": "components", "background": list(self.background)}

    def new_profile(self) -> TileProfile:
        return TileProfile()
