"""SAM and SAM-HQ: configs, Meta <-> transformers key conversion, and the adapter."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from terrasam.errors import TerrasamError
from terrasam.models import fast_decoder as fd
from terrasam.models.base import Adapter, Embedding
from terrasam.models.registry import MODELS, ModelSpec

FAMILIES = ("sam", "sam_hq")
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

# (hidden size, depth, heads, global attention blocks, MLP width) of the image encoders: Meta's
# ViTs, and SlimSAM's ViT-B pruned to 50 % / 23 % (the two fields its published configs set).
_VITS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11), 3072),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23), 4096),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31), 5120),
    "slim_50": (384, 12, 12, (2, 5, 8, 11), 1536),
    "slim_77": (168, 12, 12, (2, 5, 8, 11), 696),
}
# Meta's decoder uses 8 heads everywhere; head count is not visible in tensor shapes.
_DECODER_HEADS = 8


def _classes(family: str):
    import transformers as tf

    if family == "sam":
        return tf.SamConfig, tf.SamVisionConfig, tf.SamModel
    if family == "sam_hq":
        return tf.SamHQConfig, tf.SamHQVisionConfig, tf.SamHQModel
    raise TerrasamError(f"family {family!r} is not handled by terrasam.models.sam")


def model_class(family: str):
    """The transformers model class of a family ("sam" or "sam_hq")."""
    return _classes(family)[2]


def _make_config(family, *, hidden, depth, heads, global_idx, mlp_dim=None, out=256,
                 window=14, patch=16, image_size=1024, pos_feats=None, dec_hidden=256,
                 dec_mlp=2048, dec_layers=2, dec_downsample=2, iou_depth=3, iou_hidden=256,
                 mask_channels=16, multimask=3, qkv_bias=True, abs_pos=True):
    config_cls, vision_cls, _ = _classes(family)
    vision = vision_cls(
        hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
        global_attn_indexes=list(global_idx), mlp_dim=mlp_dim or 4 * hidden, output_channels=out,
        window_size=window, patch_size=patch, image_size=image_size,
        num_pos_feats=pos_feats or out // 2, qkv_bias=qkv_bias, use_abs_pos=abs_pos,
    )
    prompt = {"hidden_size": dec_hidden, "image_size": image_size, "patch_size": patch,
              "mask_input_channels": mask_channels}
    decoder = {"hidden_size": dec_hidden, "mlp_dim": dec_mlp, "num_hidden_layers": dec_layers,
               "num_attention_heads": _DECODER_HEADS, "attention_downsample_rate": dec_downsample,
               "num_multimask_outputs": multimask, "iou_head_depth": iou_depth,
               "iou_head_hidden_dim": iou_hidden}
    if family == "sam_hq":
        decoder["vit_dim"] = hidden
    return config_cls(vision_config=vision, prompt_encoder_config=prompt,
                      mask_decoder_config=decoder)


def build_config(family: str, variant: str, size: str = "full"):
    """The transformers config of a SAM / SAM-HQ variant; "tiny" is a small test model."""
    if size == "tiny":
        return _make_config(family, hidden=32, depth=2, heads=2, global_idx=(1,), mlp_dim=64,
                            out=32, window=8, dec_hidden=32, dec_mlp=64, iou_hidden=32)
    if size != "full":
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    if variant not in _VITS:
        raise TerrasamError(f"unknown {family} variant {variant!r}; known: {', '.join(_VITS)}")
    hidden, depth, heads, global_idx, mlp = _VITS[variant]
    return _make_config(family, hidden=hidden, depth=depth, heads=heads, global_idx=global_idx,
                        mlp_dim=mlp)


# ---------------------------------------------------------------------------------------------
# Meta <-> transformers state dicts

# (Meta key prefix, transformers key prefix); "{i}" is a block index. More specific rules first.
_RULES = [
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.blocks.{i}.norm1.", "vision_encoder.layers.{i}.layer_norm1."),
    ("image_encoder.blocks.{i}.norm2.", "vision_encoder.layers.{i}.layer_norm2."),
    ("image_encoder.blocks.{i}.attn.", "vision_encoder.layers.{i}.attn."),
    ("image_encoder.blocks.{i}.mlp.", "vision_encoder.layers.{i}.mlp."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
     "prompt_encoder.shared_embedding.positional_embedding"),
    ("prompt_encoder.point_embeddings.{i}.", "prompt_encoder.point_embed.{i}."),
    ("prompt_encoder.not_a_point_embed.", "prompt_encoder.not_a_point_embed."),
    ("prompt_encoder.no_mask_embed.", "prompt_encoder.no_mask_embed."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("mask_decoder.transformer.layers.{i}.norm1.", "mask_decoder.transformer.layers.{i}.layer_norm1."),
    ("mask_decoder.transformer.layers.{i}.norm2.", "mask_decoder.transformer.layers.{i}.layer_norm2."),
    ("mask_decoder.transformer.layers.{i}.norm3.", "mask_decoder.transformer.layers.{i}.layer_norm3."),
    ("mask_decoder.transformer.layers.{i}.norm4.", "mask_decoder.transformer.layers.{i}.layer_norm4."),
    ("mask_decoder.transformer.layers.{i}.self_attn.",
     "mask_decoder.transformer.layers.{i}.self_attn."),
    ("mask_decoder.transformer.layers.{i}.cross_attn_token_to_image.",
     "mask_decoder.transformer.layers.{i}.cross_attn_token_to_image."),
    ("mask_decoder.transformer.layers.{i}.cross_attn_image_to_token.",
     "mask_decoder.transformer.layers.{i}.cross_attn_image_to_token."),
    ("mask_decoder.transformer.layers.{i}.mlp.", "mask_decoder.transformer.layers.{i}.mlp."),
    ("mask_decoder.transformer.final_attn_token_to_image.",
     "mask_decoder.transformer.final_attn_token_to_image."),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.iou_token.", "mask_decoder.iou_token."),
    ("mask_decoder.mask_tokens.", "mask_decoder.mask_tokens."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    # SAM-HQ
    ("mask_decoder.hf_token.", "mask_decoder.hq_token."),
    ("mask_decoder.compress_vit_feat.0.", "mask_decoder.compress_vit_conv1."),
    ("mask_decoder.compress_vit_feat.1.", "mask_decoder.compress_vit_norm."),
    ("mask_decoder.compress_vit_feat.3.", "mask_decoder.compress_vit_conv2."),
    ("mask_decoder.embedding_encoder.0.", "mask_decoder.encoder_conv1."),
    ("mask_decoder.embedding_encoder.1.", "mask_decoder.encoder_norm."),
    ("mask_decoder.embedding_encoder.3.", "mask_decoder.encoder_conv2."),
    ("mask_decoder.embedding_maskfeature.0.", "mask_decoder.mask_conv1."),
    ("mask_decoder.embedding_maskfeature.1.", "mask_decoder.mask_norm."),
    ("mask_decoder.embedding_maskfeature.3.", "mask_decoder.mask_conv2."),
]
# MLP heads: Meta numbers all layers (layers.0 .. layers.{n-1}); transformers names them
# proj_in, layers.0 .. layers.{n-3}, proj_out.
_MLPS = [
    ("mask_decoder.output_hypernetworks_mlps.{i}.", "mask_decoder.output_hypernetworks_mlps.{i}."),
    ("mask_decoder.iou_prediction_head.", "mask_decoder.iou_prediction_head."),
    ("mask_decoder.hf_mlp.", "mask_decoder.hq_mask_mlp."),
]
_TIED = "shared_image_embedding.positional_embedding"
_META_IGNORED = ("pixel_mean", "pixel_std")  # buffers some exports carry; fixed constants


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


_META_TO_HF = [(_pattern(m), h) for m, h in _RULES]
_HF_TO_META = [(_pattern(h), m) for m, h in _RULES]


def _mlp_regex(prefix: str, tail: str) -> re.Pattern:
    head = re.escape(prefix).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile("^(?P<prefix>" + head + ")" + tail)


_MLP_FROM_META = [(_mlp_regex(m, r"layers\.(?P<k>\d+)\.(?P<rest>.+)$"), m, h) for m, h in _MLPS]
_MLP_FROM_HF = [(_mlp_regex(h, r"(?P<part>proj_in|proj_out|layers\.(?P<k>\d+))\.(?P<rest>.+)$"),
                 m, h) for m, h in _MLPS]


def _fill(template: str, match: re.Match) -> str:
    return template.replace("{i}", match.groupdict().get("i") or "")


def _rename(key: str, rules) -> str | None:
    for pattern, target in rules:
        m = pattern.match(key)
        if m:
            return _fill(target, m) + key[m.end():]
    return None


def _mlp_depths(keys, regexes) -> dict[str, int]:
    """Number of linear layers of each MLP head, by its prefix in the given layout."""
    depth: dict[str, int] = {}
    for key in keys:
        for regex, _, _ in regexes:
            m = regex.match(key)
            if m:
                k = m.group("k")
                idx = int(k) if k is not None else -1
                depth[m.group("prefix")] = max(depth.get(m.group("prefix"), 0), idx + 1)
    return depth


def _meta_key_to_hf(key: str, depths: dict[str, int]) -> str | None:
    for regex, _, hf in _MLP_FROM_META:
        m = regex.match(key)
        if m:
            k, n = int(m.group("k")), depths[m.group("prefix")]
            part = "proj_in" if k == 0 else "proj_out" if k == n - 1 else f"layers.{k - 1}"
            return f"{_fill(hf, m)}{part}.{m.group('rest')}"
    return _rename(key, _META_TO_HF)


def _hf_key_to_meta(key: str, depths: dict[str, int]) -> str | None:
    for regex, meta, _ in _MLP_FROM_HF:
        m = regex.match(key)
        if m:
            part = m.group("part")
            n = depths[m.group("prefix")] + 2  # middle layers + proj_in + proj_out
            k = 0 if part == "proj_in" else n - 1 if part == "proj_out" else int(m.group("k")) + 1
            return f"{_fill(meta, m)}layers.{k}.{m.group('rest')}"
    return _rename(key, _HF_TO_META)


def looks_like(meta_state_dict: dict) -> bool:
    """True when a Meta state dict is SAM or SAM-HQ (a ViT image encoder with SAM's decoder)."""
    return ("image_encoder.patch_embed.proj.weight" in meta_state_dict
            and any(k.startswith("mask_decoder.") for k in meta_state_dict)
            and any(k.startswith("image_encoder.blocks.") for k in meta_state_dict))


def _count(sd: dict, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := regex.match(k))})


