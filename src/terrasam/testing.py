"""Random-weight checkpoints in the real on-disk formats, for tests and hardware benchmarks.

``random_checkpoint("sam-vit-b", "out", size="full", format="meta")`` writes a file that
``terrasam ... --checkpoint`` loads through the normal loading path, without downloading.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from terrasam.models.registry import family_module, get_spec

# Families whose Meta checkpoints wrap the state dict as {"model": state_dict}.
_WRAPPED = {"sam2", "sam3", "edgetam"}
# The decoder's learned output tokens (IoU, mask, HQ tokens).
_OUTPUT_TOKENS = ("mask_decoder.iou_token", "mask_decoder.mask_tokens", "mask_decoder.hq_token",
                  "mask_decoder.obj_score_token")


def _std(module: nn.Module, name: str, param: torch.Tensor) -> float | None:
    """Init std of a parameter; None means constant (norm weight 1, norm bias 0)."""
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or (
            "norm" in type(module).__name__.lower() and param.ndim == 1):
        return None
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and leaf == "weight":
        return 1.0 / math.sqrt(param[0].numel())  # variance-preserving: 1 / sqrt(fan_in)
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)) and leaf == "weight":
        return 1.0 / math.sqrt(param.shape[0])
    if isinstance(module, nn.Embedding):
        return 1.0
    if leaf == "bias":
        return 0.02
    if "positional_embedding" in name:  # random Fourier features of point prompts
        return 1.0
    return 0.02


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0, prompt_sensitive: bool = False) -> nn.Module:
    """Re-initialise every parameter from a seeded generator so that outputs are informative.

    transformers' own init leaves SAM's image encoder near zero (initializer_range 1e-10),
    which makes every mask the same; here weights get fan-in scaled normals instead.
    prompt_sensitive sharpens the point/box position code and shrinks the decoder's output
    tokens, so that the prompt dominates what the decoder predicts.
    """
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    for name, param in sorted(model.named_parameters(remove_duplicate=False)):
        owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
        std = _std(owner, name, param)
        if std is None:
            param.fill_(0.0 if name.endswith("bias") else 1.0)
            continue
        if prompt_sensitive:
            if "positional_embedding" in name:  # finer position code: nearby points differ
                std *= 4.0
            elif any(t in name for t in _OUTPUT_TOKENS):  # let the prompt tokens dominate
                std *= 0.1
        param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)
        if name.endswith("iou_prediction_head.proj_out.bias"):
            param.add_(0.9)  # predicted IoUs near 0.9 so that score filters keep some masks
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def random_model(model_id: str, size: str = "tiny", seed: int = 0,
                 prompt_sensitive: bool = False):
    """An in-memory transformers model of model_id's family with seeded random weights."""
    spec = get_spec(model_id)
    module = family_module(spec.family)
    config = module.build_config(spec.family, spec.variant, size)
    torch.manual_seed(seed)
    model = module.model_class(spec.family)(config)
    return randomize(model, seed, prompt_sensitive).eval()


def random_checkpoint(model_id: str, path, size: str = "tiny", format: str = "hf", seed: int = 0,
                      prompt_sensitive: bool = False) -> Path:
    """Write a seeded random-weight checkpoint of model_id's family; returns what to pass
    as --checkpoint.

    format "hf": a save_pretrained folder (config.json + model.safetensors) at path.
    format "meta": Meta's original file in its exact key layout: a .pth state dict (SAM,
    SAM-HQ) or a .pt holding {"model": state_dict} (SAM 2, EdgeTAM); when path is a folder,
    the file gets Meta's file name inside it.
    """
    spec = get_spec(model_id)
    if format not in ("hf", "meta"):
        raise ValueError(f"format must be 'hf' or 'meta', not {format!r}")
    module = family_module(spec.family)
    if format == "hf" and hasattr(module, "save_random_hf"):  # SAM 3: detector + tracker
        return module.save_random_hf(path, size, seed, prompt_sensitive)
    model = random_model(model_id, size, seed, prompt_sensitive)
    path = Path(path)
    if format == "hf":
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        return path
    state = module.hf_to_meta(model.state_dict(), model.config)
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if path.is_dir() or not path.suffix:
        name = spec.meta_file or f"{spec.model_id}.pt"
        path.mkdir(parents=True, exist_ok=True)
        path = path / name
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state} if spec.family in _WRAPPED else state, path)
    return path
