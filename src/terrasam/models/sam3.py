"""SAM 3 through transformers: the concept detector (Sam3Model) and the tracker
(Sam3TrackerModel) over one shared vision backbone.

The Hugging Face checkpoint facebook/sam3 is a ``sam3_video`` folder: one safetensors file
holds the detector (``detector_model.*``: ViT backbone, detector FPN neck, text encoder,
geometry encoder, DETR encoder/decoder, mask decoder), the tracker's own FPN neck
(``tracker_neck.*``) and the tracker (``tracker_model.*``: SAM 2-style prompt encoder and mask
decoder, plus video memory modules, unused here). The tracker has no backbone of its own:
transformers maps ``detector_model.vision_encoder.backbone.*`` into it. terrasam loads the
detector as Sam3Model and, on the first point/box prompt, the tracker's tensors from the
same folder into a Sam3TrackerModel whose backbone *is* the detector's module, so one ViT run
per image serves text, exemplars, points and boxes (only the two small necks differ).

* text and box exemplars (concept prompts): every instance in an image, the detector;
* points and boxes (one object per prompt): the tracker, decoded as SAM 2 (its mask decoder
  is SAM 2's, so the automatic mask generator runs on it too).

transformers' SAM 3 image processors and geometry encoder need torchvision; here images are
preprocessed in torch and exemplar boxes pooled by :func:`roi_align` (torchvision's
``roi_align``, ``aligned=False``, adaptive sampling, reimplemented in torch).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
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


def tracker_config_dict(size: str = "tiny", vision_config: dict | None = None) -> dict:
    """The ``tracker_config`` of a ``sam3_video`` config (tiny: small decoder and memory)."""
    if size == "full":
        return {"model_type": "sam3_tracker_video"}
    d = 32
    return {"model_type": "sam3_tracker_video", "vision_config": vision_config,
            "prompt_encoder_config": {"hidden_size": d},
            "mask_decoder_config": {"hidden_size": d, "mlp_dim": 64, "num_attention_heads": 2,
                                    "iou_head_hidden_dim": d},
            "memory_attention_hidden_size": d, "memory_attention_num_layers": 1,
            "memory_attention_feed_forward_hidden_size": 64, "memory_encoder_hidden_size": d,
            "memory_encoder_output_channels": 16, "mask_downsampler_embed_dim": d,
            "memory_fuser_num_layers": 1, "memory_fuser_embed_dim": d,
            "memory_fuser_intermediate_dim": 64}


def build_video_config(size: str = "full"):
    """The ``sam3_video`` config of facebook/sam3 (detector + tracker); "tiny" for tests."""
    from transformers import Sam3VideoConfig

    detector = build_config("sam3", "sam3", size)
    vision = detector.vision_config.to_dict() if size != "full" else None
    config = Sam3VideoConfig(detector_config=detector.to_dict(),
                             tracker_config=tracker_config_dict(size, vision))
    config.architectures = ["Sam3VideoModel"]
    return config


def save_random_hf(path, size: str = "tiny", seed: int = 0, prompt_sensitive: bool = False):
    """A seeded random SAM 3 checkpoint in facebook/sam3's layout: config.json of model_type
    ``sam3_video`` and model.safetensors with the ``detector_model.`` / ``tracker_neck.`` /
    ``tracker_model.`` tensors of a Sam3VideoModel (written with safetensors directly:
    transformers 5's save_pretrained doubles the ``tracker_model.`` prefix, which its own
    loader then does not read back)."""
    from safetensors.torch import save_file
    from transformers import Sam3VideoModel

    from terrasam.testing import randomize

    config = build_video_config(size)
    torch.manual_seed(seed)
    model = randomize(Sam3VideoModel(config), seed, prompt_sensitive).eval()
    with torch.no_grad():  # Meta's tracker has one Fourier matrix for prompts and the image
        model.tracker_model.shared_image_embedding.positional_embedding.copy_(
            model.tracker_model.prompt_encoder.shared_embedding.positional_embedding)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path)
    return path


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


def roi_align(features: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision.ops.roi_align(features, [boxes], size) for one image (spatial_scale 1,
    sampling_ratio -1, aligned False): (K, C, size, size) means of bilinear samples, each bin
    sampled on a ceil(bin size) grid; samples more than one pixel outside the map count 0.

    features: (1, C, H, W); boxes: (K, 4) x0, y0, x1, y1 in feature pixels."""
    _, c, h, w = features.shape
    out = []
    for x0, y0, x1, y1 in boxes.double().tolist():
        weights = []
        for start, length, n in ((y0, y1 - y0, h), (x0, x1 - x0, w)):
            length = max(length, 1.0)
            grid = max(math.ceil(length / size), 1)
            step = length / size
            at = (start + torch.arange(size, dtype=torch.float64)[:, None] * step
                  + (torch.arange(grid, dtype=torch.float64)[None] + 0.5) * step / grid).flatten()
            inside = (at >= -1.0) & (at <= n)
            at = at.clamp(min=0.0)
            low = at.floor().long()
            edge = low >= n - 1
            low = torch.where(edge, torch.full_like(low, n - 1), low)
            at = torch.where(edge, low.double(), at)
            high = torch.where(edge, low, low + 1)
            frac = at - low
            m = torch.zeros(len(at), n, dtype=torch.float64)
            rows = torch.arange(len(at))
            m.index_put_((rows, low), (1 - frac) * inside, accumulate=True)
            m.index_put_((rows, high), frac * inside, accumulate=True)
            weights.append(m.reshape(size, grid, n).mean(1))
        wy, wx = (t.to(features.device, torch.float32) for t in weights)
        out.append(torch.einsum("ph,chw,qw->cpq", wy, features[0].float(), wx))
    return torch.stack(out).to(features.dtype)