def _infer_config(sd: dict):
    """Build the transformers config matching a Meta SAM / SAM-HQ state dict's shapes."""
    family = "sam_hq" if "mask_decoder.hf_token.weight" in sd else "sam"
    patch_w = sd["image_encoder.patch_embed.proj.weight"]
    hidden, patch = patch_w.shape[0], patch_w.shape[-1]
    depth = _count(sd, r"^image_encoder\.blocks\.(\d+)\.")
    if "image_encoder.blocks.0.attn.rel_pos_h" not in sd:
        raise TerrasamError("this SAM checkpoint has no relative position tables; only Meta's "
                            "ViT image encoders (vit_b, vit_l, vit_h) are supported")
    pos = sd.get("image_encoder.pos_embed")
    if pos is None:
        raise TerrasamError("this SAM checkpoint has no image_encoder.pos_embed; only Meta's ViT "
                            "image encoders are supported")
    grid = pos.shape[1]
    heads = hidden // sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    global_idx, window = [], 14
    for i in range(depth):
        n = sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0]
        if n == 2 * grid - 1:
            global_idx.append(i)
        else:
            window = (n + 1) // 2
    dec_hidden = sd["mask_decoder.iou_token.weight"].shape[1]
    q = sd["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"]
    config = _make_config(
        family, hidden=hidden, depth=depth, heads=heads, global_idx=global_idx,
        mlp_dim=sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0],
        out=sd["image_encoder.neck.0.weight"].shape[0], window=window, patch=patch,
        image_size=grid * patch,
        pos_feats=sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].shape[1],
        dec_hidden=dec_hidden,
        dec_mlp=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        dec_layers=_count(sd, r"^mask_decoder\.transformer\.layers\.(\d+)\."),
        dec_downsample=dec_hidden // q.shape[0],
        iou_depth=_count(sd, r"^mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
        iou_hidden=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        mask_channels=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        multimask=sd["mask_decoder.mask_tokens.weight"].shape[0] - 1,
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in sd,
    )
    return family, config


