"""The adapter contract: the only two calls the rest of terrasam makes on a model.

The model layer knows nothing of rasters: an image is an (H, W, 3) uint8 RGB array,
coordinates are (x, y) pixels of that image.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Embedding:
    """Image features of one image (a tile or a crop), ready for any number of decodes."""

    features: Any
    original_size: tuple[int, int]  # (h, w) of the image given to embed()
    input_size: tuple[int, int]  # (h, w) after resizing, before padding
    extra: dict = field(default_factory=dict)


class Adapter(ABC):
    """A loaded promptable segmentation model.

    Attributes set by every implementation: ``model_id``, ``family`` ("sam", "sam_hq",
    "sam2", "sam3"), ``image_size`` (square model input, 1024 or 1008), ``mask_threshold``
    (logit threshold, 0.0), ``device``, ``dtype``, ``checkpoint`` (path or repo id) and
    ``checkpoint_sha256`` (None when unknown).
    """

    model_id: str
    family: str
    image_size: int
    mask_threshold: float = 0.0
    low_res_size: int = 256
    device: torch.device
    dtype: torch.dtype
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None

    def _setup(self, model, spec, device, dtype) -> None:
        """Common state of adapters wrapping a transformers model (moved to device/dtype)."""
        self.model = model.to(device=device, dtype=dtype).eval()
        self.spec = spec
        self.model_id = spec.model_id
        self.family = spec.family
        self.device = torch.device(device)
        self.dtype = dtype
        self.mask_threshold = 0.0

    @abstractmethod
    def embed(self, image: np.ndarray) -> Embedding:
        """Run the image encoder on an (H, W, 3) uint8 RGB image."""

    @abstractmethod
    def decode(
        self,
        embedding: Embedding,
        points: np.ndarray | torch.Tensor | None = None,
        point_labels: np.ndarray | torch.Tensor | None = None,
        boxes: np.ndarray | torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask: bool = True,
        iou_thresh: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a batch of B prompts against one embedding.

        points: (B, N, 2) float (x, y) in pixels of the embedded image; point_labels:
        (B, N) int, 1 foreground, 0 background, -1 padding; boxes: (B, 4) xyxy pixels;
        mask_inputs: (B, 1, 256, 256) low-resolution logits from an earlier decode.
        Returns (low_res_logits (B, M, 256, 256) float32, predicted_iou (B, M) float32),
        M = 3 when multimask else 1 (SAM-HQ: always 1, as Meta's predictor), both on
        ``self.device``.
        iou_thresh: a hint that masks whose predicted IoU is below it will be discarded; an
        adapter may skip computing their logits and return them as -inf.
        """

    @abstractmethod
    def upscale(self, low_res_logits: torch.Tensor, embedding: Embedding) -> torch.Tensor:
        """Map (..., 256, 256) low-resolution logits to (..., H, W) logits of the
        embedded image, exactly as the family's reference predictor does."""

    def segment_text(self, image: np.ndarray, text: str, score_threshold: float = 0.5,
                     mask_threshold: float = 0.5, embedding: Embedding | None = None
                     ) -> list[dict]:
        """Every instance of a text concept in an image (SAM 3 only).

        ``embedding``: this image's :meth:`embed` result, reused across concepts. Returns
        dicts with ``mask`` (H, W) bool, ``score`` float, ``box`` xyxy pixels.
        """
        from terrasam.errors import TerrasamError

        raise TerrasamError(f"model {self.model_id} does not take text prompts; use --model sam3")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.model_id} on {self.device} {self.dtype}>"
