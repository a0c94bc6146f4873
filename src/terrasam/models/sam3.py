"""SAM 3: text-concept segmentation through transformers' Sam3Model.

Sam3Model is the concept detector (text, optionally with box exemplars); it has no
interactive point/box decoder, so the point/box adapter calls refuse with a clear message.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from terrasam.errors import TerrasamError
from terrasam.models.base import Adapter, Embedding
from terrasam.models.registry import MODELS, ModelSpec

FAMILIES = ("sam3",)
# Sam3ImageProcessor defaults (IMAGENET_STANDARD_*), used when the folder has no
# preprocessor_config.json
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
TEXT_LENGTH = 32  # Sam3Processor pads every text to 32 tokens


def build_config(family: str = "sam3", variant: str = "sam3", size: str = "full"):
    """The transformers Sam3Config; "tiny" is a small, fast test model (same input size)."""
    from transformers import Sam3Config

    if family not in FAMILIES:
        raise TerrasamError(f"family {family!r} is not handled by terrasam.models.sam3")
    if size == "full":
        return Sam3Config()
    if size != "tiny":
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    d = 32
    layer = {"hidden_size": d, "num_attention_heads": 2, "intermediate_size": 64, "num_layers": 1}
    return Sam3Config(
        vision_config={
            "backbone_config": {"model_type": "sam3_vit_model", "hidden_size": d,
                                "intermediate_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 2, "global_attn_indexes": [1]},
            "fpn_hidden_size": d,
        },
        text_config={"vocab_size": 64, "hidden_size": d, "intermediate_size": 64,
                     "projection_dim": d, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": TEXT_LENGTH, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        geometry_encoder_config=layer,
        detr_encoder_config=layer,
        detr_decoder_config={**layer, "num_queries": 12},
        mask_decoder_config={"hidden_size": d, "num_attention_heads": 2},
    )


def model_class(family: str = "sam3"):
    """The transformers model class of SAM 3 (the concept detector)."""
    from transformers import Sam3Model

    return Sam3Model


def looks_like(meta_state_dict: dict) -> bool:
    """True for Meta's original SAM 3 checkpoints (detector + tracker layout)."""
    return any(k.startswith("detector.backbone.vision_backbone.") for k in meta_state_dict)


def meta_to_hf(meta_state_dict: dict):
    """Meta's SAM 3 checkpoints are not converted by terrasam."""
    raise TerrasamError(
        "Meta's original SAM 3 checkpoint (sam3.pt) is not supported; convert it with "
        "transformers or use the Hugging Face folder (facebook/sam3) with --checkpoint")


def hf_to_meta(hf_state_dict: dict, config):
    """Not available for SAM 3 (no Meta layout)."""
    raise TerrasamError("SAM 3 checkpoints can only be written in the Hugging Face format")


def spec_for_config(family: str, config) -> ModelSpec:
    """Every Sam3Model is the "sam3" entry (one architecture)."""
    return MODELS["sam3"]


# ---------------------------------------------------------------------------------------------
# The adapter


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def preprocess(image: np.ndarray, size: int, mean=IMAGE_MEAN, std=IMAGE_STD,
               device="cpu") -> torch.Tensor:
    """(1, 3, size, size) float32 input as Sam3ImageProcessor: the uint8 image resized to a
    square (bilinear, antialiased, rounded back to uint8 as torchvision does for uint8
    tensors), scaled to [0, 1], normalised."""
    x = torch.from_numpy(_check_image(image)).to(device).permute(2, 0, 1)[None].float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.round().clamp(0, 255)
    x = x / 255.0
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _model_folder(model) -> Path | None:
    name = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    path = Path(name) if name else None
    return path if path is not None and path.is_dir() else None


def _image_stats(folder: Path | None):
    """Mean and std from the folder's preprocessor_config.json, else the processor defaults."""
    if folder is not None and (folder / "preprocessor_config.json").exists():
        cfg = json.loads((folder / "preprocessor_config.json").read_text())
        return tuple(cfg.get("image_mean", IMAGE_MEAN)), tuple(cfg.get("image_std", IMAGE_STD))
    return IMAGE_MEAN, IMAGE_STD


