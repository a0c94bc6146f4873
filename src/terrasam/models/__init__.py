"""The model layer: load a promptable segmentation model as an Adapter.

Importing this package (e.g. for the registry) does not import torch; ``load_model``,
``Adapter`` and ``Embedding`` pull it in when first used.
"""

from __future__ import annotations

from terrasam.models.registry import DEFAULT_MODEL, MODELS, ModelSpec, get_spec

__all__ = ["Adapter", "Embedding", "DEFAULT_MODEL", "MODELS", "ModelSpec", "get_spec",
           "load_model", "adapter_class"]

# The Adapter subclass each family module defines, by convention.
_ADAPTER_NAMES = {"sam": "SamAdapter", "sam_hq": "SamAdapter", "sam2": "Sam2Adapter",
                  "sam3": "Sam3Adapter", "edgetam": "EdgeTamAdapter"}


def __getattr__(name):
    if name in ("Adapter", "Embedding"):
        from terrasam.models import base

        return getattr(base, name)
    raise AttributeError(f"module 'terrasam.models' has no attribute {name!r}")


def adapter_class(module, family: str):
    """The Adapter subclass of a family module (by name, else the only one it defines)."""
    from terrasam.models.base import Adapter

    cls = getattr(module, _ADAPTER_NAMES.get(family, ""), None)
    if isinstance(cls, type) and issubclass(cls, Adapter):
        return cls
    found = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, Adapter)
             and c.__module__ == module.__name__]
    if len(found) != 1:
        raise RuntimeError(f"{module.__name__} must define one Adapter subclass for {family}")
    return found[0]


def _check_family(model_id: str, backend: str) -> None:
    """Before any weights are read: the packages the model's family needs (its module's
    check_available, e.g. timm for EdgeTAM), and an ONNX export of its image encoder."""
    from terrasam.errors import TerrasamError
    from terrasam.models.registry import family_module

    spec = get_spec(model_id)
    module = family_module(spec.family)
    check = getattr(module, "check_available", None)
    if check is not None:
        check()
    if backend != "torch":
        from terrasam.models import onnx_backend

        if spec.family not in onnx_backend.FAMILIES:
            raise TerrasamError(f"--backend {backend} runs SAM, SAM-HQ and SAM 2/2.1 image "
                                f"encoders; run {model_id} with --backend torch.")


def load_model(model_id: str | None = None, checkpoint=None, device="auto", dtype="auto",
               compile: bool = False, backend: str = "torch"):
    """Load a model as an Adapter.

    model_id: a registry id (default DEFAULT_MODEL), fetched into the Hugging Face cache;
    checkpoint: a local Hugging Face model folder or a Meta .pth/.pt file (architecture read
    from it; model_id, when also given, must agree). device: auto|cpu|cuda|mps; dtype:
    auto|float32|bfloat16|float16; compile: torch.compile the encoder and decoder;
    backend: "torch", or "onnx" / "onnx-int8" to run the image encoder in ONNX Runtime
    (exported once per checkpoint into the cache, see terrasam.models.onnx_backend).
    """
    from terrasam.models.device import compile_modules, resolve_device, resolve_dtype
    from terrasam.models.weights import load_weights

    encoder = None
    if backend != "torch":
        from terrasam.models import onnx_backend

        onnx_backend.check_backend(backend, str(device), model_id)
    if model_id is not None:
        _check_family(model_id, backend)
    if backend != "torch":
        device = onnx_backend.device_for(backend, device)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    loaded = load_weights(model_id, checkpoint)
    sha256 = loaded.sha256
    if backend != "torch":  # exported from the float32 CPU weights, before the move below
        encoder = onnx_backend.load_encoder(loaded.model, loaded.spec.family, sha256,
                                            backend, dev)
    adapter = adapter_class(loaded.module, loaded.spec.family)(loaded.model, loaded.spec, dev, dt)
    adapter.checkpoint = loaded.source
    adapter.checkpoint_sha256 = sha256
    adapter.backend = backend
    if encoder is not None:
        adapter.encoder = encoder
        onnx_backend.attach_decoder(adapter, sha256)
    if compile:
        model = getattr(adapter, "model", None)
        parts = [getattr(model, n) for n in ("vision_encoder", "mask_decoder")
                 if model is not None and hasattr(model, n)]
        compile_modules(*parts)
    return adapter
