"""Finding and reading weights: model id -> Hugging Face cache, local HF folders, Meta files.

Checkpoints are read with safetensors or ``torch.load(weights_only=True)`` only: a file that
would need arbitrary objects unpickled is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from terrasam.errors import TerrasamError
from terrasam.models.registry import FAMILY_MODULES, MODELS, ModelSpec, family_module, get_spec

META_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# Which terrasam family a transformers config's model_type belongs to.
MODEL_TYPES = {"sam": "sam", "sam_hq": "sam_hq", "sam2": "sam2", "sam3": "sam3",
               "sam3_video": "sam3",  # facebook/sam3: detector + tracker in one folder
               "edgetam": "edgetam"}
_TRUE = {"1", "on", "yes", "true"}
_FAMILY_NAMES = {"sam": "SAM", "sam2": "SAM 2", "sam3": "SAM 3", "edgetam": "EdgeTAM"}


@dataclass
class Loaded:
    """A transformers model with weights loaded, and where they came from."""

    model: object
    spec: ModelSpec
    module: ModuleType
    source: str  # checkpoint path or "hf://repo"
    files: list[Path] = field(default_factory=list)

    @property
    def sha256(self) -> str | None:
        return checkpoint_sha256(self.files) if self.files else None


# --------------------------------------------------------------------------------------------
# provenance


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_sha256(files: list[Path]) -> str:
    """sha256 of a checkpoint: of its file, or of the sorted 'name digest' lines of its shards."""
    files = sorted(Path(f) for f in files)
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Hugging Face hub


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub itself reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return value.strip().lower() in _TRUE if value is not None else bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The hub cache folder from HF_HUB_CACHE / HF_HOME as set now."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def missing_weights_message(spec: ModelSpec, reason: str) -> str:
    """The one sentence that says what to download and how to pass it."""
    meta = (f", or download Meta's checkpoint {spec.meta_url} and pass it with --checkpoint PATH"
            if spec.meta_url else "")
    return (f"weights for {spec.model_id} are not in the local Hugging Face cache "
            f"({hub_cache_dir()}) and {reason}: run `hf download {spec.hf_repo}` where there is "
            f"network and pass the downloaded folder with --checkpoint PATH (or share that "
            f"cache through HF_HOME){meta}")


def download(spec: ModelSpec) -> Path:
    """The local snapshot folder of a model's HF repository, downloading it when allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    offline = hub_offline()
    kwargs = {"cache_dir": hub_cache_dir(), "local_files_only": offline}
    try:
        folder = Path(snapshot_download(spec.hf_repo, allow_patterns=["*.json", "*.safetensors"],
                                        **kwargs))
        if not list(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(spec.hf_repo, allow_patterns=["pytorch_model*.bin"],
                                            **kwargs))
    except GatedRepoError:
        raise TerrasamError(
            f"{spec.model_id} is a gated model: accept its license at "
            f"https://huggingface.co/{spec.hf_repo}, log in with `hf auth login` (or set "
            f"HF_TOKEN), or pass downloaded weights with --checkpoint PATH") from None
    except RepositoryNotFoundError:
        reason = ("its repository was not found (a gated repository needs `hf auth login`)"
                  if spec.gated else "its repository was not found")
        raise TerrasamError(missing_weights_message(spec, reason)) from None
    except Exception as exc:  # offline, no network, HTTP errors: all mean "not here"
        reason = ("HF_HUB_OFFLINE is set" if offline
                  else f"could not be downloaded ({type(exc).__name__})")
        raise TerrasamError(missing_weights_message(spec, reason)) from None
    if not (folder / "config.json").exists():
        raise TerrasamError(missing_weights_message(spec, "the cached copy is incomplete"))
    return folder


def is_cached(spec: ModelSpec) -> bool:
    """Whether the model's HF repository has a config and weights in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    config = try_to_load_from_cache(spec.hf_repo, "config.json", cache_dir=cache)
    if not isinstance(config, str):
        return False
    return any(Path(config).parent.glob("*.safetensors")) or any(
        Path(config).parent.glob("pytorch_model*.bin"))


# --------------------------------------------------------------------------------------------
# reading files


def _file_kind(path: Path) -> str:
    """What a checkpoint file looks like from its first bytes: empty, text, zip, pickle, other."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    if head.startswith(b"PK"):
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol 2+: torch's legacy format
        return "pickle"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "other"
    return "text" if b"\x00" not in head else "other"


def _unreadable(path: Path, kind: str, what: str) -> TerrasamError:
    """The one sentence for a checkpoint file that cannot be read as ``what``."""
    if kind == "empty":
        return TerrasamError(f"checkpoint {path} is empty (0 bytes); download it again")
    if kind == "text":
        return TerrasamError(f"checkpoint {path} is a text file, not a {what} (a failed "
                             f"download saves an error page; download it again)")
    if kind in ("zip", "pickle", "safetensors"):
        return TerrasamError(f"checkpoint {path} is truncated or corrupted: not a complete "
                             f"{what}; download it again")
    return TerrasamError(f"checkpoint {path} is not a {what}")


