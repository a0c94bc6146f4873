"""Model ids terrasam knows: family, input size, Hugging Face repository, Meta checkpoint.

The default model is SAM 2.1 Hiera-Tiny: the smallest model of the best SAM generation for
images (about 31 M parameters, usable on a laptop CPU); its id is written into every
output's provenance.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from terrasam.errors import TerrasamError

DEFAULT_MODEL = "sam2.1-hiera-tiny"
# The module that implements each family (build_config, model_class, meta_to_hf, hf_to_meta,
# looks_like and its Adapter subclass); see CONTRACTS.md.
FAMILY_MODULES = {
    "sam": "terrasam.models.sam",
    "sam_hq": "terrasam.models.sam",
    "sam2": "terrasam.models.sam2",
    "sam3": "terrasam.models.sam3",
    "edgetam": "terrasam.models.edgetam",
}


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    family: str  # "sam", "sam_hq", "sam2", "sam3", "edgetam"
    variant: str  # "vit_b", "hiera_t", ...
    image_size: int
    hf_repo: str
    meta_file: str | None  # file name of Meta's original checkpoint
    meta_url: str | None
    params_m: float  # parameters in millions of the transformers image model built from the
    # full config on the meta device (SAM 2: without the video memory modules)
    gated: bool = False
    description: str = ""


_SAM1 = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM2 = "https://dl.fbaipublicfiles.com/segment_anything_2/072824/"
_SAM21 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
_HQ = "https://huggingface.co/lkeab/hq-sam/resolve/main/"
_EDGETAM = "https://huggingface.co/facebook/EdgeTAM/resolve/main/"


def _spec(*args, **kw) -> ModelSpec:
    return ModelSpec(*args, **kw)


MODELS: dict[str, ModelSpec] = {
    s.model_id: s
    for s in [
        _spec("sam-vit-b", "sam", "vit_b", 1024, "facebook/sam-vit-base",
              "sam_vit_b_01ec64.pth", _SAM1 + "sam_vit_b_01ec64.pth", 93.7),
        _spec("sam-vit-l", "sam", "vit_l", 1024, "facebook/sam-vit-large",
              "sam_vit_l_0b3195.pth", _SAM1 + "sam_vit_l_0b3195.pth", 312.3),
        _spec("sam-vit-h", "sam", "vit_h", 1024, "facebook/sam-vit-huge",
              "sam_vit_h_4b8939.pth", _SAM1 + "sam_vit_h_4b8939.pth", 641.1),
        _spec("sam-hq-vit-b", "sam_hq", "vit_b", 1024, "syscv-community/sam-hq-vit-base",
              "sam_hq_vit_b.pth", _HQ + "sam_hq_vit_b.pth", 94.8),
        _spec("sam-hq-vit-l", "sam_hq", "vit_l", 1024, "syscv-community/sam-hq-vit-large",
              "sam_hq_vit_l.pth", _HQ + "sam_hq_vit_l.pth", 313.7),
        _spec("sam-hq-vit-h", "sam_hq", "vit_h", 1024, "syscv-community/sam-hq-vit-huge",
              "sam_hq_vit_h.pth", _HQ + "sam_hq_vit_h.pth", 642.7),
        _spec("slimsam-77", "sam", "slim_77", 1024, "nielsr/slimsam-77-uniform", None, None,
              9.7, description="SAM ViT-B pruned to 23 % (SlimSAM); fast on CPU"),
        _spec("slimsam-50", "sam", "slim_50", 1024, "nielsr/slimsam-50-uniform", None, None,
              28.0, description="SAM ViT-B pruned to 50 % (SlimSAM)"),
        _spec("sam2-hiera-tiny", "sam2", "hiera_t", 1024, "facebook/sam2-hiera-tiny",
              "sam2_hiera_tiny.pt", _SAM2 + "sam2_hiera_tiny.pt", 31.4),
        _spec("sam2-hiera-small", "sam2", "hiera_s", 1024, "facebook/sam2-hiera-small",
              "sam2_hiera_small.pt", _SAM2 + "sam2_hiera_small.pt", 38.5),
        _spec("sam2-hiera-base-plus", "sam2", "hiera_b+", 1024, "facebook/sam2-hiera-base-plus",
              "sam2_hiera_base_plus.pt", _SAM2 + "sam2_hiera_base_plus.pt", 73.3),
        _spec("sam2-hiera-large", "sam2", "hiera_l", 1024, "facebook/sam2-hiera-large",
              "sam2_hiera_large.pt", _SAM2 + "sam2_hiera_large.pt", 216.9),
        _spec("sam2.1-hiera-tiny", "sam2", "hiera_t", 1024, "facebook/sam2.1-hiera-tiny",
              "sam2.1_hiera_tiny.pt", _SAM21 + "sam2.1_hiera_tiny.pt", 31.4),
        _spec("sam2.1-hiera-small", "sam2", "hiera_s", 1024, "facebook/sam2.1-hiera-small",
              "sam2.1_hiera_small.pt", _SAM21 + "sam2.1_hiera_small.pt", 38.5),
        _spec("sam2.1-hiera-base-plus", "sam2", "hiera_b+", 1024,
              "facebook/sam2.1-hiera-base-plus", "sam2.1_hiera_base_plus.pt",
              _SAM21 + "sam2.1_hiera_base_plus.pt", 73.3),
        _spec("sam2.1-hiera-large", "sam2", "hiera_l", 1024, "facebook/sam2.1-hiera-large",
              "sam2.1_hiera_large.pt", _SAM21 + "sam2.1_hiera_large.pt", 216.9),
        _spec("edgetam", "edgetam", "repvit_m1", 1024, "yonigozlan/EdgeTAM-hf", "edgetam.pt",
              _EDGETAM + "edgetam.pt", 9.1, description="light SAM 2 for CPUs (RepViT)"),
        # SAM 3: the detector (840.4 M) plus the tracker's own neck and decoder (12.0 M; the
        # tracker shares the detector's backbone)
        _spec("sam3", "sam3", "sam3", 1008, "facebook/sam3", None, None, 852.4, gated=True,
              description="text, exemplars, points, boxes"),
    ]
}


def get_spec(model_id: str) -> ModelSpec:
    """The spec of a model id, or a one-line error naming the known ids."""
    try:
        return MODELS[model_id]
    except KeyError:
        pass
    import difflib

    close = difflib.get_close_matches(str(model_id).lower(), list(MODELS), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise TerrasamError(f"unknown model {model_id!r}; {hint}known models: {', '.join(MODELS)}")


def family_module(family: str, required: bool = True) -> ModuleType | None:
    """The module implementing a family; None (or an error when required) if it is absent."""
    name = FAMILY_MODULES.get(family)
    if name is None:
        raise TerrasamError(f"unknown model family {family!r}")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        if required:
            raise TerrasamError(f"this terrasam build has no support for {family} models") from None
        return None
