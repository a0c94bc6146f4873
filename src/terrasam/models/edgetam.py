"""EdgeTAM: SAM 2's prompt encoder and mask decoder behind a RepViT image encoder.

transformers' EdgeTamModel is a Sam2Model whose vision encoder is timm's ``repvit_m1``
(through TimmWrapperModel, features of its four stages) and SAM 2's FPN neck. EdgeTAM's image
predictor is sam2's SAM2ImagePredictor (1024 px square input, ImageNet mean and std), so the
adapter is Sam2Adapter unchanged. Only the image model is used: the video modules of Meta's
checkpoint (memory attention and encoder, the 2D spatial perceiver, object pointers) are
dropped by name on load.

timm, which imports torchvision, is an optional dependency: ``pip install 'terrasam[edgetam]'``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from terrasam.errors import TerrasamError
from terrasam.models import sam2
from terrasam.models.registry import MODELS, ModelSpec
from terrasam.models.sam2 import Sam2Adapter

FAMILIES = ("edgetam",)
VARIANTS = ("repvit_m1",)
INSTALL_HINT = "pip install 'terrasam[edgetam]'"
_ARCH = "repvit_m1"  # Meta's edgetam.yaml: TimmBackbone repvit_m1.dist_in1k, layer0..layer3
_FEATURES = {"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]}
# Tiny test models: repvit_m1's blocks at a fraction of its width (48, 96, 192, 384) and
# depth (2, 2, 14, 2), and the heads of SAM 2's tiny test models.
_TINY_TRUNK = {"embed_dim": [8, 16, 24, 32], "depth": [1, 1, 1, 1]}
_BODY = sam2._TIMM_TRUNK[1]  # Meta's TimmBackbone.body: timm's own key names below it
# Meta's video-only tensors: SAM 2's, plus EdgeTAM's spatial perceiver.
_VIDEO_PREFIXES = (*sam2._VIDEO_PREFIXES, "spatial_perceiver.")


def _timm_missing() -> str | None:
    """Why timm does not import here (None when it does)."""
    try:
        import timm  # noqa: F401  (imports torchvision)
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def check_available() -> None:
    """The one sentence saying how to install what EdgeTAM needs, unless timm imports."""
    reason = _timm_missing()
    if reason is not None:
        raise TerrasamError(f"EdgeTAM needs timm and torchvision, which do not import here "
                            f"({reason}): {INSTALL_HINT}")


def build_config(family: str, variant: str = _ARCH, size: str = "full"):
    """The transformers EdgeTamConfig: "full" is the published EdgeTAM, "tiny" a small, fast
    test model. (EdgeTamConfig()'s own default backbone is not RepViT: its backbone kwargs
    misspell "architecture", so the timm architecture is always given here.)"""
    if family not in FAMILIES:
        raise TerrasamError(f"family {family!r} is not handled by terrasam.models.edgetam")
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    if variant not in VARIANTS:
        raise TerrasamError(f"unknown EdgeTAM variant {variant!r}; known: {', '.join(VARIANTS)}")
    from transformers import EdgeTamConfig, TimmWrapperConfig

    full = size == "full"
    backbone = TimmWrapperConfig(architecture=_ARCH,
                                 model_args=dict(_FEATURES) if full else {**_FEATURES,
                                                                           **_TINY_TRUNK})
    widths = [48, 96, 192, 384] if full else _TINY_TRUNK["embed_dim"]
    hidden = 256 if full else 32
    vision = {"model_type": "edgetam_vision_model", "backbone_config": backbone,
              "backbone_channel_list": widths[::-1], "fpn_hidden_size": hidden}
    prompt = {"hidden_size": hidden}
    decoder = {"hidden_size": hidden}
    if not full:
        prompt["mask_input_channels"] = 8
        decoder.update(mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    return EdgeTamConfig(vision_config=vision, prompt_encoder_config=prompt,
                         mask_decoder_config=decoder)


def model_class(family: str = "edgetam"):
    """The transformers model class of EdgeTAM (the image model); needs timm."""
    check_available()
    from transformers import EdgeTamModel

    return EdgeTamModel


def save_random_hf(path, size: str = "tiny", seed: int = 0, prompt_sensitive: bool = False):
    """A seeded random-weight Hugging Face folder laid out as the published one, whose
    image-wide positional matrix is the prompt encoder's (Meta's model has one; the
    conversion copies it). Used by terrasam.testing.random_checkpoint."""
    from pathlib import Path

    from terrasam.testing import random_model

    model = random_model("edgetam", size, seed, prompt_sensitive)
    with torch.no_grad():
        model.shared_image_embedding.positional_embedding.copy_(
            model.prompt_encoder.shared_embedding.positional_embedding)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return path


def spec_for_config(family: str, config) -> ModelSpec:
    """The registry spec when config has the architecture of the full or tiny EdgeTAM, else an
    "edgetam-custom" spec."""
    shapes = sam2._shapes_of(config)
    for size in ("full", "tiny"):
        if sam2._shapes_of(build_config("edgetam", _ARCH, size)) == shapes:
            return MODELS["edgetam"]
    return replace(MODELS["edgetam"], model_id="edgetam-custom", variant="custom",
                   meta_file=None, meta_url=None, params_m=0.0, description="custom EdgeTAM")


# ---------------------------------------------------------------------------------------------
# Meta <-> transformers state dicts: SAM 2's mapping (terrasam.models.sam2), with the timm trunk
# image_encoder.trunk.body.* <-> vision_encoder.backbone.timm_model.*


def _is_video_key(key: str) -> bool:
    return key in sam2._VIDEO_KEYS or key.startswith(_VIDEO_PREFIXES)


def video_key_shapes(d: int = 256) -> dict[str, tuple[int, ...]]:
    """Shapes of the video-only tensors of a Meta EdgeTAM checkpoint with model width d.

    For d=256 these are exactly the tensors of Meta's edgetam.yaml model: SAM 2's memory
    modules with two memory-attention layers, and the 2D spatial perceiver (width 64, two
    layers, 256 global and 256 2D latents).
    """
    s = {k: v for k, v in sam2.video_key_shapes(d, "2").items()
         if not k.startswith(("memory_attention.layers.2.", "memory_attention.layers.3."))}
    mem = max(d // 4, 4)  # the memory width, also the perceiver's: 64 in Meta's model
    p = "spatial_perceiver"
    s[f"{p}.latents"] = s[f"{p}.latents_2d"] = (256, mem)
    for i in range(2):
        q = f"{p}.layers.{i}"
        for norm in ("attn.norm_x", "attn.norm_latents", "self_attn.norm"):
            s[f"{q}.{norm}.weight"] = s[f"{q}.{norm}.bias"] = (mem,)
        for att in ("attn", "self_attn"):
            s[f"{q}.{att}.to_q.weight"] = (mem, mem)
            s[f"{q}.{att}.to_kv.weight"] = (2 * mem, mem)
            s[f"{q}.{att}.to_out.weight"] = (mem, mem)
        for ff in ("ff", "self_ff"):
            s[f"{q}.{ff}.0.weight"] = s[f"{q}.{ff}.0.bias"] = (mem,)
            s[f"{q}.{ff}.1.weight"] = (4 * mem, mem)
            s[f"{q}.{ff}.3.weight"] = (mem, 4 * mem)
    s[f"{p}.norm.weight"] = s[f"{p}.norm.bias"] = (mem,)
    return s


def looks_like(meta_state_dict: dict) -> bool:
    """True when a Meta state dict is EdgeTAM's (a timm trunk and SAM 2's decoder)."""
    return (any(k.startswith(_BODY) for k in meta_state_dict)
            and any(k.startswith("sam_mask_decoder.") for k in meta_state_dict))


def _problems(image: dict, want: dict) -> list[str]:
    """Why the image tensors of a checkpoint are not those of an architecture, worst first."""
    unknown = sorted(set(image) - set(want))
    out = [f"unexpected key {unknown[0]!r} ({len(unknown)} unknown keys)"] if unknown else []
    return out + sam2.shape_mismatch(image, want)


def meta_to_hf(meta_state_dict: dict):
    """Convert a Meta EdgeTAM state dict: (config, transformers state dict, spec).

    Video-only tensors are dropped by name; any other unknown, missing or mis-shaped tensor
    raises TerrasamError naming it.
    """
    sd = meta_state_dict
    if not looks_like(sd):
        raise TerrasamError("not an EdgeTAM checkpoint (no image_encoder.trunk.body / "
                            "sam_mask_decoder keys)")
    check_available()
    image = {k: v for k, v in sd.items() if not _is_video_key(k)}
    nearest = None
    for size in ("full", "tiny"):
        config = build_config("edgetam", _ARCH, size)
        problems = _problems(image, sam2._meta_image_shapes(config))
        if not problems:
            return config, sam2.meta_image_to_hf(image, config), MODELS["edgetam"]
        if nearest is None or len(problems) < len(nearest):
            nearest = problems
    raise TerrasamError(f"this EdgeTAM checkpoint does not match EdgeTAM's architecture: "
                        f"{nearest[0]}")


def hf_to_meta(hf_state_dict: dict, config, video_seed: int | None = 0):
    """Convert a transformers EdgeTamModel state dict to Meta's layout (exact inverse of
    meta_to_hf). With video_seed set, the video-only tensors of Meta's checkpoint are added as
    seeded random values, so that the file looks like Meta's."""
    out = sam2.hf_to_meta(hf_state_dict, config, video_seed=None)
    if video_seed is not None:
        gen = torch.Generator().manual_seed(video_seed)
        dtype = hf_state_dict[sam2._PE].dtype
        for key, shape in video_key_shapes(config.vision_config.fpn_hidden_size).items():
            out[key] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    return out


# ---------------------------------------------------------------------------------------------
# The adapter


class EdgeTamAdapter(Sam2Adapter):
    """EdgeTAM through transformers, with sam2's SAM2ImagePredictor pre- and postprocessing
    (EdgeTAM's own predictor); everything is SAM 2's but the image encoder."""
