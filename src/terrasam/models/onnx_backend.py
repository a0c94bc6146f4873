"""The ONNX Runtime backend: the image encoder exported once per checkpoint, run by ORT.

``--backend onnx`` exports the adapter's image encoder (SAM, SAM-HQ: the embedding and the
first global block's output HQ's decoder reads; SAM 2 / 2.1: the three FPN levels, the last
with the no-memory embedding added) to ONNX into the user cache, keyed by the checkpoint's
sha256, and runs it with ``onnxruntime.InferenceSession`` inside the adapter's ``embed()``
(``adapter.encoder``). The prompt decoder's calls of the automatic mask generator (one point
per prompt, multimask, float32) run in ORT too (``OrtDecoder``, exported on first use); all
other decodes, and everything else, are unchanged.
``--backend onnx-int8`` runs the same export after ``onnxruntime.quantization.
quantize_dynamic`` (int8 weights, cached separately).

Each export is a folder written under a temporary name and renamed into place, so an
interrupted export leaves nothing that looks finished; a cached export that does not load
(or whose files have other sizes than recorded) is exported again with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from terrasam.errors import TerrasamError

BACKENDS = ("torch", "onnx", "onnx-int8")
EXPORT_VERSION = 1  # bump when the exported graph's inputs, outputs or meaning change
OPSET = 17
FAMILIES = ("sam", "sam_hq", "sam2")
INSTALL_HINT = "pip install 'terrasam[onnx]'"
_MODEL, _META = "model.onnx", "meta.json"


def available() -> bool:
    """Whether onnxruntime and onnx can be imported."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def check_backend(backend: str, device: str = "auto", model: str | None = None) -> None:
    """--backend before the model loads: known, installed, and runnable on ``device``."""
    if backend not in BACKENDS:
        raise TerrasamError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    if backend == "torch":
        return
    if model is not None and str(model).startswith("sam3"):
        raise TerrasamError(f"--backend {backend} runs SAM, SAM-HQ and SAM 2/2.1 image "
                            f"encoders; run SAM 3 with --backend torch.")
    if not available():
        raise TerrasamError(f"--backend {backend} needs onnxruntime and onnx, which are not "
                            f"installed: {INSTALL_HINT}")
    providers(backend, device)


def providers(backend: str, device) -> list[str]:
    """ORT execution providers for a device: CPU; CUDA when asked for and ORT has it."""
    import onnxruntime as ort

    kind = str(device).split(":")[0]
    have = ort.get_available_providers()
    if kind == "cuda":
        if backend == "onnx-int8":
            raise TerrasamError("--backend onnx-int8 runs on the CPU only (dynamic int8 kernels); "
                                "use --device cpu, or --backend onnx or torch on the GPU.")
        if "CUDAExecutionProvider" not in have:
            raise TerrasamError("--backend onnx with --device cuda needs onnxruntime-gpu (this "
                                "onnxruntime has no CUDAExecutionProvider); use --device cpu "
                                "or --backend torch.")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if kind == "mps":
        raise TerrasamError(f"--backend {backend} runs on the CPU or a CUDA GPU, not on mps; use "
                            f"--device cpu or --backend torch.")
    return ["CPUExecutionProvider"]


def device_for(backend: str, device: str):
    """The torch device of an ONNX-backed model: "auto" is CUDA only where ORT can use it."""
    if str(device).lower() != "auto":
        return device
    import onnxruntime as ort

    if (backend == "onnx" and torch.cuda.is_available()
            and "CUDAExecutionProvider" in ort.get_available_providers()):
        return "cuda"
    return "cpu"


def cache_dir() -> Path:
    """Where exports are kept: $TERRASAM_ONNX_CACHE, else ~/.cache/terrasam/onnx."""
    if os.environ.get("TERRASAM_ONNX_CACHE"):
        return Path(os.environ["TERRASAM_ONNX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "terrasam" / "onnx"


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 of a model's tensors (names, dtypes, shapes, bytes in key order): the key of a
    model that has no checkpoint file (built in memory)."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def export_dir(sha256: str, family: str, backend: str) -> Path:
    """The cache folder of one export: checkpoint sha256, family, export version, precision."""
    precision = "int8" if backend == "onnx-int8" else "fp32"
    return cache_dir() / f"{sha256}-{family}-v{EXPORT_VERSION}-{precision}"


class _SamEncoder(nn.Module):
    def __init__(self, model, hq: bool):
        super().__init__()
        self.vision_encoder, self.hq = model.vision_encoder, hq

    def forward(self, x):
        out = self.vision_encoder(x)
        if self.hq:  # the HQ decoder reads the first global-attention block's output only
            return out.last_hidden_state, out.intermediate_embeddings[0]
        return (out.last_hidden_state,)


class _Sam2Encoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model.get_image_embeddings(x))


def _wrapper(model, family: str) -> nn.Module:
    if family in ("sam", "sam_hq"):
        return _SamEncoder(model, family == "sam_hq")
    if family == "sam2":
        return _Sam2Encoder(model)
    raise TerrasamError(f"--backend onnx runs SAM, SAM-HQ and SAM 2/2.1 image encoders; run "
                        f"{family} models with --backend torch.")


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.name != _META}