def read_state_dict(path: str | Path) -> dict:
    """A state dict from a .safetensors file or a weights-only torch pickle; {"model": sd}
    wrappers (SAM 2's .pt files) are unwrapped.

    A file holding pickled code is refused without running any of it (``weights_only=True``).
    """
    import torch

    path = Path(path)
    kind = _file_kind(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception:
            raise _unreadable(path, kind if kind in ("empty", "text") else "safetensors",
                              "safetensors file") from None
    if kind not in ("zip", "pickle"):
        raise _unreadable(path, kind, "PyTorch checkpoint")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if "unsupported global" not in str(exc).lower() and found is None:
            raise _unreadable(path, kind, "PyTorch checkpoint") from None
        code = f" ({found.group(1)})" if found else ""
        raise TerrasamError(
            f"refusing to load {path}: it holds Python code{code}, not only tensors, and "
            f"terrasam loads only weights; use a checkpoint of tensors (e.g. the official "
            f"release or a .safetensors file)") from None
    except Exception:  # truncated archives and pickles fail with many types (EOFError, ...)
        raise _unreadable(path, kind, "PyTorch checkpoint") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TerrasamError(f"{path} is not a state dict of tensors")
    return obj


# A tensor every checkpoint of a layout holds, and key prefixes that show the layout.
_SIGNATURES = (("image_encoder.patch_embed.proj.weight", ("image_encoder.blocks.", "mask_decoder.")),)


def detect_family(meta_state_dict: dict, path: Path) -> ModuleType:
    """The family module whose looks_like() accepts this Meta state dict."""
    seen = set()
    for family in FAMILY_MODULES:  # sam and sam_hq share a module: tried once
        module = family_module(family, required=False)
        if module is None or module in seen:
            continue
        seen.add(module)
        if module.looks_like(meta_state_dict):
            return module
    for key, prefixes in _SIGNATURES:
        if key not in meta_state_dict and all(
                any(k.startswith(p) for k in meta_state_dict) for p in prefixes):
            raise TerrasamError(f"{path} is an incomplete SAM checkpoint: it has no tensor "
                                f"{key!r}")
    raise TerrasamError(
        f"{path} is not a checkpoint terrasam recognises (SAM, SAM-HQ, SAM 2/2.1, SAM 3 or "
        f"EdgeTAM in Meta's layout, or a Hugging Face model folder)")


def _check_loading_info(info: dict, source: str) -> None:
    for what, label in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                        ("mismatched_keys", "wrong-shaped")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(what) or [])
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise TerrasamError(
                f"{source} does not match the model it describes: {label} key"
                f"{'s' if len(keys) > 1 else ''} {', '.join(keys[:3])}{more}")


def _mismatch(message: str, source: str, names: dict | None) -> str:
    """torch's size-mismatch error as one sentence, the tensor named as in the file."""
    found = re.search(r"size mismatch for ([\w.]+): copying a param with shape "
                      r"torch.Size\(\[([\d, ]*)\]\) from checkpoint, the shape in current "
                      r"model is torch.Size\(\[([\d, ]*)\]\)", message)
    if found is None:
        return (f"{source} does not match the model it describes: "
                f"{message.strip().splitlines()[-1].strip()}")
    key, got, want = found.groups()
    key = (names or {}).get(key, key)
    return (f"{source} does not match the model its other tensors describe: {key} has shape "
            f"({got}), expected ({want}) (a checkpoint of another model or a modified file)")


def build_model(model_cls, config, state_dict: dict, source: str, names: dict | None = None):
    """Instantiate model_cls(config) with exactly state_dict (no missing or extra keys).

    ``names`` maps state_dict keys to the keys of the file they came from, for messages.
    """
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    _check_loading_info({"missing_keys": missing, "unexpected_keys": extra}, source)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise TerrasamError(_mismatch(str(exc), source, names)) from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise TerrasamError(f"{source} leaves {left[0]} uninitialised")
    return model.eval()


