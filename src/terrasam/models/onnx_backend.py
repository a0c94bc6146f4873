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
# The prompt decoder in two ONNX graphs that take over two steps of the adapter's own decoder
# (``adapter._two_way`` and ``adapter._mask_logits``), so that its IoU hint still skips the
# masks the generator will drop: "twoway" (prompt tokens, image embedding -> queries, keys)
# for every prompt of a call without a mask input, and "masks" (keys, hypernetwork weights,
# the image's levels -> low-resolution logits) for the surviving prompts only, in chunks of
# CHUNK. float32 on one image only; anything else runs in torch.
# Measured on this project's CPU (full-size random SAM ViT-B, 16 prompts): two-way 0.29 s in
# torch vs 0.17 s in ORT, mask head 0.29 vs 0.13 s. TERRASAM_ONNX_DECODER=0 keeps torch.

CHUNK = 16  # prompts per ORT call: the graphs are traced for this batch


class _TwoWay(nn.Module):
    def __init__(self, adapter):
        super().__init__()
        self.model, self.adapter = adapter.model, adapter

    def forward(self, tokens, features, *levels):
        from terrasam.models import fast_decoder as fd

        a = self.adapter
        per = a._per_image(_embedding(a, features, list(levels)))
        return fd.two_way(a.model.mask_decoder.transformer, tokens, per["side"])


class _Masks(nn.Module):
    def __init__(self, adapter):
        super().__init__()
        self.model, self.adapter = adapter.model, adapter

    def forward(self, keys, hyper, *rest):
        a = self.adapter
        hq = a.family == "sam_hq"
        hq_hyper, rest = (rest[0], rest[1:]) if hq else (None, rest)
        emb = _embedding(a, rest[0], list(rest[1:]))
        hw = tuple(emb.features.shape[-2:])
        per = a._per_image(emb)
        extra = (hq_hyper,) if hq else ()
        return type(a)._mask_logits(a, emb, per, keys, hyper, hw, *extra)


def _embedding(adapter, features, levels):
    from terrasam.models.base import Embedding

    size = (adapter.image_size, adapter.image_size)
    key = "high_res" if adapter.family == "sam2" else "intermediate_embeddings"
    return Embedding(features, size, size, {key: levels} if levels else {})


def _image_inputs(embedding) -> tuple:
    """The embedding and its extra levels (SAM 2's high-resolution ones, SAM-HQ's ViT one)."""
    levels = embedding.extra.get("high_res") or embedding.extra.get(
        "intermediate_embeddings") or []
    return tuple(x.detach().float() for x in (embedding.features, *levels))


def _export_graph(adapter, module: nn.Module, ins: tuple, outputs: list[str],
                  folder: Path) -> None:
    import onnx

    raw = folder / "raw"
    raw.mkdir()
    grads = [p.requires_grad for p in adapter.model.parameters()]
    adapter.model.requires_grad_(False)
    names = [f"in{i}" for i in range(len(ins))]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), ins, str(raw / _MODEL), dynamo=False,
                              opset_version=OPSET, input_names=names, output_names=outputs)
    finally:
        for p, g in zip(adapter.model.parameters(), grads):
            p.requires_grad_(g)
    proto = onnx.load(str(raw / _MODEL))
    onnx.save_model(proto, str(folder / _MODEL), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=_MODEL + ".data", size_threshold=1024)
    shutil.rmtree(raw)


