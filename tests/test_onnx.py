"""The ONNX Runtime backend: export once per checkpoint, same embeddings and masks as torch,
the cache (reuse, key, damage), the command line and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import geopandas as gpd  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import synth  # noqa: E402
from terrasam.errors import TerrasamError  # noqa: E402
from terrasam.models import load_model, onnx_backend  # noqa: E402
from terrasam.testing import random_checkpoint  # noqa: E402

MODELS = {"sam-vit-b": "meta", "sam-hq-vit-b": "hf", "sam2.1-hiera-tiny": "meta"}


@pytest.fixture(autouse=True)
def onnx_cache(tmp_path, monkeypatch):
    cache = tmp_path / "onnx-cache"
    monkeypatch.setenv("TERRASAM_ONNX_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny prompt-sensitive checkpoint of each family, in a real on-disk format."""
    root = tmp_path_factory.mktemp("onnx-ckpt")
    return {m: random_checkpoint(m, root / m.replace(".", "_"), format=fmt,
                                 prompt_sensitive=True) for m, fmt in MODELS.items()}


def _image(h=200, w=260, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (40, 60, 80)
    img[30:120, 40:150] = (200, 60, 40)
    img[100:180, 160:240] = (60, 200, 90)
    return (img + rng.integers(0, 20, img.shape)).astype(np.uint8)


def _levels(emb) -> list:
    return [emb.features, *emb.extra.get("high_res", []),
            *emb.extra.get("intermediate_embeddings", [])]


@pytest.mark.parametrize("model_id", list(MODELS))
def test_onnx_embed_and_masks_match_torch(model_id, checkpoints, onnx_cache, monkeypatch):
    from terrasam.amg import AMGParams, generate

    ckpt = checkpoints[model_id]
    ref = load_model(model_id, ckpt, device="cpu")
    ort = load_model(model_id, ckpt, device="cpu", backend="onnx")
    assert ort.encoder is not None and ref.encoder is None and ort.backend == "onnx"
    assert ort.encoder.folder.parent == onnx_cache
    assert ort.encoder.folder.name.startswith(ref.checkpoint_sha256)
    image = _image()
    a, b = ref.embed(image), ort.embed(image)
    assert len(_levels(a)) == len(_levels(b)) == {"sam": 1, "sam_hq": 2, "sam2": 3}[ref.family]
    for x, y in zip(_levels(a), _levels(b)):
        assert x.shape == y.shape and y.dtype == torch.float32
        scale = float(x.abs().max())
        assert float((x - y).abs().max()) <= 1e-5 * max(1.0, scale)
    params = AMGParams.for_family(ref.family, points_per_side=5, pred_iou_thresh=0.0,
                                  stability_score_thresh=0.0, box_nms_thresh=1.0)
    ma, mb = generate(ref, image, params), generate(ort, image, params)
    # the generator's decodes went through ORT's two graphs
    masks = "masks1" if ref.family == "sam_hq" else "masks3"  # SAM-HQ: the best mask + HQ's
    assert set(ort.ort_decoder.sessions) == {"twoway", masks}
    assert ort.ort_decoder.folder(masks).name.startswith(ref.checkpoint_sha256)
    assert len(ma) > 3 and len(ma) == len(mb)
    for r, s in zip(ma, mb):
        assert r.bbox == s.bbox or _iou(r, s) >= 0.99
    # 20 points: a full chunk of 16 and a padded one; a box and a 2-point prompt: torch's path
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 200, (20, 1, 2))
    for kw in ({"points": pts}, {"boxes": np.array([[20, 30, 150, 120]])},
               {"points": pts[:2].reshape(1, 2, 2), "point_labels": np.array([[1, 0]])}):
        (la, ia), (lb, ib) = ref.decode(a, **kw), ort.decode(b, **kw)
        assert la.shape == lb.shape and ia.shape == ib.shape
        assert float((ia - ib).abs().max()) < 1e-4
        assert float((la - lb).abs().max()) < 1e-3 * max(1.0, float(la.abs().max()))
    # with the IoU hint both skip the same masks (-inf logits), and agree on the rest
    (la, ia) = ref.decode(a, points=pts)
    v = ia.flatten().sort().values  # a hint between two IoUs, far from both
    mid = range(len(v) // 3, 2 * len(v) // 3)
    k = max(mid, key=lambda i: float(v[i + 1] - v[i]))
    hint = float(v[k] + v[k + 1]) / 2
    (la, ia), (lb, ib) = (ref.decode(a, points=pts, iou_thresh=hint),
                          ort.decode(b, points=pts, iou_thresh=hint))
    skipped = torch.isneginf(la.flatten(2).amax(2))
    assert skipped.any() and not skipped.all()
    assert torch.equal(skipped, torch.isneginf(lb.flatten(2).amax(2)))
    assert float((la[~skipped] - lb[~skipped]).abs().max()) < 1e-3 * max(
        1.0, float(la[~skipped].abs().max()))


def _iou(r, s) -> float:
    canvas = np.zeros((2, 400, 400), bool)
    for k, rec in enumerate((r, s)):
        x0, y0, x1, y1 = rec.bbox
        canvas[k, y0:y1, x0:x1] = rec.mask
    return (canvas[0] & canvas[1]).sum() / max(1, (canvas[0] | canvas[1]).sum())


def test_cache_is_reused_keyed_by_sha256_and_repaired(checkpoints, tmp_path, monkeypatch,
                                                      onnx_cache):
    ckpt = checkpoints["sam-vit-b"]
    calls = []
    real = onnx_backend._export_fp32
    monkeypatch.setattr(onnx_backend, "_export_fp32",
                        lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    first = load_model("sam-vit-b", ckpt, device="cpu", backend="onnx")
    assert calls == ["sam"]
    folder = first.encoder.folder
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["checkpoint_sha256"] == first.checkpoint_sha256 and meta["precision"] == "fp32"
    assert not [p for p in onnx_cache.iterdir() if p.name.startswith(".")]  # no temporaries
    load_model("sam-vit-b", ckpt, device="cpu", backend="onnx")
    assert calls == ["sam"]  # the second load reads the cache

    other = random_checkpoint("sam-vit-b", tmp_path / "other.pth", format="meta", seed=1)
    second = load_model("sam-vit-b", other, device="cpu", backend="onnx")
    assert calls == ["sam", "sam"] and second.encoder.folder != folder

    # an export cut short: the weights file truncated -> exported again, with a warning
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="cached ONNX export .* incomplete or damaged"):
        again = load_model("sam-vit-b", ckpt, device="cpu", backend="onnx")
    assert calls == ["sam", "sam", "sam"]
    # a graph file damaged in place (same size): it does not load -> exported again
    graph = folder / "model.onnx"
    graph.write_bytes(b"\0" * graph.stat().st_size)
    with pytest.warns(UserWarning, match="does not load"):
        again = load_model("sam-vit-b", ckpt, device="cpu", backend="onnx")
    assert calls == ["sam"] * 4
    image = _image()
    ref = load_model("sam-vit-b", ckpt, device="cpu")
    assert float((again.embed(image).features - ref.embed(image).features).abs().max()) < 1e-4


def test_interrupted_export_leaves_nothing(checkpoints, monkeypatch, onnx_cache):
    def boom(model, family, image_size, folder):
        (folder / "model.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_backend, "_export_fp32", boom)
    with pytest.raises(KeyboardInterrupt):
        load_model("sam-vit-b", checkpoints["sam-vit-b"], device="cpu", backend="onnx")
    assert not onnx_cache.exists() or list(onnx_cache.iterdir()) == []


def test_int8_is_cached_separately_and_close(checkpoints, onnx_cache):
    ckpt = checkpoints["sam2.1-hiera-tiny"]
    int8 = load_model("sam2.1-hiera-tiny", ckpt, device="cpu", backend="onnx-int8")
    names = sorted(p.name.rsplit("-", 1)[1] for p in onnx_cache.iterdir())
    assert names == ["fp32", "int8"] and int8.backend == "onnx-int8"
    ops = {n.op_type for n in __import__("onnx").load(str(int8.encoder.folder /
                                                          "model.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops
    ref = load_model("sam2.1-hiera-tiny", ckpt, device="cpu")
    image = _image()
    a, b = ref.embed(image).features, int8.embed(image).features
    assert 0 < float((a - b).abs().max())  # quantized: not bit-identical
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert float(cos) > 0.95


def test_in_memory_adapter_is_keyed_by_its_weights(onnx_cache):
    from terrasam.models import adapter_class, get_spec
    from terrasam.models.registry import family_module
    from terrasam.testing import random_model

    spec = get_spec("sam-vit-b")
    make = adapter_class(family_module("sam"), "sam")
    a = make(random_model("sam-vit-b", seed=0), spec, torch.device("cpu"), torch.float32)
    b = make(random_model("sam-vit-b", seed=3), spec, torch.device("cpu"), torch.float32)
    ea, eb = onnx_backend.attach(a), onnx_backend.attach(b)
    assert ea.folder != eb.folder
    assert ea.folder.name.startswith(onnx_backend.state_dict_sha256(a.model))
    bf16 = make(random_model("sam-vit-b"), spec, torch.device("cpu"), torch.bfloat16)
    with pytest.raises(TerrasamError, match="float32"):
        onnx_backend.attach(bf16)


def test_refusals_in_one_sentence(monkeypatch, checkpoints):
    from terrasam.checks import check_run

    with pytest.raises(TerrasamError, match=r"^--backend onnx runs SAM, SAM-HQ and SAM 2/2\.1 "
                                            r"image encoders; run SAM 3 with --backend torch\.$"):
        check_run(model="sam3", backend="onnx")
    with pytest.raises(TerrasamError, match="must be one of torch, onnx, onnx-int8"):
        check_run(backend="tensorrt")
    with pytest.raises(TerrasamError, match="onnx-int8 runs on the CPU only"):
        check_run(backend="onnx-int8", device="cuda")
    with pytest.raises(TerrasamError, match="not on mps"):
        check_run(backend="onnx", device="mps")
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(TerrasamError, match="needs onnxruntime-gpu"):
        check_run(backend="onnx", device="cuda")
    assert onnx_backend.device_for("onnx", "auto") == "cpu"
    monkeypatch.setattr(onnx_backend, "available", lambda: False)
    with pytest.raises(TerrasamError) as err:
        check_run(backend="onnx")
    assert str(err.value) == ("--backend onnx needs onnxruntime and onnx, which are not "
                              "installed: pip install 'terrasam[onnx]'")
    check_run(backend="torch")  # torch needs nothing more


def test_cli_segment_with_onnx_backend_end_to_end(checkpoints, tmp_path, onnx_cache):
    from terrasam.cli import main

    scene = synth.make_scene(192, 160)
    src = synth.write_scene(tmp_path / "scene.tif", scene)
    runs = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.gpkg"
        result = CliRunner().invoke(main, [
            "segment", str(src), "-o", str(out), "--checkpoint",
            str(checkpoints["sam2.1-hiera-tiny"]), "--backend", backend, "--device", "cpu",
            "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh",
            "0", "--quiet"])
        assert result.exit_code == 0, result.output
        runs[backend] = gpd.read_file(out)
    assert len(runs["torch"]) > 0 and len(runs["torch"]) == len(runs["onnx"])
    a = runs["torch"].geometry.union_all()
    b = runs["onnx"].geometry.union_all()
    assert a.symmetric_difference(b).area <= 0.01 * a.area
    # the encoder and the decoder's two graphs, each exported once
    assert sorted(p.name.split("-v1-")[1] for p in onnx_cache.iterdir()) == [
        "fp32", "masks3-fp32", "twoway-fp32"]

    result = CliRunner().invoke(main, ["segment", str(src), "-o", str(tmp_path / "x.gpkg"),
                                       "--model", "sam3", "--backend", "onnx"])
    assert result.exit_code == 1
    assert "run SAM 3 with --backend torch" in result.output


def test_decoder_switch_and_damaged_decoder_export(checkpoints, monkeypatch):
    ckpt = checkpoints["sam-vit-b"]
    monkeypatch.setenv("TERRASAM_ONNX_DECODER", "0")
    plain = load_model("sam-vit-b", ckpt, device="cpu", backend="onnx")
    assert getattr(plain, "ort_decoder", None) is None
    assert plain._two_way.__func__ is type(plain)._two_way  # terrasam's own decoder
    assert plain._mask_logits.__func__ is type(plain)._mask_logits
    monkeypatch.delenv("TERRASAM_ONNX_DECODER")
    ort = load_model("sam-vit-b", ckpt, device="cpu", backend="onnx")
    emb = ort.embed(_image())
    pts = np.random.default_rng(2).uniform(0, 200, (17, 1, 2))
    first = ort.decode(emb, pts)
    folder = ort.ort_decoder.folder("masks3")
    (folder / "model.onnx.data").write_bytes(b"cut")
    again = load_model("sam-vit-b", ckpt, device="cpu", backend="onnx")
    with pytest.warns(UserWarning, match="cached ONNX export .*masks3.* incomplete"):
        second = again.decode(again.embed(_image()), pts)
    assert torch.equal(first[1], second[1])