def export(model, family: str, image_size: int, sha256: str, backend: str) -> Path:
    """Export the encoder of a float32 CPU transformers model (and quantize it for
    onnx-int8) into its cache folder, atomically; returns the folder."""
    final = export_dir(sha256, family, backend)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        fp32 = export_dir(sha256, family, "onnx")
        if backend == "onnx-int8":
            if not _valid(fp32):
                export(model, family, image_size, sha256, "onnx")
            _quantize(fp32 / _MODEL, tmp / _MODEL)
        else:
            _export_fp32(model, family, image_size, tmp)
        meta = {"export_version": EXPORT_VERSION, "family": family, "checkpoint_sha256": sha256,
                "precision": "int8" if backend == "onnx-int8" else "fp32", "opset": OPSET,
                "image_size": image_size, "torch": torch.__version__, "files": _files(tmp)}
        (tmp / _META).write_text(json.dumps(meta, indent=1))
        if final.exists():
            if _valid(final):  # another process (a Dask worker, say) finished first: use it
                return final
            shutil.rmtree(final, ignore_errors=True)  # a broken copy
        try:
            os.rename(tmp, final)
        except OSError:  # lost a race to a concurrent export
            if not _valid(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _export_fp32(model, family: str, image_size: int, folder: Path) -> None:
    import onnx

    wrapper = _wrapper(model, family).eval()
    x = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values in the graph
        n_out = len(wrapper(x))
        raw = folder / "raw"
        raw.mkdir()
        torch.onnx.export(wrapper, (x,), str(raw / _MODEL), dynamo=False, opset_version=OPSET,
                          input_names=["pixel_values"],
                          output_names=[f"out{i}" for i in range(n_out)])
    # one graph file and one weights file (models over 2 GB cannot live in one protobuf)
    proto = onnx.load(str(raw / _MODEL))
    onnx.save_model(proto, str(folder / _MODEL), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=_MODEL + ".data", size_threshold=1024)
    shutil.rmtree(raw)


def _quantize(src: Path, dst: Path) -> None:
    """int8 weights for MatMul/Gemm (activations quantized on the fly), ORT's dynamic scheme."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    big = src.with_name(src.name + ".data").stat().st_size > (1 << 31)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the model is for static quantization
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"],
                             use_external_data_format=big)
    finally:
        root.setLevel(level)


def _valid(folder: Path) -> bool:
    """A finished export: its meta.json reads and every file has the size recorded."""
    try:
        meta = json.loads((folder / _META).read_text())
        return meta.get("export_version") == EXPORT_VERSION and meta["files"] == _files(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _session(folder: Path, provider_list: list[str]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # ORT's shape-merge notes are not the user's concern
    return ort.InferenceSession(str(folder / _MODEL), sess_options=opts,
                                providers=provider_list)


class OrtEncoder:
    """Runs an exported image encoder: a preprocessed (1, 3, S, S) tensor -> what the
    adapter's torch encoder returns (an object with ``last_hidden_state`` and
    ``intermediate_embeddings`` for SAM / SAM-HQ, the list of FPN levels for SAM 2)."""

    def __init__(self, session, family: str, folder: Path, backend: str):
        self.session, self.family, self.folder, self.backend = session, family, folder, backend
        self._input = session.get_inputs()[0].name
        self.sha256 = folder.name.split("-", 1)[0]  # the key: the checkpoint's or weights' hash

    def __call__(self, x: torch.Tensor):
        device, dtype = x.device, x.dtype
        feed = x.detach().to("cpu", torch.float32).contiguous().numpy()
        outs = [torch.from_numpy(np.ascontiguousarray(o)).to(device, dtype)
                for o in self.session.run(None, {self._input: feed})]
        if self.family == "sam2":
            return outs
        return SimpleNamespace(last_hidden_state=outs[0], intermediate_embeddings=outs[1:])


def image_size_of(model, family: str) -> int:
    """The square input size of a transformers SAM / SAM 2 model, from its config."""
    cfg = model.config
    if family == "sam2":
        return int(cfg.prompt_encoder_config.image_size)
    return int(cfg.vision_config.image_size)


def load_encoder(model, family: str, sha256: str | None, backend: str,
                 device="cpu") -> OrtEncoder:
    """The ORT encoder of a float32 CPU transformers model: from the cache, exported on
    first use. ``sha256``: the checkpoint's (None: the state dict is hashed)."""
    if backend not in BACKENDS or backend == "torch":
        raise ValueError(f"not an ONNX backend: {backend!r}")
    _wrapper(model, family)  # the family's refusal before any work
    image_size = image_size_of(model, family)
    check_backend(backend, str(device))
    sha256 = sha256 or state_dict_sha256(model)
    provider_list = providers(backend, device)
    folder = export_dir(sha256, family, backend)
    if folder.exists():
        if _valid(folder):
            try:
                return OrtEncoder(_session(folder, provider_list), family, folder, backend)
            except Exception as exc:  # a file corrupted in place: same sizes, unreadable
                reason = f"does not load ({type(exc).__name__})"
        else:
            reason = "is incomplete or damaged"
        warnings.warn(f"the cached ONNX export {folder} {reason}; exporting it again",
                      UserWarning, stacklevel=2)
        shutil.rmtree(folder, ignore_errors=True)
    folder = export(model, family, image_size, sha256, backend)
    return OrtEncoder(_session(folder, provider_list), family, folder, backend)


