"""An oracle model for tests: the "mask" under a prompt is the colour component it falls in.

Synthetic scenes paint each object in its own flat colour, so the right answer for a point
prompt is known exactly. The oracle implements the real Adapter contract, with "low-resolution"
logits at the image's own resolution (upscale is the identity), so tests can demand exact
geometry from everything above the model layer.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from terrasam.models.base import Adapter, Embedding


class OracleAdapter(Adapter):
    """Decodes a point to the 4-connected component of pixels sharing its colour.

    background: an RGB colour whose component is "nothing" (empty mask, low IoU).
    tolerance: max per-channel difference to count as the same colour (resampling blurs edges).
    """

    def __init__(self, background=(0, 0, 0), tolerance=8, iou=0.96, image_size=1024):
        self.model_id = "oracle"
        self.family = "sam"
        self.image_size = image_size
        self.mask_threshold = 0.0
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.background = np.asarray(background, dtype=np.int16)
        self.tolerance = tolerance
        self.iou = iou
        self.decoder_calls = 0  # prompts decoded
        self.embed_calls = 0

    def embed(self, image: np.ndarray) -> Embedding:
        self.embed_calls += 1
        h, w = image.shape[:2]
        return Embedding(features=np.asarray(image, dtype=np.int16), original_size=(h, w),
                         input_size=(h, w))

    def _component(self, image: np.ndarray, x: float, y: float) -> np.ndarray | None:
        h, w = image.shape[:2]
        col, row = int(np.floor(x)), int(np.floor(y))
        if not (0 <= col < w and 0 <= row < h):
            return None
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
                    comp = self._component(image, x, y)
                    if comp is None:
                        continue
                    if lab == 1:
                        mask |= comp
                    elif lab == 0:
                        mask &= ~comp
            else:
                # a box: the largest colour component whose centre lies inside it
                x0, y0, x1, y1 = bx[i]
                mask = self._component(image, (x0 + x1) / 2, (y0 + y1) / 2)
                if mask is None:
                    mask = np.zeros((h, w), bool)
            if mask.any():
                logits[i, :] = torch.where(torch.from_numpy(mask), 20.0, -20.0)
                iou[i] = torch.tensor([self.iou - 0.02, self.iou, self.iou - 0.01][:m])
        self.decoder_calls += b
        return logits, iou

    def upscale(self, low_res_logits, embedding):
        return low_res_logits