class Sam3Adapter(Adapter):
    """SAM 3 concept segmentation: every instance of a text concept in a tile."""

    def __init__(self, model, spec: ModelSpec, device, dtype, tokenizer=None):
        self._setup(model, spec, device, dtype)
        self.image_size = int(model.config.vision_config.backbone_config.image_size)
        self._folder = _model_folder(model)
        self._mean, self._std = _image_stats(self._folder)
        self._tokenizer = tokenizer
        self._text_cache: dict[str, tuple] = {}

    @property
    def tokenizer(self):
        """The CLIP tokenizer saved with the model (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if self._folder is None or not any(
                    (self._folder / f).exists() for f in ("tokenizer.json", "vocab.json")):
                raise TerrasamError(
                    f"the SAM 3 model folder {self._folder} has no tokenizer (tokenizer.json or "
                    "vocab.json + merges.txt); use the complete Hugging Face folder of facebook/sam3")
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self._folder,
                                                                local_files_only=True)
            except (OSError, ValueError, TypeError) as exc:
                raise TerrasamError(f"cannot load the SAM 3 tokenizer from {self._folder}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else exc}") from None
        return self._tokenizer

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> Embedding:
        """Run the vision encoder (features reusable for several text prompts)."""
        h, w = np.asarray(image).shape[:2]
        x = preprocess(image, self.image_size, self._mean, self._std, self.device)
        features = self.model.get_vision_features(pixel_values=x.to(self.dtype))
        return Embedding(features=features, original_size=(int(h), int(w)),
                         input_size=(self.image_size, self.image_size))

    def decode(self, embedding, points=None, point_labels=None, boxes=None, mask_inputs=None,
               multimask=True):
        raise TerrasamError("SAM 3 segments text concepts here, not point or box prompts; use "
                            "--text, or a SAM / SAM 2 model for points and boxes")

    def upscale(self, low_res_logits, embedding):
        raise TerrasamError("SAM 3 segments text concepts here, not point or box prompts; use "
                            "--text")

    def _text(self, text: str):
        """(input_ids, attention_mask) padded to 32 tokens, as Sam3Processor."""
        if text not in self._text_cache:
            tok = self.tokenizer(text, padding="max_length", max_length=TEXT_LENGTH,
                                 truncation=True, return_tensors="pt")
            self._text_cache[text] = (tok["input_ids"].to(self.device),
                                      tok["attention_mask"].to(self.device))
        return self._text_cache[text]

    @torch.inference_mode()
    def segment_text(self, image: np.ndarray, text: str, score_threshold: float = 0.5,
                     mask_threshold: float = 0.5, embedding: Embedding | None = None
                     ) -> list[dict]:
        """Every instance of a text concept, as Sam3Processor.post_process_instance_segmentation:
        score = sigmoid(logit) * sigmoid(presence), masks' probabilities resized to the image
        (bilinear) and thresholded, boxes scaled to pixels. Sorted by score, highest first."""
        text = str(text).strip()
        if not text:
            raise TerrasamError("the text prompt is empty")
        emb = embedding if embedding is not None else self.embed(image)
        ids, mask = self._text(text)
        out = self.model(vision_embeds=emb.features, input_ids=ids, attention_mask=mask)
        scores = out.pred_logits[0].float().sigmoid()
        if out.presence_logits is not None:
            scores = scores * out.presence_logits[0].float().sigmoid()
        keep = torch.nonzero(scores > score_threshold).flatten()
        if len(keep) == 0:
            return []
        keep = keep[torch.argsort(scores[keep], descending=True)]
        h, w = emb.original_size
        probs = out.pred_masks[0, keep].float().sigmoid()
        probs = F.interpolate(probs[None], (h, w), mode="bilinear", align_corners=False)[0]
        boxes = out.pred_boxes[0, keep].float() * torch.tensor([w, h, w, h], device=probs.device)
        masks = (probs > mask_threshold).cpu().numpy()
        return [{"mask": masks[i], "score": float(scores[k]), "box": boxes[i].tolist()}
                for i, k in enumerate(keep.tolist())]