def spec_for_config(family: str, config) -> ModelSpec:
    """The registry spec whose full config has this architecture, or a "custom" spec."""
    v = config.vision_config
    for spec in MODELS.values():
        if spec.family != family or spec.variant not in _VITS:
            continue
        if (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, tuple(v.global_attn_indexes),
                v.mlp_dim, v.image_size) == (*_VITS[spec.variant], 1024):
            return spec
    base = MODELS["sam-hq-vit-b" if family == "sam_hq" else "sam-vit-b"]
    return replace(base, model_id=f"{base.model_id.rsplit('-vit', 1)[0]}-custom", variant="custom",
                   image_size=v.image_size, meta_file=None, meta_url=None, params_m=0.0,
                   description=f"custom ViT ({v.hidden_size} wide, {v.num_hidden_layers} blocks)")


def meta_to_hf(meta_state_dict: dict):
    """Convert a Meta SAM / SAM-HQ state dict: (config, transformers state dict, spec guess)."""
    if not looks_like(meta_state_dict):
        raise TerrasamError("not a SAM or SAM-HQ checkpoint (no image_encoder / mask_decoder keys)")
    sd = {k: v for k, v in meta_state_dict.items() if k not in _META_IGNORED}
    try:
        family, config = _infer_config(sd)
    except KeyError as exc:
        raise TerrasamError(f"the SAM checkpoint is incomplete: missing key {exc.args[0]}") from None
    depths = _mlp_depths(sd, _MLP_FROM_META)
    out = {}
    for key, value in sd.items():
        new = _meta_key_to_hf(key, depths)
        if new is None:
            raise TerrasamError(f"unexpected key {key!r} in the {family} checkpoint")
        out[new] = value
    tied = "prompt_encoder.shared_embedding.positional_embedding"
    if tied in out:
        out[_TIED] = out[tied]
    return config, out, spec_for_config(family, config)