def _box_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


@dataclass
class ConceptPrompt:
    """A concept prompt ready for any tile: prompt tokens (1, T, C) and their mask (1, T)
    (text tokens, then exemplar tokens encoded once on the exemplars' own window)."""

    features: torch.Tensor
    mask: torch.Tensor
    label: str


def _tracker_folder_config(folder: Path | None):
    """The ``sam3_video`` config of the folder, or None when it holds only a detector."""
    if folder is None or not (folder / "config.json").exists():
        return None
    try:
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None
    if kind != "sam3_video":
        return None
    from transformers import Sam3VideoConfig

    return Sam3VideoConfig.from_pretrained(folder)


def load_tracker(folder: Path | None, detector, source: str | None = None):
    """The Sam3TrackerModel of a facebook/sam3 folder, its backbone the detector's module.

    Reads only the tracker's tensors (``tracker_model.*`` and ``tracker_neck.*``), mapped as
    transformers' own sam3_tracker conversion maps them, strictly: a tensor missing or of
    another shape is one sentence."""
    from safetensors import safe_open
    from transformers import Sam3TrackerModel

    where = source or str(folder)
    config = _tracker_folder_config(folder)
    if config is None:
        raise TerrasamError(
            f"the SAM 3 checkpoint {where} holds only the concept detector (text and exemplar "
            "prompts); point and box prompts need SAM 3's tracker: use the complete Hugging "
            "Face folder of facebook/sam3 (config.json of model_type sam3_video)")
    with torch.device("meta"):
        tracker = Sam3TrackerModel(config)
    tracker.vision_encoder.backbone = detector.vision_encoder.backbone  # shared, not a copy
    wanted = {k: v for k, v in tracker.state_dict().items()
              if not k.startswith("vision_encoder.backbone.")}
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith("tracker_neck."):
                    name = "vision_encoder.neck." + key[len("tracker_neck."):]
                elif key.startswith("tracker_model."):
                    name = key[len("tracker_model."):]
                else:
                    continue
                if name in wanted:
                    state[name] = handle.get_tensor(key)
    missing = sorted(set(wanted) - set(state))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise TerrasamError(f"{where} has no SAM 3 tracker tensors for point and box prompts "
                            f"(missing {', '.join(missing[:3])}{more}); copy the complete "
                            f"facebook/sam3 folder")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(wanted[name].shape):
            raise TerrasamError(f"{where} does not match the SAM 3 tracker its config.json "
                                f"describes: {name} has shape {tuple(tensor.shape)}, expected "
                                f"{tuple(wanted[name].shape)}")
    tracker.load_state_dict(state, strict=False, assign=True)
    left = [n for n, t in list(tracker.named_parameters()) + list(tracker.named_buffers())
            if t.is_meta]
    if left:
        raise TerrasamError(f"{where} leaves the SAM 3 tracker's {left[0]} uninitialised")
    return tracker.eval()