def attach(adapter, backend: str = "onnx") -> OrtEncoder:
    """Give an already built float32 adapter an ORT image encoder and generator decoder
    (keyed by its checkpoint's sha256, else by its weights' hash); returns the encoder."""
    model = adapter.model
    if next(model.parameters()).dtype != torch.float32:
        raise TerrasamError("an ONNX encoder is exported from float32 weights; build the "
                            "adapter in float32 (or load it with load_model(backend=...)).")
    encoder = load_encoder(model, adapter.family, adapter.checkpoint_sha256, backend,
                           adapter.device)
    adapter.encoder, adapter.backend = encoder, backend
    attach_decoder(adapter, encoder.sha256)
    return encoder


# ---------------------------------------------------------------------------------------------
# The prompt decoder: the automatic mask generator's call (one point per prompt, all masks of
# a multimask decode, no mask input, float32) in ORT, in whole chunks of DECODE_BATCH prompts
# (a remainder, e.g. one click, in torch); every other call runs terrasam's torch decoder.
# Measured once on this project's CPU, under load from other jobs (full-size random weights,
# 16 prompts, all masks upscaled): SAM ViT-B 3.13 s (torch) -> 1.32 s (ORT), SAM 2.1 tiny 1.18 -> 0.81 s; with an
# IoU hint that skips upscaling 83 % of SAM 2.1's masks torch took 0.80 s. Logits agree
# within 2e-5. TERRASAM_ONNX_DECODER=0 keeps terrasam's decoder (to compare).

DECODE_BATCH = 16
_SPARSE_TOKENS = 2  # one point plus the padding point the prompt encoder appends


class _Decoder(nn.Module):
    """The adapter's decoder on (image features, [extra levels], sparse prompts)."""

    def __init__(self, adapter):
        super().__init__()
        self.model, self.adapter = adapter.model, adapter

    def forward(self, features, sparse, *levels):
        from terrasam.models.base import Embedding

        a = self.adapter
        size = (a.image_size, a.image_size)
        if a.family == "sam2":
            emb = Embedding(features, size, size, {"high_res": list(levels)})
            return a._torch_run_decoder(emb, sparse, None, True, None)
        extra = {"intermediate_embeddings": list(levels)} if levels else {}
        emb = Embedding(features, size, size, extra)
        return a._torch_run_decoder(emb, sparse, None, sparse.shape[0], True, None)


def _levels_of(embedding) -> list:
    return list(embedding.extra.get("high_res") or embedding.extra.get(
        "intermediate_embeddings") or [])


def _export_decoder(adapter, embedding, folder: Path) -> None:
    import onnx

    c = embedding.features.shape[1]
    shape = (DECODE_BATCH, 1, _SPARSE_TOKENS, c) if adapter.family == "sam2" else \
        (DECODE_BATCH, _SPARSE_TOKENS, c)
    ins = (embedding.features.float(), torch.zeros(shape), *[x.float() for x in
                                                            _levels_of(embedding)])
    raw = folder / "raw"
    raw.mkdir()
    grads = [p.requires_grad for p in adapter.model.parameters()]
    adapter.model.requires_grad_(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Decoder(adapter).eval(), ins, str(raw / _MODEL), dynamo=False,
                              opset_version=OPSET,
                              input_names=[f"in{i}" for i in range(len(ins))],
                              output_names=["logits", "iou"])
    finally:
        for p, g in zip(adapter.model.parameters(), grads):
            p.requires_grad_(g)
    proto = onnx.load(str(raw / _MODEL))
    onnx.save_model(proto, str(folder / _MODEL), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=_MODEL + ".data", size_threshold=1024)
    shutil.rmtree(raw)