class OrtDecoder:
    """Takes over ``adapter._two_way`` and ``adapter._mask_logits`` with ORT graphs."""

    def __init__(self, adapter, sha256: str, provider_list: list[str]):
        self.adapter, self.sha256, self.providers = adapter, sha256, provider_list
        self.sessions: dict[str, object] = {}
        self.torch_two_way, self.torch_mask_logits = adapter._two_way, adapter._mask_logits
        dec = adapter.model.mask_decoder  # its output tokens, one point and the padding point
        adapter._one_point_tokens = 2 + sum(
            getattr(dec, n).weight.shape[0] for n in ("obj_score_token", "iou_token",
                                                      "mask_tokens", "hq_token") if hasattr(dec, n))

    def folder(self, part: str) -> Path:
        return cache_dir() / f"{self.sha256}-{self.adapter.family}-v{EXPORT_VERSION}-{part}-fp32"

    def _session(self, part: str, export):
        session = self.sessions.get(part)
        if session is None:
            folder = self.folder(part)
            if folder.exists() and not _valid(folder):
                warnings.warn(f"the cached ONNX export {folder} is incomplete or damaged; "
                              "exporting it again", UserWarning, stacklevel=4)
                shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                _write_atomic(folder, export, {"family": self.adapter.family, "part": part,
                                               "checkpoint_sha256": self.sha256})
            session = self.sessions[part] = _session(folder, self.providers)
        return session

    def _usable(self, embedding, dense=None) -> bool:
        return (dense is None and self.adapter.dtype == torch.float32
                and embedding.features.shape[0] == 1)

    def two_way(self, embedding, tokens, side, dense):
        # traced for the generator's prompt: one point (+ the padding point), CHUNK prompts
        if not self._usable(embedding, dense) or tokens.shape[1] != self.adapter._one_point_tokens:
            return self.torch_two_way(embedding, tokens, side, dense)
        a = self.adapter
        image = _image_inputs(embedding)
        session = self._session("twoway", lambda tmp: _export_graph(
            a, _TwoWay(a), (tokens[:1].float().expand(CHUNK, -1, -1), *image),
            ["queries", "keys"], tmp))
        queries, keys = _chunked(session, tokens.detach().float(), (), image)
        return queries.to(tokens.device), keys.to(tokens.device)

    def mask_logits(self, embedding, per, keys, hyper, hw, *extra):
        if not self._usable(embedding):
            return self.torch_mask_logits(embedding, per, keys, hyper, hw, *extra)
        a, m = self.adapter, hyper.shape[1]
        image = _image_inputs(embedding)
        rows = (hyper.detach().float(), *[x.detach().float() for x in extra])
        session = self._session(f"masks{m}", lambda tmp: _export_graph(
            a, _Masks(a), (*[x[:1].expand(CHUNK, *x.shape[1:]) for x in (keys, *rows)],
                           *image), ["logits"], tmp))
        return _chunked(session, keys.detach().float(), rows, image)[0].to(keys.device)


def _chunked(session, first: torch.Tensor, rows: tuple, fixed: tuple) -> list[torch.Tensor]:
    """Run a graph traced for CHUNK rows over any number of rows (the last chunk padded with
    copies of its last row); ``fixed`` inputs are the same for every chunk."""
    n, outs = first.shape[0], []
    for s in range(0, n, CHUNK):
        part = [x[s:s + CHUNK] for x in (first, *rows)]
        pad = CHUNK - part[0].shape[0]
        if pad:
            part = [torch.cat([x, x[-1:].expand(pad, *x.shape[1:])]) for x in part]
        got = session.run(None, _feed(session, (*part, *fixed)))
        outs.append([torch.from_numpy(g[:CHUNK - pad]) for g in got])
    return [torch.cat(o) for o in zip(*outs)]


def _feed(session, ins) -> dict:
    """The inputs the graph kept (the exporter drops unused ones, e.g. SAM's image in "masks")."""
    names = {i.name for i in session.get_inputs()}
    return {f"in{i}": x.contiguous().cpu().numpy() for i, x in enumerate(ins)
            if f"in{i}" in names}


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


# where ORT's decoder graphs measured faster than terrasam's torch decoder (every family since
# the split into "twoway" and "masks"; one run each, full-size random weights, 1024 px, the
# ONNX encoder on both sides: SAM 2.1 tiny at default thresholds decode 11.8 s vs 26.2 s,
# thresholds 0 (432 masks kept) 7.0 vs 9.7 s)
DECODER_FAMILIES = ("sam", "sam_hq", "sam2")


def decoder_enabled(family: str = "sam") -> bool:
    """Whether ORT runs the generator's decodes of ``family``: by default where it measured
    faster (DECODER_FAMILIES); TERRASAM_ONNX_DECODER=0 never, =1 for every family."""
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
    adapter._two_way, adapter._mask_logits = decoder.two_way, decoder.mask_logits
    adapter.ort_decoder = decoder
    return decoder