def _tracker_decoder_class():
    """The SAM 2 adapter's decoder path, for the tracker (its mask decoder is SAM 2's)."""
    from terrasam.models.sam2 import Sam2Adapter

    class TrackerDecoder(Sam2Adapter):
        def embed(self, image):  # the tracker's embeddings come from Sam3Adapter.embed
            raise NotImplementedError

    return TrackerDecoder


class Sam3Adapter(Adapter):
    """SAM 3: concept prompts (text, box exemplars) through the detector, points and boxes
    through the tracker, over one vision backbone run per image."""

    def __init__(self, model, spec: ModelSpec, device, dtype, tokenizer=None):
        self._setup(model, spec, device, dtype)
        self.image_size = int(model.config.vision_config.backbone_config.image_size)
        self._patch = int(model.config.vision_config.backbone_config.patch_size)
        self.low_res_size = 4 * (self.image_size // self._patch)
        self._folder = _model_folder(model)
        self._mean, self._std = _image_stats(self._folder)
        self._tokenizer = tokenizer
        self._text_cache: dict[str, tuple] = {}
        self._tracker = None

    @property
    def tracker(self):
        """The point/box decoder over SAM 3's tracker (loaded on first use)."""
        if self._tracker is None:
            model = load_tracker(self._folder, self.model, self.checkpoint)
            self._tracker = _tracker_decoder_class()(model, self.spec, self.device, self.dtype)
        return self._tracker

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
        """Run the vision encoder once: the detector's features now, the tracker's (its own
        neck over the same backbone output) when a point/box prompt first needs them."""
        h, w = np.asarray(image).shape[:2]
        x = preprocess(image, self.image_size, self._mean, self._std, self.device)
        features = self.model.get_vision_features(pixel_values=x.to(self.dtype))
        return Embedding(features=features, original_size=(int(h), int(w)),
                         input_size=(self.image_size, self.image_size))

    def tracker_embedding(self, embedding: Embedding) -> Embedding:
        """The tracker's image embedding of an embedded image (kept in ``embedding.extra``),
        as Sam3TrackerModel.get_image_embeddings: the tracker's neck on the backbone output,
        the first two levels projected by the mask decoder, the no-memory embedding added to
        the neck's last level, the levels of ``backbone_feature_sizes`` kept."""
        if "tracker" not in embedding.extra:
            tracker = self.tracker.model
            with torch.inference_mode():
                hidden = embedding.features.last_hidden_state
                side = self.image_size // self._patch
                spatial = hidden.reshape(hidden.shape[0], side, side, -1).permute(0, 3, 1, 2)
                maps, _ = tracker.vision_encoder.neck(spatial)
                maps = list(maps)
                maps[0] = tracker.mask_decoder.conv_s0(maps[0])
                maps[1] = tracker.mask_decoder.conv_s1(maps[1])
                maps[-1] = maps[-1] + tracker.no_memory_embedding.reshape(1, -1, 1, 1)
                maps = maps[:len(tracker.backbone_feature_sizes)]
            embedding.extra["tracker"] = Embedding(
                features=maps[-1], original_size=embedding.original_size,
                input_size=embedding.input_size, extra={"high_res": maps[:-1]})
        return embedding.extra["tracker"]

    def decode(self, embedding, points=None, point_labels=None, boxes=None, mask_inputs=None,
               multimask=True, iou_thresh=None):
        """Point/box prompts through SAM 3's tracker: ((B, M, 288, 288) logits, (B, M) IoU),
        decoded as SAM 2's image predictor decodes (the tracker's decoder is SAM 2's)."""
        return self.tracker.decode(self.tracker_embedding(embedding), points=points,
                                   point_labels=point_labels, boxes=boxes,
                                   mask_inputs=mask_inputs, multimask=multimask,
                                   iou_thresh=iou_thresh)

    def upscale(self, low_res_logits, embedding):
        """Low-res tracker logits to the embedded image's size (bilinear, as SAM 2)."""
        return self.tracker.upscale(low_res_logits, embedding)

    def _text(self, text: str):
        """(input_ids, attention_mask) padded to 32 tokens, as Sam3Processor."""
        if text not in self._text_cache:
            tok = self.tokenizer(text, padding="max_length", max_length=TEXT_LENGTH,
                                 truncation=True, return_tensors="pt")
            self._text_cache[text] = (tok["input_ids"].to(self.device),
                                      tok["attention_mask"].to(self.device))
        return self._text_cache[text]

    # ------------------------------------------------------------------ concept prompts

    @torch.inference_mode()
    def concept_prompt(self, text: str | None = None, exemplars=(), label: str | None = None
                       ) -> ConceptPrompt:
        """The prompt tokens of one concept: text and/or box exemplars, as Sam3Model.forward
        builds them (the text's tokens, then the geometry encoder's exemplar tokens; without
        text Sam3Processor's "visual").

        exemplars: ``(embedding, boxes, labels)`` groups: boxes (K, 4) xyxy pixels of the
        image that ``embedding`` was made from, labels (K,) 1 positive, 0 negative. Each
        group is encoded on its own image (its CLS token included), the groups' tokens
        concatenated. The result depends on those images only: made once, it serves every
        tile (:meth:`segment_concept`)."""
        words = str(text).strip() if text is not None else ""
        if text is not None and not words:
            raise TerrasamError("the text prompt is empty")
        ids, mask = self._text(words or "visual")
        features = [self.model.get_text_features(input_ids=ids,
                                                 attention_mask=mask).pooler_output]
        masks = [mask.bool()]
        for embedding, boxes, labels in exemplars:
            boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 4)
            h, w = embedding.original_size
            norm = _box_cxcywh(boxes / torch.tensor([w, h, w, h], dtype=torch.float64))
            lab = (torch.ones(len(boxes), dtype=torch.long) if labels is None
                   else torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1))
            geo, geo_mask = self._encode_exemplars(
                embedding, norm[None].to(self.device, self.dtype), lab[None].to(self.device))
            features.append(geo)
            masks.append(geo_mask.bool())
        return ConceptPrompt(features=torch.cat(features, dim=1).cpu(),
                             mask=torch.cat(masks, dim=1).cpu(),
                             label=label or words or "exemplar")

    def _encode_exemplars(self, embedding, boxes, labels):
        """Sam3GeometryEncoder.forward on the embedded image, with :func:`roi_align`."""
        from transformers.masking_utils import create_bidirectional_mask

        g = self.model.geometry_encoder
        fpn = embedding.features.fpn_hidden_states[:-1]
        pos = embedding.features.fpn_position_encoding[:-1]
        b, k = boxes.shape[:2]
        feats = fpn[-1]
        flat = feats.flatten(2).transpose(1, 2)
        pos_flat = pos[-1].flatten(2).transpose(1, 2)
        normed = g.vision_layer_norm(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        fh, fw = normed.shape[-2:]
        cx, cy, bw, bh = boxes.unbind(-1)
        xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
        xyxy = xyxy * torch.tensor([fw, fh, fw, fh], dtype=xyxy.dtype, device=xyxy.device)
        pooled = roi_align(normed, xyxy[0], g.roi_size)
        embed = g.boxes_direct_project(boxes)
        embed = embed + g.boxes_pool_project(pooled).view(b, k, g.hidden_size)
        px, py = g.position_encoding.encode_1d_positions(cx.flatten(), cy.flatten())
        pos_enc = torch.cat((py, px, bh.flatten()[:, None], bw.flatten()[:, None]), dim=1)
        embed = embed + g.boxes_pos_enc_project(pos_enc.view(b, k, -1))
        embed = g.label_embed(labels.long()) + embed
        cls = g.cls_embed.weight.view(1, 1, g.hidden_size).expand(b, -1, -1)
        tokens = torch.cat([embed, cls], dim=1)
        mask = torch.ones(b, k + 1, dtype=torch.bool, device=tokens.device)
        tokens = g.prompt_layer_norm(g.final_proj(tokens))
        attn = create_bidirectional_mask(config=g.config, inputs_embeds=tokens,
                                         attention_mask=mask)
        for layer in g.layers:
            tokens = layer(prompt_feats=tokens, vision_feats=flat, vision_pos_encoding=pos_flat,
                           prompt_mask=attn)
        return g.output_layer_norm(tokens), mask

    @torch.inference_mode()
    def segment_concept(self, image: np.ndarray, prompt: ConceptPrompt,
                        score_threshold: float = 0.5, mask_threshold: float = 0.5,
                        embedding: Embedding | None = None) -> list[dict]:
        """Every instance of a concept prompt (made once by :meth:`concept_prompt`, possibly
        on another image): Sam3Model.forward after the prompt tokens, post-processed as
        :meth:`segment_text`."""
        from transformers.models.sam3.modeling_sam3 import box_cxcywh_to_xyxy, inverse_sigmoid

        emb = embedding if embedding is not None else self.embed(image)
        m = self.model
        fpn = emb.features.fpn_hidden_states[:-1]
        pos = emb.features.fpn_position_encoding[:-1]
        feats, mask = prompt.features.to(self.device, self.dtype), prompt.mask.to(self.device)
        enc = m.detr_encoder(vision_features=[fpn[-1]], text_features=feats,
                             vision_pos_embeds=[pos[-1]], text_mask=mask)
        dec = m.detr_decoder(vision_features=enc.last_hidden_state,
                             text_features=enc.text_features,
                             vision_pos_encoding=enc.pos_embeds_flattened, text_mask=mask,
                             spatial_shapes=enc.spatial_shapes)
        offsets = m.detr_decoder.box_head(dec.intermediate_hidden_states)
        boxes = box_cxcywh_to_xyxy((inverse_sigmoid(dec.reference_boxes) + offsets).sigmoid())
        logits = m.dot_product_scoring(decoder_hidden_states=dec.intermediate_hidden_states,
                                       text_features=enc.text_features,
                                       text_mask=mask).squeeze(-1)
        masks = m.mask_decoder(decoder_queries=dec.intermediate_hidden_states[-1],
                               backbone_features=list(fpn),
                               encoder_hidden_states=enc.last_hidden_state,
                               prompt_features=feats, prompt_mask=mask).pred_masks
        return self._instances(logits[-1], dec.presence_logits[-1], masks, boxes[-1],
                               emb.original_size, score_threshold, mask_threshold)

    @staticmethod
    def _instances(pred_logits, presence_logits, pred_masks, pred_boxes, size,
                   score_threshold, mask_threshold) -> list[dict]:
        """Sam3Processor.post_process_instance_segmentation for one image."""
        scores = pred_logits[0].float().sigmoid()
        if presence_logits is not None:
            scores = scores * presence_logits[0].float().sigmoid()
        keep = torch.nonzero(scores > score_threshold).flatten()
        if len(keep) == 0:
            return []
        keep = keep[torch.argsort(scores[keep], descending=True)]
        h, w = size
        probs = pred_masks[0, keep].float().sigmoid()
        probs = F.interpolate(probs[None], (h, w), mode="bilinear", align_corners=False)[0]
        boxes = pred_boxes[0, keep].float() * torch.tensor([w, h, w, h], device=probs.device)
        masks = (probs > mask_threshold).cpu().numpy()
        return [{"mask": masks[i], "score": float(scores[k]), "box": boxes[i].tolist()}
                for i, k in enumerate(keep.tolist())]

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
        return self._instances(out.pred_logits, out.presence_logits, out.pred_masks,
                               out.pred_boxes, emb.original_size, score_threshold,
                               mask_threshold)