class OrtDecoder:
    """Replaces ``adapter._run_decoder``: the generator's calls in ORT, the rest in torch."""

    def __init__(self, adapter, sha256: str, provider_list: list[str]):
        self.adapter, self.sha256, self.providers = adapter, sha256, provider_list
        self.session = None
        self.folder = cache_dir() / f"{sha256}-{adapter.family}-v{EXPORT_VERSION}-decoder" \
                                    f"{DECODE_BATCH}-fp32"

    def _load(self, embedding):
        if self.session is None:
            folder = self.folder
            if folder.exists() and not _valid(folder):
                warnings.warn(f"the cached ONNX export {folder} is incomplete or damaged; "
                              "exporting it again", UserWarning, stacklevel=3)
                shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                _write_atomic(folder, lambda tmp: _export_decoder(self.adapter, embedding, tmp),
                              {"family": self.adapter.family, "checkpoint_sha256": self.sha256,
                               "part": "decoder", "batch": DECODE_BATCH})
            self.session = _session(folder, self.providers)
        return self.session

    def __call__(self, embedding, sparse, dense, *args):
        a = self.adapter
        multimask = args[-2]
        tokens = sparse.shape[-2]
        if (dense is not None or not multimask or tokens != _SPARSE_TOKENS
                or a.dtype != torch.float32 or embedding.features.shape[0] != 1):
            return a._torch_run_decoder(embedding, sparse, dense, *args)
        b = sparse.shape[0]
        full = b - b % DECODE_BATCH  # whole chunks in ORT; a remainder (a click) in torch
        if not full:
            return a._torch_run_decoder(embedding, sparse, dense, *args)
        session = self._load(embedding)
        fixed = {f"in{i + 2}": x.detach().cpu().float().numpy()
                 for i, x in enumerate(_levels_of(embedding))}
        fixed["in0"] = embedding.features.detach().cpu().float().numpy()
        flat = sparse.detach().cpu().float()
        dev = embedding.features.device
        logits, ious = [], []
        for s in range(0, full, DECODE_BATCH):
            out_logits, out_iou = session.run(
                None, {**fixed, "in1": flat[s:s + DECODE_BATCH].contiguous().numpy()})
            logits.append(torch.from_numpy(out_logits).to(dev))
            ious.append(torch.from_numpy(out_iou).to(dev))
        if full < b:
            rest = args if a.family == "sam2" else (b - full, *args[1:])
            out_logits, out_iou = a._torch_run_decoder(embedding, sparse[full:], dense, *rest)
            logits.append(out_logits.float())
            ious.append(out_iou.float())
        return torch.cat(logits), torch.cat(ious)


def _write_atomic(final: Path, write, meta: dict) -> None:
    """Run ``write(tmp_folder)``, add meta.json, rename the folder to ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        write(tmp)
        meta = {"export_version": EXPORT_VERSION, "opset": OPSET, "torch": torch.__version__,
                **meta, "files": _files(tmp)}
        (tmp / _META).write_text(json.dumps(meta, indent=1))
        if final.exists() and _valid(final):
            return
        shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _valid(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# where ORT's generator decoder measured faster than terrasam's (benchmarks/amg_parity.py,
# default thresholds, same run: SAM ViT-B decode 37.0 s in ORT vs 77.9 s; SAM 2.1 tiny
# 38.0 vs 38.1 s, and slower with every mask kept, benchmarks/onnx_speed.py: 17.6 vs 13.8 s)
DECODER_FAMILIES = ("sam", "sam_hq")


def decoder_enabled(family: str = "sam") -> bool:
    """Whether ORT runs the generator's decodes of ``family``: by default where it measured
    faster (SAM, SAM-HQ); TERRASAM_ONNX_DECODER=0 never, =1 for every family."""
    value = os.environ.get("TERRASAM_ONNX_DECODER", "").strip().lower()
    if value in ("0", "no", "off", "false"):
        return False
    if value in ("1", "yes", "on", "true"):
        return True
    return family in DECODER_FAMILIES


def attach_decoder(adapter, sha256: str | None = None) -> OrtDecoder | None:
    """Route the adapter's generator decodes through ORT (exported on first use); None
    (terrasam's decoder kept) where :func:`decoder_enabled` says no."""
    if not decoder_enabled(adapter.family):
        return None
    if adapter.family not in FAMILIES:
        raise TerrasamError(f"no ONNX decoder for {adapter.family} models")
    sha256 = sha256 or adapter.checkpoint_sha256 or state_dict_sha256(adapter.model)
    decoder = OrtDecoder(adapter, sha256, providers("onnx", adapter.device))
    adapter._torch_run_decoder = adapter._run_decoder
    adapter._run_decoder = decoder
    adapter.ort_decoder = decoder
    return decoder
