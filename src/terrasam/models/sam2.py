"""SAM 2 and SAM 2.1: configs, Meta <-> transformers key conversion, and the adapter.

Only the image model (image encoder, prompt encoder, mask decoder) is used: the video
memory modules in Meta's checkpoints are dropped by name on load.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from terrasam.errors import TerrasamError
from terrasam.models import fast_decoder as fd
from terrasam.models.base import Adapter, Embedding
from terrasam.models.registry import MODELS, ModelSpec

FAMILIES = ("sam2",)
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
VARIANTS = ("hiera_t", "hiera_s", "hiera_b+", "hiera_l")
_NAMES = {"hiera_t": "tiny", "hiera_s": "small", "hiera_b+": "base-plus", "hiera_l": "large"}

# Hiera trunks of Meta's configs (sam2/configs/sam2.1/sam2.1_hiera_*.yaml): embed dim, heads
# of stage 1 (doubled each stage), blocks per stage, global attention blocks, window sizes,
# background size of the windowed positional embedding.
_FULL = {
    "hiera_t": (96, 1, (1, 2, 7, 2), (5, 7, 9), (8, 4, 14, 7), (7, 7)),
    "hiera_s": (96, 1, (1, 2, 11, 2), (7, 10, 13), (8, 4, 14, 7), (7, 7)),
    "hiera_b+": (112, 2, (2, 3, 16, 3), (12, 16, 20), (8, 4, 14, 7), (14, 14)),
    "hiera_l": (144, 2, (2, 6, 36, 4), (23, 33, 43), (8, 4, 16, 8), (7, 7)),
}
# Tiny test models: the same shape differences between variants, at a fraction of the size,
# so that the variant of a tiny Meta checkpoint is recognisable from its shapes too.
_TINY = {
    "hiera_t": (16, 1, (1, 1, 2, 1), (3,), (8, 4, 14, 7), (7, 7)),
    "hiera_s": (16, 1, (1, 1, 3, 1), (3,), (8, 4, 14, 7), (7, 7)),
    "hiera_b+": (24, 1, (1, 1, 2, 1), (3,), (8, 4, 14, 7), (14, 14)),
    "hiera_l": (32, 1, (1, 1, 3, 1), (4,), (8, 4, 16, 8), (7, 7)),
}

# Keys of Meta's SAM2Base used only for video (memory attention / encoder, object pointers).
_VIDEO_PREFIXES = ("memory_attention.", "memory_encoder.", "obj_ptr_proj.", "obj_ptr_tpos_proj.",
                   "mask_downsample.")
_VIDEO_KEYS = ("maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial")
# Present in SAM 2.1 checkpoints only.
_SAM21_KEYS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight")
_PE = "prompt_encoder.shared_embedding.positional_embedding"
_TIED = "shared_image_embedding.positional_embedding"  # a copy of _PE in transformers
_POINT_EMBED = "prompt_encoder.point_embed.weight"  # Meta: four (1, C) embeddings


def _make_config(trunk, size: str):
    from transformers import Sam2Config

    dim, heads, blocks, global_blocks, windows, bkg = trunk
    dims = [dim * 2**i for i in range(4)]
    hidden = 256 if size == "full" else 32
    vision = {
        "backbone_config": {
            "model_type": "sam2_hiera_det_model",
            "hidden_size": dim,
            "embed_dim_per_stage": dims,
            "num_attention_heads_per_stage": [heads * 2**i for i in range(4)],
            "blocks_per_stage": list(blocks),
            "global_attention_blocks": list(global_blocks),
            "window_size_per_stage": list(windows),
            "window_positional_embedding_background_size": list(bkg),
        },
        "model_type": "sam2_vision_model",
        "backbone_channel_list": dims[::-1],
        "fpn_hidden_size": hidden,
    }
    prompt = {"hidden_size": hidden}
    decoder = {"hidden_size": hidden}
    if size == "tiny":
        prompt["mask_input_channels"] = 8
        decoder.update(mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    return Sam2Config(vision_config=vision, prompt_encoder_config=prompt,
                      mask_decoder_config=decoder)


def build_config(family: str, variant: str, size: str = "full"):
    """The transformers Sam2Config of a Hiera variant; "tiny" is a small, fast test model."""
    if family not in FAMILIES:
        raise TerrasamError(f"family {family!r} is not handled by terrasam.models.sam2")
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    if variant not in VARIANTS:
        raise TerrasamError(f"unknown SAM 2 variant {variant!r}; known: {', '.join(VARIANTS)}")
    return _make_config((_FULL if size == "full" else _TINY)[variant], size)


def model_class(family: str = "sam2"):
    """The transformers model class of SAM 2 / 2.1 (the image model)."""
    from transformers import Sam2Model

    return Sam2Model


_TRUNK_FIELDS = ("hidden_size", "embed_dim_per_stage", "num_attention_heads_per_stage",
                 "blocks_per_stage", "global_attention_blocks", "window_size_per_stage",
                 "window_positional_embedding_background_size")


_HEAD_FIELDS = ("hidden_size", "mlp_dim", "num_hidden_layers", "num_attention_heads",
                "iou_head_hidden_dim", "mask_input_channels", "image_size", "patch_size")


def _signature(config) -> tuple:
    trunk = config.vision_config.backbone_config
    heads = (config.mask_decoder_config, config.prompt_encoder_config)
    return (json.dumps([getattr(trunk, f) for f in _TRUNK_FIELDS]),
            config.vision_config.fpn_hidden_size,
            json.dumps([getattr(c, f, None) for c in heads for f in _HEAD_FIELDS]))


def spec_for_config(family: str, config) -> ModelSpec:
    """The SAM 2.1 registry spec whose full or tiny config this is (SAM 2 and 2.1 share the
    image architecture: the 2.1 id is returned), else a "sam2-custom" spec."""
    sig = _signature(config)
    for variant in VARIANTS:
        for size in ("full", "tiny"):
            if _signature(build_config("sam2", variant, size)) == sig:
                return MODELS[f"sam2.1-hiera-{_NAMES[variant]}"]
    base = MODELS["sam2.1-hiera-tiny"]
    return replace(base, model_id="sam2-custom", variant="custom", meta_file=None, meta_url=None,
                   params_m=0.0, description="custom Hiera")


# ---------------------------------------------------------------------------------------------
# Meta <-> transformers state dicts

# transformers name -> Meta name, applied in order to the part after the module prefix.
_SUBS = [
    (r"^vision_encoder\.backbone\.", "image_encoder.trunk."),
    (r"^vision_encoder\.neck\.convs\.(\d+)\.", r"image_encoder.neck.convs.\1.conv."),
    (r"^prompt_encoder\.", "sam_prompt_encoder."),
    (r"^mask_decoder\.", "sam_mask_decoder."),
    (r"^no_memory_embedding$", "no_mem_embed"),
    (r"\.patch_embed\.projection\.", ".patch_embed.proj."),
    (r"\.mask_embed\.conv1\.", ".mask_downscaling.0."),
    (r"\.mask_embed\.layer_norm1\.", ".mask_downscaling.1."),
    (r"\.mask_embed\.conv2\.", ".mask_downscaling.3."),
    (r"\.mask_embed\.layer_norm2\.", ".mask_downscaling.4."),
    (r"\.mask_embed\.conv3\.", ".mask_downscaling.6."),
    (r"\.upscale_conv1\.", ".output_upscaling.0."),
    (r"\.upscale_layer_norm\.", ".output_upscaling.1."),
    (r"\.upscale_conv2\.", ".output_upscaling.3."),
    (r"\.layer_norm(\d)\.", r".norm\1."),
    (r"\.layer_norm_final_attn\.", ".norm_final_attn."),
    (r"\.o_proj\.", ".out_proj."),
    (r"\.shared_embedding\.positional_embedding$", ".pe_layer.positional_encoding_gaussian_matrix"),
]
_SUBS = [(re.compile(a), b) for a, b in _SUBS]
# Feed-forward stacks: Meta numbers every linear layer (layers.0 .. layers.{n-1}), transformers
# names them proj_in, layers.0 .. layers.{n-3}, proj_out (n from the config: _ffn_depth).
_FFN = re.compile(
    r"^(?P<head>.*?(?:\.mlp|output_hypernetworks_mlps\.\d+|iou_prediction_head"
    r"|pred_obj_score_head))\.(?P<part>proj_in|proj_out|layers\.(?P<k>\d+))\.(?P<rest>[^.]+)$"
)


def _ffn_depth(head: str, config) -> int:
    if head.startswith("vision_encoder."):
        return 2
    if ".transformer.layers." in head:
        return config.mask_decoder_config.num_hidden_layers
    if head.endswith("iou_prediction_head"):
        return config.mask_decoder_config.iou_head_depth
    return 3  # hypernetwork MLPs and the object score head


_TIMM_TRUNK = ("vision_encoder.backbone.timm_model.", "image_encoder.trunk.body.")  # EdgeTAM


def _hf_key_to_meta(key: str, config) -> str:
    if key.startswith(_TIMM_TRUNK[0]):  # a timm trunk keeps timm's names under both prefixes
        return _TIMM_TRUNK[1] + key[len(_TIMM_TRUNK[0]):]
    m = _FFN.match(key)
    if m:
        n = _ffn_depth(m.group("head"), config)
        part = m.group("part")
        k = 0 if part == "proj_in" else n - 1 if part == "proj_out" else int(m.group("k")) + 1
        key = f"{m.group('head')}.layers.{k}.{m.group('rest')}"
    for pattern, repl in _SUBS:
        key = pattern.sub(repl, key)
    return key


@functools.lru_cache(maxsize=16)
def _hf_shapes(config_json: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the transformers state dict of a config (built without memory): a
    Sam2Model, or the model class of its model_type (EdgeTamModel for EdgeTAM)."""
    from transformers import CONFIG_MAPPING, MODEL_MAPPING

    config_dict = json.loads(config_json)
    config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    with torch.device("meta"):
        model = MODEL_MAPPING[type(config)](config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shapes_of(config) -> dict[str, tuple[int, ...]]:
    return _hf_shapes(config.to_json_string(use_diff=False))


def _meta_image_shapes(config) -> dict[str, tuple[int, ...]]:
    """Meta key -> shape of the image-model part of a Meta checkpoint of this config."""
    out = {}
    for key, shape in _shapes_of(config).items():
        if key == _TIED:
            continue
        if key == _POINT_EMBED:
            for i in range(shape[0]):
                out[f"sam_prompt_encoder.point_embeddings.{i}.weight"] = (1, shape[1])
            continue
        out[_hf_key_to_meta(key, config)] = shape
    return out


def video_key_shapes(d: int = 256, version: str = "2.1") -> dict[str, tuple[int, ...]]:
    """Shapes of the video-only tensors of a Meta SAM 2 / 2.1 checkpoint with model width d.

    For d=256 these are exactly the tensors of Meta's released checkpoints (all variants).
    """
    mem = max(d // 4, 4)  # memory width: 64 in Meta's models
    s = {"maskmem_tpos_enc": (7, 1, 1, mem), "no_mem_pos_enc": (1, 1, d), "no_obj_ptr": (1, d)}
    if version == "2.1":
        s["no_obj_embed_spatial"] = (1, mem)
    s["mask_downsample.weight"], s["mask_downsample.bias"] = (1, 1, 4, 4), (1,)

    def linear(name, n_out, n_in):
        s[f"{name}.weight"], s[f"{name}.bias"] = (n_out, n_in), (n_out,)

    for i in range(4):
        p = f"memory_attention.layers.{i}"
        for att, kv in (("self_attn", d), ("cross_attn_image", mem)):
            linear(f"{p}.{att}.q_proj", d, d)
            linear(f"{p}.{att}.k_proj", d, kv)
            linear(f"{p}.{att}.v_proj", d, kv)
            linear(f"{p}.{att}.out_proj", d, d)
        linear(f"{p}.linear1", 8 * d, d)
        linear(f"{p}.linear2", d, 8 * d)
        for n in (1, 2, 3):
            s[f"{p}.norm{n}.weight"], s[f"{p}.norm{n}.bias"] = (d,), (d,)
    s["memory_attention.norm.weight"], s["memory_attention.norm.bias"] = (d,), (d,)
    chans = [1, 4, 16, 64, d]
    p = "memory_encoder.mask_downsampler.encoder"
    for i in range(4):
        s[f"{p}.{3 * i}.weight"] = (chans[i + 1], chans[i], 3, 3)
        s[f"{p}.{3 * i}.bias"] = (chans[i + 1],)
        s[f"{p}.{3 * i + 1}.weight"] = s[f"{p}.{3 * i + 1}.bias"] = (chans[i + 1],)
    s[f"{p}.12.weight"], s[f"{p}.12.bias"] = (d, d, 1, 1), (d,)
    s["memory_encoder.pix_feat_proj.weight"] = (d, d, 1, 1)
    s["memory_encoder.pix_feat_proj.bias"] = (d,)
    for i in range(2):
        p = f"memory_encoder.fuser.layers.{i}"
        s[f"{p}.gamma"] = (d,)
        s[f"{p}.dwconv.weight"], s[f"{p}.dwconv.bias"] = (d, 1, 7, 7), (d,)
        s[f"{p}.norm.weight"], s[f"{p}.norm.bias"] = (d,), (d,)
        linear(f"{p}.pwconv1", 4 * d, d)
        linear(f"{p}.pwconv2", d, 4 * d)
    s["memory_encoder.out_proj.weight"], s["memory_encoder.out_proj.bias"] = (mem, d, 1, 1), (mem,)
    for i in range(3):
        linear(f"obj_ptr_proj.layers.{i}", d, d)
    if version == "2.1":
        linear("obj_ptr_tpos_proj", mem, d)
    return s


def _is_video_key(key: str) -> bool:
    return key in _VIDEO_KEYS or key.startswith(_VIDEO_PREFIXES)


def looks_like(meta_state_dict: dict) -> bool:
    """True when a Meta state dict is SAM 2 / 2.1 (a Hiera trunk and SAM 2's decoder; a timm
    trunk, image_encoder.trunk.body, is EdgeTAM's)."""
    return (any(k.startswith("image_encoder.trunk.") for k in meta_state_dict)
            and any(k.startswith("sam_mask_decoder.") for k in meta_state_dict)
            and not any(k.startswith(_TIMM_TRUNK[1]) for k in meta_state_dict))


def _candidates(sd: dict, dim: int, depth: int):
    """(variant, size) pairs whose architecture has the trunk width and depth of sd."""
    pos = sd.get("image_encoder.trunk.pos_embed")
    if pos is None or pos.ndim != 4:
        raise TerrasamError("this SAM 2 checkpoint has no image_encoder.trunk.pos_embed; only "
                            "Meta's Hiera image encoders are supported")
    for size, table in (("full", _FULL), ("tiny", _TINY)):
        for variant, trunk in table.items():
            if trunk[0] == dim and sum(trunk[2]) == depth:
                yield variant, size


def shape_mismatch(image: dict, want: dict) -> list[str]:
    """Why image tensors are not an architecture's (want: key -> shape), worst first: a
    missing tensor, then a mis-shaped one (unknown keys are the caller's to judge)."""
    lacking = sorted(set(want) - set(image))
    wrong = sorted(k for k in want if k in image and tuple(image[k].shape) != want[k])
    out = []
    if lacking:
        out.append(f"it is incomplete, with no tensor {lacking[0]!r} ({len(lacking)} missing)")
    if wrong:
        out.append(f"tensor {wrong[0]!r} has shape {tuple(image[wrong[0]].shape)}, expected "
                   f"{want[wrong[0]]}")
    return out


def meta_to_hf(meta_state_dict: dict):
    """Convert a Meta SAM 2 / 2.1 state dict: (config, transformers state dict, spec guess).

    The architecture is recognised from the tensor shapes; video-only tensors are dropped by
    name; any other unknown, missing or mis-shaped tensor raises TerrasamError.
    """
    sd = meta_state_dict
    if not looks_like(sd):
        raise TerrasamError("not a SAM 2 checkpoint (no image_encoder.trunk / sam_mask_decoder "
                            "keys)")
    image = {k: v for k, v in sd.items() if not _is_video_key(k)}
    found = None
    dim = sd.get("image_encoder.trunk.pos_embed", torch.zeros(0, 0)).shape[1]
    depth = len({k.split(".")[3] for k in sd if k.startswith("image_encoder.trunk.blocks.")})
    for variant, size in _candidates(sd, dim, depth):
        config = build_config("sam2", variant, size)
        want = _meta_image_shapes(config)
        if set(want) == set(image) and all(tuple(image[k].shape) == s for k, s in want.items()):
            found = variant, size, config
            break
    if found is None:
        unknown = sorted(k for k in image if not k.startswith(
            ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")))
        if unknown:
            raise TerrasamError(f"unexpected key {unknown[0]!r} in the SAM 2 checkpoint "
                                f"({len(unknown)} unknown keys)")
        for variant, size in _candidates(sd, dim, depth):  # name what the nearest one lacks
            problems = shape_mismatch(image, _meta_image_shapes(build_config("sam2", variant,
                                                                             size)))
            if problems:
                raise TerrasamError(f"this SAM 2 checkpoint matches none of Meta's Hiera "
                                    f"architectures: {problems[0]}")
        raise TerrasamError(
            "this SAM 2 checkpoint matches none of Meta's Hiera architectures (tiny, small, "
            f"base-plus, large); trunk width {dim}, {depth} blocks")
    variant, size, config = found
    version = "2.1" if any(k in sd for k in _SAM21_KEYS) or not any(map(_is_video_key, sd)) \
        else "2"
    spec = MODELS[f"sam{version}-hiera-{_NAMES[variant]}"]
    return config, meta_image_to_hf(image, config), spec


def meta_image_to_hf(image: dict, config) -> dict:
    """The transformers state dict of config from the image-model tensors of a Meta state dict
    whose keys and shapes were checked against _meta_image_shapes(config)."""
    out = {}
    for key, shape in _shapes_of(config).items():
        if key == _TIED:
            continue
        if key == _POINT_EMBED:
            out[key] = torch.cat([image[f"sam_prompt_encoder.point_embeddings.{i}.weight"]
                                  for i in range(shape[0])])
        else:
            out[key] = image[_hf_key_to_meta(key, config)]
    out[_TIED] = out[_PE]
    return out


def hf_to_meta(hf_state_dict: dict, config, version: str = "2.1", video_seed: int | None = 0):
    """Convert a transformers Sam2Model state dict to Meta's layout (exact inverse of meta_to_hf).

    Meta stores one positional matrix where transformers keeps two (_PE and _TIED, equal in
    converted weights; Sam2Adapter ties them); the prompt encoder's is written.
    With video_seed set, the video-only tensors of a Meta checkpoint of this version ("2" or
    "2.1") are added as seeded random values, so that the file looks like Meta's.
    """
    if version not in ("2", "2.1"):
        raise ValueError(f"version must be '2' or '2.1', not {version!r}")
    pe = hf_state_dict[_PE]
    out = {}
    for key, value in hf_state_dict.items():
        if key == _TIED:
            continue
        if key == _POINT_EMBED:
            for i in range(value.shape[0]):
                out[f"sam_prompt_encoder.point_embeddings.{i}.weight"] = value[i : i + 1].clone()
            continue
        out[_hf_key_to_meta(key, config)] = value
    if video_seed is not None:
        gen = torch.Generator().manual_seed(video_seed)
        d = config.vision_config.fpn_hidden_size
        for key, shape in video_key_shapes(d, version).items():
            out[key] = (torch.randn(shape, generator=gen) * 0.02).to(pe.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# The adapter


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def _as_tensor(x, dtype=torch.float64) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def preprocess(image: np.ndarray, size: int, mean=IMAGE_MEAN, std=IMAGE_STD,
               device="cpu") -> torch.Tensor:
    """(1, 3, size, size) float32 model input, as sam2's SAM2Transforms: [0, 1] floats, resized
    to a square without keeping the aspect ratio (bilinear, antialiased, as torchvision's
    Resize on a tensor), normalised with ImageNet mean and std."""
    x = torch.from_numpy(_check_image(image)).to(device).permute(2, 0, 1)[None].float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class Sam2Adapter(Adapter):
    """SAM 2 / 2.1 through transformers, with sam2's SAM2ImagePredictor pre- and postprocessing."""

    encoder = None  # an ORT image encoder (terrasam.models.onnx_backend) instead of torch's

    def __init__(self, model, spec: ModelSpec, device, dtype):
        self._setup(model, spec, device, dtype)
        cfg = model.config
        self.image_size = int(cfg.prompt_encoder_config.image_size)
        self.low_res_size = 4 * (self.image_size // int(cfg.prompt_encoder_config.patch_size))
        with torch.no_grad():
            # Meta's model has one Fourier matrix for prompts and the image-wide encoding;
            # transformers keeps a copy, which random weights may leave different.
            model.shared_image_embedding.positional_embedding.copy_(
                model.prompt_encoder.shared_embedding.positional_embedding)
        with torch.inference_mode():
            self._image_pe = model.get_image_wide_positional_embeddings()
        self._cache = fd.SideCache()

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> Embedding:
        """Run the image encoder; keeps the embedding and the two high-resolution levels."""
        h, w = np.asarray(image).shape[:2]
        x = preprocess(image, self.image_size, device=self.device).to(self.dtype)
        encode = self.model.get_image_embeddings if self.encoder is None else self.encoder
        *high_res, image_embed = encode(x)
        return Embedding(features=image_embed, original_size=(int(h), int(w)),
                         input_size=(self.image_size, self.image_size),
                         extra={"high_res": high_res})

    def _prompts(self, embedding, points, point_labels, boxes):
        """Points (with box corners first, labels 2 and 3) in model input pixels, as the
        official predictor with normalize_coords=True."""
        h, w = embedding.original_size
        scale = torch.tensor([self.image_size / w, self.image_size / h], dtype=torch.float64)
        coords, labels = [], []
        if boxes is not None:
            bxs = _as_tensor(boxes).reshape(-1, 2, 2)
            coords.append(bxs * scale)
            labels.append(torch.tensor([[2, 3]], dtype=torch.int64).expand(len(bxs), 2))
        if points is not None:
            pts = _as_tensor(points)
            if pts.ndim != 3 or pts.shape[-1] != 2:
                raise ValueError(f"points must be (B, N, 2), got {tuple(pts.shape)}")
            coords.append(pts * scale)
            labels.append(torch.ones(pts.shape[:2], dtype=torch.int64) if point_labels is None
                          else _as_tensor(point_labels, torch.int64).reshape(pts.shape[:2]))
        if not coords:
            return None, None
        if len({len(c) for c in coords}) != 1:
            raise ValueError("points and boxes disagree on the batch size")
        return torch.cat(coords, 1).float(), torch.cat(labels, 1)

    @torch.inference_mode()
    def decode(self, embedding, points=None, point_labels=None, boxes=None, mask_inputs=None,
               multimask=True, iou_thresh=None):
        """Decode B prompts against one embedding: ((B, M, 256, 256) logits, (B, M) IoU).

        With iou_thresh, masks whose predicted IoU is below it come back as -inf logits and
        prompts without any such mask skip the mask upscaling. (Single-mask output with
        dynamic selection: a prompt whose single-mask and best multimask IoU are both below
        it is skipped, and its IoU is the single-mask token's.)"""
        coords, labels = self._prompts(embedding, points, point_labels, boxes)
        model, dev = self.model, self.device
        if mask_inputs is not None:
            # the official predictor feeds back clamped low-res logits; clamping is idempotent
            mask_inputs = torch.as_tensor(mask_inputs).to(dev, self.dtype).clamp(-32.0, 32.0)
            if mask_inputs.ndim == 3:
                mask_inputs = mask_inputs[:, None]
        if coords is None and mask_inputs is None:
            raise ValueError("decode needs points, boxes or mask_inputs")
        b = len(coords) if coords is not None else len(mask_inputs)
        if mask_inputs is not None and len(mask_inputs) != b:
            raise ValueError("mask_inputs and the prompts disagree on the batch size")
        pe = model.prompt_encoder
        if coords is not None:
            # prompts as the image batch (B, 1, N): a padding point is appended, as upstream
            sparse, _ = pe(coords[:, None].to(dev), labels[:, None].to(dev), None, None)
        else:
            sparse = torch.zeros(b, 1, 0, pe.hidden_size, device=dev, dtype=self.dtype)
        if mask_inputs is not None:
            if mask_inputs.shape[-2:] != pe.mask_input_size:
                mask_inputs = F.interpolate(mask_inputs.float(), pe.mask_input_size,
                                            mode="bilinear", align_corners=False,
                                            antialias=True).to(self.dtype)
            dense = pe.mask_embed(mask_inputs)
        else:
            dense = None  # the no-mask embedding: per-image work is shared and cached
        logits, iou = self._run_decoder(embedding, sparse.to(self.dtype), dense, multimask,
                                        iou_thresh)
        return logits.float(), iou.float()

    def _per_image(self, embedding) -> dict:
        """Decoder work that depends only on the image, once per embedding."""

        def make():
            dec, pe = self.model.mask_decoder, self._image_pe.to(self.dtype)
            no_mask = self.model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            feat_s0, feat_s1 = embedding.extra["high_res"]
            return {"pe": pe,
                    "side": fd.image_side(dec.transformer, embedding.features + no_mask, pe),
                    "head": fd.mask_head(dec, feat_s0, feat_s1)}

        with torch.inference_mode():
            return self._cache.get(embedding, make)

    def _run_decoder(self, embedding, sparse, dense, multimask, iou_thresh=None):
        """transformers' Sam2MaskDecoder.forward with the prompts as the batch, per-image work
        shared (terrasam.models.fast_decoder) and, with iou_thresh, only the surviving masks
        upscaled. Like the official SAM2ImagePredictor, the object score is not applied."""
        dec = self.model.mask_decoder
        b = sparse.shape[0]
        per = self._per_image(embedding)
        side = per["side"] if dense is None else fd.image_side(
            dec.transformer, embedding.features + dense, per["pe"])
        tokens = torch.cat([dec.obj_score_token.weight, dec.iou_token.weight,
                            dec.mask_tokens.weight], dim=0).to(self.dtype)
        tokens = torch.cat([tokens[None].expand(b, -1, -1), sparse[:, 0]], dim=1)
        queries, keys = self._two_way(embedding, tokens.contiguous(), side, dense)
        iou_all = dec.iou_prediction_head(queries[:, 1])  # (B, 4)
        dynamic = not multimask and dec.dynamic_multimask_via_stability
        if multimask:
            iou, wanted = iou_all[:, 1:], list(range(1, dec.num_mask_tokens))
        elif dynamic:
            iou, wanted = iou_all[:, :1], list(range(dec.num_mask_tokens))
        else:
            iou, wanted = iou_all[:, :1], [0]
        if iou_thresh is None:
            keep = torch.ones_like(iou, dtype=torch.bool)
            sel = torch.arange(b, device=iou.device)
        else:
            keep = iou >= iou_thresh
            best = iou_all[:, 1:].amax(1, keepdim=True) if dynamic else iou
            sel = ((iou >= iou_thresh) | (best >= iou_thresh)).any(1).nonzero()[:, 0]
        h, w = embedding.features.shape[-2:]
        logits = torch.full((b, iou.shape[1], 4 * h, 4 * w), float("-inf"), dtype=queries.dtype,
                            device=queries.device)
        if len(sel):
            tok = queries[sel]
            hyper = torch.stack([dec.output_hypernetworks_mlps[i](tok[:, 2 + i]) for i in wanted],
                                dim=1)
            ks = keys[sel] if keys.shape[0] == b else keys.expand(len(sel), -1, -1)
            out = self._mask_logits(embedding, per, ks, hyper, (h, w))
            if dynamic:
                out, chosen = dec._dynamic_multimask_via_stability(out[:, None],
                                                                   iou_all[sel][:, None])
                out, iou = out[:, 0], iou.clone()
                iou[sel] = chosen[:, 0]
                if iou_thresh is not None:
                    keep[sel] = iou[sel] >= iou_thresh
            logits[sel] = torch.where(keep[sel, :, None, None], out, float("-inf"))
        return logits, iou

    def _two_way(self, embedding, tokens, side, dense):
        """(queries, keys) of the two-way transformer (ONNX Runtime may take this over)."""
        return fd.two_way(self.model.mask_decoder.transformer, tokens, side)

    def _mask_logits(self, embedding, per, keys, hyper, hw):
        """Mask logits of the selected prompts (ONNX Runtime may take this over)."""
        return fd.mask_logits(per["head"], keys, hyper, hw)

    @torch.inference_mode()
    def upscale(self, low_res_logits: torch.Tensor, embedding: Embedding) -> torch.Tensor:
        """Low-res logits straight to the original image size (bilinear, align_corners=False),
        as SAM2Transforms.postprocess_masks."""
        lead = low_res_logits.shape[:-2]
        x = low_res_logits.float().reshape(-1, 1, *low_res_logits.shape[-2:])
        x = F.interpolate(x, tuple(embedding.original_size), mode="bilinear", align_corners=False)
        return x.reshape(*lead, *x.shape[-2:])