def hf_to_meta(hf_state_dict: dict, config=None) -> dict:
    """Convert a transformers SamModel / SamHQModel state dict to Meta's layout (exact inverse)."""
    depths = _mlp_depths(hf_state_dict, _MLP_FROM_HF)  # number of middle layers per head
    out = {}
    for key, value in hf_state_dict.items():
        if key == _TIED:
            continue
        new = _hf_key_to_meta(key, depths)
        if new is None:
            raise TerrasamError(f"unexpected key {key!r} in the transformers SAM state dict")
        out[new] = value
    return out


# ---------------------------------------------------------------------------------------------
# The adapter


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """(h, w) after resizing the longest side to long_side, rounded like segment_anything."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image as segment_anything's ResizeLongestSide.apply_image
    (PIL bilinear on the uint8 image)."""
    h, w = image.shape[:2]
    new_h, new_w = preprocess_shape(h, w, long_side)
    if (new_h, new_w) == (h, w):
        return image
    return np.array(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def _as_tensor(x, dtype=torch.float64) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


class SamAdapter(Adapter):
    """SAM or SAM-HQ through transformers, with segment_anything's pre- and postprocessing."""

    encoder = None  # an ORT image encoder (terrasam.models.onnx_backend) instead of torch's

    def __init__(self, model, spec: ModelSpec, device, dtype):
        self._setup(model, spec, device, dtype)
        cfg = model.config
        self.image_size = int(cfg.vision_config.image_size)
        self.low_res_size = 4 * int(cfg.prompt_encoder_config.image_embedding_size)
        self._hq = self.family == "sam_hq"
        self._mean = torch.tensor(PIXEL_MEAN, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(PIXEL_STD, device=self.device).view(3, 1, 1)
        self._cache = fd.SideCache()

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """(1, 3, S, S) normalised, padded model input and the resized (h, w)."""
        resized = resize_longest_side(_check_image(image), self.image_size)
        h, w = resized.shape[:2]
        x = torch.from_numpy(resized).to(self.device).permute(2, 0, 1).float()
        x = (x - self._mean) / self._std
        x = F.pad(x, (0, self.image_size - w, 0, self.image_size - h))
        return x[None].to(self.dtype), (h, w)

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> Embedding:
        """Run the image encoder on an (H, W, 3) uint8 RGB image."""
        x, input_size = self.preprocess(image)
        out = self.model.vision_encoder(x) if self.encoder is None else self.encoder(x)
        extra = {}
        if self._hq:
            # the HQ decoder only reads the output of the first global-attention block
            extra["intermediate_embeddings"] = [out.intermediate_embeddings[0]]
        return Embedding(features=out.last_hidden_state, original_size=tuple(image.shape[:2]),
                         input_size=input_size, extra=extra)

    def _scale(self, embedding: Embedding) -> torch.Tensor:
        (h, w), (nh, nw) = embedding.original_size, embedding.input_size
        return torch.tensor([nw / w, nh / h], dtype=torch.float64)

    @torch.inference_mode()
    def decode(self, embedding, points=None, point_labels=None, boxes=None, mask_inputs=None,
               multimask=True, iou_thresh=None):
        """Decode B prompts against one embedding: ((B, M, 256, 256) logits, (B, M) IoU).

        With iou_thresh, masks whose predicted IoU is below it come back as -inf logits and
        prompts without any such mask skip the mask upscaling."""
        scale = self._scale(embedding)
        pts = labels = bxs = None
        sizes = []
        if points is not None:
            pts = _as_tensor(points)
            if pts.ndim != 3 or pts.shape[-1] != 2:
                raise ValueError(f"points must be (B, N, 2), got {tuple(pts.shape)}")
            pts = (pts * scale).float()
            labels = (torch.ones(pts.shape[:2], dtype=torch.int64) if point_labels is None
                      else _as_tensor(point_labels, torch.int64))
            sizes.append(pts.shape[0])
        if boxes is not None:
            bxs = _as_tensor(boxes).reshape(-1, 2, 2)
            bxs = (bxs * scale).reshape(-1, 4).float()
            sizes.append(bxs.shape[0])
        if mask_inputs is not None:
            sizes.append(mask_inputs.shape[0])
        if not sizes:
            raise ValueError("decode needs points, boxes or mask_inputs")
        if len(set(sizes)) != 1:
            raise ValueError(f"points, boxes and mask_inputs disagree on the batch size: {sizes}")
        b = sizes[0]
        pe_mod, dev = self.model.prompt_encoder, self.device
        sparse = None
        if pts is not None or bxs is not None:
            sparse, _ = pe_mod(
                input_points=None if pts is None else pts.reshape(1, b, -1, 2).to(dev),
                input_labels=None if pts is None else labels.reshape(1, b, -1).to(dev),
                input_boxes=None if bxs is None else bxs.reshape(1, b, 4).to(dev),
                input_masks=None)
            sparse = sparse.reshape(b, -1, sparse.shape[-1]).to(self.dtype)
        dense = None
        if mask_inputs is not None:
            dense = pe_mod.mask_embed(mask_inputs.to(dev, self.dtype))
        logits, iou = self._run_decoder(embedding, sparse, dense, b, multimask, iou_thresh)
        return logits.float(), iou.float()

    def _per_image(self, embedding) -> dict:
        """Decoder work that depends only on the image, once per embedding."""

        def make():
            model, dec = self.model, self.model.mask_decoder
            pe = model.get_image_wide_positional_embeddings().to(self.dtype)
            no_mask = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            out = {"pe": pe, "side": fd.image_side(dec.transformer, embedding.features + no_mask,
                                                   pe),
                   "head": fd.mask_head(dec)}
            if self._hq:
                out["hq_features"] = self._hq_features(embedding)
            return out

        with torch.inference_mode():
            return self._cache.get(embedding, make)

    def _hq_features(self, embedding) -> torch.Tensor:
        dec = self.model.mask_decoder
        feats = embedding.features
        x = dec.encoder_conv2(dec.activation(dec.encoder_norm(dec.encoder_conv1(feats))))
        inter = embedding.extra.get("intermediate_embeddings")
        if inter:
            vit = inter[0].permute(0, 3, 1, 2).contiguous()
            v = dec.compress_vit_conv1(vit)
            x = x + dec.compress_vit_conv2(dec.activation(dec.compress_vit_norm(v)))
        return x

    def _run_decoder(self, embedding, sparse, dense, b, multimask, iou_thresh):
        """transformers' SamMaskDecoder / SamHQMaskDecoder forward with the prompts as the
        batch, per-image work shared (terrasam.models.fast_decoder) and, with iou_thresh,
        only the surviving masks upscaled."""
        dec = self.model.mask_decoder
        per = self._per_image(embedding)
        side = per["side"] if dense is None else fd.image_side(
            dec.transformer, embedding.features + dense, per["pe"])
        n_sam = len(dec.output_hypernetworks_mlps)
        out_tokens = [dec.iou_token.weight, dec.mask_tokens.weight]
        if self._hq:
            out_tokens.append(dec.hq_token.weight)
        tokens = torch.cat(out_tokens).to(self.dtype)
        tokens = tokens[None].expand(b, -1, -1)
        if sparse is not None:
            tokens = torch.cat([tokens, sparse], dim=1)
        queries, keys = self._two_way(embedding, tokens.contiguous(), side, dense)
        iou_all = dec.iou_prediction_head(queries[:, 0])
        if multimask:
            iou = iou_all[:, 1:n_sam]
            order = torch.arange(1, n_sam, device=iou.device).expand(b, -1)
            if self._hq:
                # Meta's SAM-HQ returns ONE mask with multimask: the best of masks 1..3 by
                # predicted IoU, plus the HQ mask (transformers returns all three, sorted)
                iou, idx = torch.max(iou, dim=1, keepdim=True)
                order = idx + 1
        else:
            iou = iou_all[:, :1]
            order = torch.zeros(b, 1, dtype=torch.int64, device=iou.device)
        keep = torch.ones_like(iou, dtype=torch.bool) if iou_thresh is None else iou >= iou_thresh
        sel = keep.any(1).nonzero()[:, 0]
        h, w = embedding.features.shape[-2:]
        logits = torch.full((b, iou.shape[1], 4 * h, 4 * w), float("-inf"), dtype=queries.dtype,
                            device=queries.device)
        if len(sel):
            tok = queries[sel]
            hyper = torch.stack([dec.output_hypernetworks_mlps[i](tok[:, 1 + i])
                                 for i in range(n_sam)], dim=1)  # (s, n_sam, C/8)
            hyper = hyper.gather(1, order[sel, :, None].expand(-1, -1, hyper.shape[-1]))
            ks = keys[sel] if keys.shape[0] == b else keys.expand(len(sel), -1, -1)
            extra = (dec.hq_mask_mlp(tok[:, 1 + n_sam])[:, None],) if self._hq else ()
            out = self._mask_logits(embedding, per, ks, hyper, (h, w), *extra)
            logits[sel] = torch.where(keep[sel, :, None, None], out, float("-inf"))
        return logits, iou

    def _two_way(self, embedding, tokens, side, dense):
        """(queries, keys) of the two-way transformer (ONNX Runtime may take this over)."""
        return fd.two_way(self.model.mask_decoder.transformer, tokens, side)

    def _mask_logits(self, embedding, per, keys, hyper, hw, hq_hyper=None):
        """Mask logits of the selected prompts (ONNX Runtime may take this over)."""
        if self._hq:
            return self._hq_masks(per, keys, hyper, hq_hyper, hw)
        return fd.mask_logits(per["head"], keys, hyper, hw)

    def _hq_masks(self, per, keys, hyper, hq_hyper, hw):
        dec = self.model.mask_decoder
        outs = []
        for s in range(0, keys.shape[0], fd._UPSCALE_CHUNK):
            part = slice(s, s + fd._UPSCALE_CHUNK)
            up = fd.blocked_to_image(fd.upscaled_embedding(per["head"], keys[part], hw), hw)
            hq = dec.mask_conv2(dec.activation(dec.mask_norm(dec.mask_conv1(up))))
            hq = hq + per["hq_features"]
            sam = hyper[part] @ up.flatten(2)
            hq = hq_hyper[part] @ hq.flatten(2)
            outs.append((sam + hq).view(*sam.shape[:2], *up.shape[-2:]))
        return torch.cat(outs)

    @torch.inference_mode()
    def upscale(self, low_res_logits: torch.Tensor, embedding: Embedding) -> torch.Tensor:
        """Low-res logits to logits of the embedded image, as segment_anything's
        postprocess_masks: to the padded input size, crop the padding, to the original size."""
        lead = low_res_logits.shape[:-2]
        x = low_res_logits.float().reshape(-1, 1, *low_res_logits.shape[-2:])
        x = F.interpolate(x, (self.image_size, self.image_size), mode="bilinear",
                          align_corners=False)
        x = x[..., : embedding.input_size[0], : embedding.input_size[1]]
        if tuple(x.shape[-2:]) != tuple(embedding.original_size):  # same size: a copy, skipped
            x = F.interpolate(x, tuple(embedding.original_size), mode="bilinear",
                              align_corners=False)
        return x.reshape(*lead, *x.shape[-2:])