def _arch_signature(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def spec_for_hf(family: str, module: ModuleType, model, folder: Path) -> ModelSpec:
    """The registry entry whose full architecture matches a loaded HF model."""
    import torch

    sig = _arch_signature(model)
    matches = []
    for spec in MODELS.values():
        if spec.family != family:
            continue
        with torch.device("meta"):
            candidate = module.model_class(family)(module.build_config(family, spec.variant, "full"))
        if _arch_signature(candidate) == sig:
            matches.append(spec)
    for spec in matches:  # sam2 vs sam2.1 share shapes: prefer the repo named in the path
        if spec.hf_repo.split("/")[-1] in str(folder):
            return spec
    if matches:
        return matches[0]
    if hasattr(module, "spec_for_config"):
        return module.spec_for_config(family, model.config)
    base = next(s for s in MODELS.values() if s.family == family)
    from dataclasses import replace

    return replace(base, model_id=f"{family}-custom", variant="custom", meta_file=None,
                   meta_url=None, params_m=0.0)


def load_hf_folder(folder: Path) -> tuple[object, str, ModuleType, list[Path]]:
    """(model, family, family module, weight files) from a save_pretrained folder."""
    config_path = folder / "config.json"
    try:
        text = config_path.read_text()
    except (OSError, ValueError) as exc:
        raise TerrasamError(f"cannot read {config_path}: {exc}") from None
    if not text.strip():
        raise TerrasamError(f"{config_path} is empty; copy the model folder again")
    try:
        config_dict = json.loads(text)
    except ValueError as exc:
        raise TerrasamError(f"{config_path} is not valid JSON ({exc.args[0].split(':')[0]} at "
                            f"line {exc.lineno}); copy the model folder again") from None
    if not isinstance(config_dict, dict):
        raise TerrasamError(f"{config_path} is not a model configuration")
    family = MODEL_TYPES.get(config_dict.get("model_type"))
    if family is None:
        raise TerrasamError(f"{folder} holds a {config_dict.get('model_type')!r} model; terrasam "
                            f"runs {', '.join(MODEL_TYPES)}")
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise TerrasamError(f"{folder} has a config.json but no *.safetensors weights")
    for f in files:
        _check_weights_file(f)
    module = family_module(family)
    model_cls = module.model_class(family)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # terrasam shows its own progress
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # wrong shapes are reported below, in one sentence
    try:
        model, info = model_cls.from_pretrained(folder, local_files_only=True,
                                                output_loading_info=True,
                                                ignore_mismatched_sizes=True)
    except TerrasamError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TerrasamError(f"cannot load the model in {folder}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_loading_info(info, str(folder))
    return model.eval(), family, module, files


def _check_weights_file(path: Path) -> None:
    """A weights file of a model folder whose header reads; else the one sentence why not."""
    if path.suffix != ".safetensors":
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception:
        kind = _file_kind(path)
        raise _unreadable(path, kind if kind in ("empty", "text") else "safetensors",
                          "safetensors file") from None


def load_weights(model_id: str | None = None, checkpoint: str | Path | None = None) -> Loaded:
    """Resolve and load weights: from --checkpoint (HF folder or Meta file) or a model id."""
    from terrasam.models.registry import DEFAULT_MODEL

    wanted = get_spec(model_id) if model_id else None
    if checkpoint is None:
        spec = wanted or get_spec(DEFAULT_MODEL)
        folder = download(spec)
        model, family, module, files = load_hf_folder(folder)
        if family != spec.family:
            raise TerrasamError(f"the cached {spec.hf_repo} holds a {family} model, not {spec.family}")
        return Loaded(model, spec, module, f"hf://{spec.hf_repo}", files)

    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise TerrasamError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise TerrasamError(f"{path} is a folder without config.json: pass a Hugging Face "
                                f"model folder or a Meta .pth/.pt checkpoint file")
        model, family, module, files = load_hf_folder(path)
        guess = spec_for_hf(family, module, model, path)
    else:
        if path.suffix.lower() not in META_SUFFIXES:
            raise TerrasamError(f"{path} is not a checkpoint (expected a Hugging Face model folder "
                                f"or a {'/'.join(META_SUFFIXES)} file)")
        state = read_state_dict(path)
        module = detect_family(state, path)
        name = _FAMILY_NAMES.get(module.__name__.rsplit(".", 1)[-1], "SAM")
        try:
            config, hf_state, guess = module.meta_to_hf(state)
            by_id = {id(v): k for k, v in state.items()}
            names = {k: by_id.get(id(v), k) for k, v in hf_state.items()}
            model = build_model(module.model_class(guess.family), config, hf_state, str(path),
                                names)
        except (ValueError, KeyError, IndexError, AttributeError) as exc:
            # shapes that build no valid config (e.g. heads that do not divide the width)
            raise TerrasamError(f"{path} has tensor shapes that fit no {name} architecture "
                                f"({str(exc).strip() or type(exc).__name__})") from None
        family, files = guess.family, [path]
    spec = guess
    if wanted is not None:
        if wanted.family != family:
            raise TerrasamError(f"{path} holds a {family} model, not {wanted.model_id} "
                                f"({wanted.family}); drop --model or pass the matching checkpoint")
        if guess.model_id in MODELS and guess.model_id != wanted.model_id and \
                guess.variant != wanted.variant:
            raise TerrasamError(f"{path} holds {guess.model_id}, not {wanted.model_id}; drop "
                                f"--model or pass the matching checkpoint")
        spec = wanted
    return Loaded(model, spec, module, str(path), files)
