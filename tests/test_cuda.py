"""The GPU path: run on a CUDA machine by benchmarks/gpu_check.sh (`pytest -m cuda`); skipped
where PyTorch sees no CUDA GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import synth
from terrasam.models import adapter_class, get_spec
from terrasam.models.device import decode_batch_for, resolve_device, resolve_dtype
from terrasam.models.registry import family_module
from terrasam.testing import random_checkpoint, random_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")]


def _adapter(model_id, device, dtype, prompt_sensitive=True):
    spec = get_spec(model_id)
    module = family_module(spec.family)
    model = random_model(model_id, size="tiny", seed=0, prompt_sensitive=prompt_sensitive)
    return adapter_class(module, spec.family)(model, spec, torch.device(device), dtype)


def test_auto_device_and_dtype_pick_the_gpu():
    device = resolve_device("auto")
    assert device.type == "cuda"
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert resolve_dtype("auto", device) == want


def test_decode_batch_is_sized_from_free_gpu_memory():
    batch = decode_batch_for(torch.device("cuda"), 64)
    free, _ = torch.cuda.mem_get_info()
    assert 16 <= batch <= 1024 and batch * (16 << 20) <= free


def test_a_decode_batch_of_that_size_fits_a_full_size_model():
    spec = get_spec("sam2.1-hiera-tiny")
    module = family_module(spec.family)
    ad = adapter_class(module, spec.family)(random_model(spec.model_id, size="full"), spec,
                                            torch.device("cuda"), torch.float32)
    rgb = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    n = decode_batch_for(torch.device("cuda"), 64)
    pts = np.random.default_rng(0).uniform(0, 1024, (n, 1, 2))
    with torch.inference_mode():
        logits, iou = ad.decode(ad.embed(rgb), pts, np.ones((n, 1), dtype=np.int64))
        torch.cuda.synchronize()
    assert logits.shape[0] == n and bool(torch.isfinite(iou).all())


@pytest.mark.parametrize("model_id", ["sam2.1-hiera-tiny", "sam-vit-b"])
def test_gpu_fp32_matches_cpu(model_id):
    rgb = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    pts = np.array([[[64.0, 64.0]], [[180.0, 90.0]], [[128.0, 200.0]]])
    lab = np.ones((3, 1), dtype=np.int64)
    out = {}
    for dev in ("cpu", "cuda"):
        ad = _adapter(model_id, dev, torch.float32)
        with torch.inference_mode():
            logits, iou = ad.decode(ad.embed(rgb), pts, lab)
        out[dev] = (logits.float().cpu(), iou.float().cpu())
    torch.testing.assert_close(out["cuda"][1], out["cpu"][1], atol=2e-3, rtol=2e-3)
    agree = ((out["cuda"][0] > 0) == (out["cpu"][0] > 0)).float().mean().item()
    assert agree >= 0.999


def test_bf16_masks_agree_with_fp32():
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    rgb = np.random.default_rng(2).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    pts = np.random.default_rng(3).uniform(0, 256, (16, 1, 2))
    lab = np.ones((16, 1), dtype=np.int64)
    masks = {}
    for dtype in (torch.float32, torch.bfloat16):
        ad = _adapter("sam2.1-hiera-tiny", "cuda", dtype)
        with torch.inference_mode():
            logits, _ = ad.decode(ad.embed(rgb), pts, lab)
        masks[dtype] = logits.float().cpu() > 0
    agree = (masks[torch.float32] == masks[torch.bfloat16]).float().mean().item()
    assert agree >= 0.95


def test_segment_on_cuda_gives_the_cpu_objects(tmp_path):
    import geopandas as gpd
    from click.testing import CliRunner

    from terrasam.cli import main

    ckpt = random_checkpoint("sam2.1-hiera-tiny", tmp_path / "ckpt", size="tiny", seed=0)
    scene = synth.make_scene(width=256, height=256)
    src = synth.write_scene(tmp_path / "in.tif", scene)
    frames = {}
    for dev in ("cpu", "cuda"):
        out = tmp_path / f"{dev}.gpkg"
        res = CliRunner().invoke(main, [
            "segment", str(src), "-o", str(out), "--checkpoint", str(ckpt), "--device", dev,
            "--dtype", "float32", "--tile-size", "256", "--points-per-side", "8",
            "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--quiet"])
        assert res.exit_code == 0, res.output
        frames[dev] = gpd.read_file(out)
    assert len(frames["cuda"]) == len(frames["cpu"])
    a, b = frames["cpu"].geometry.union_all(), frames["cuda"].geometry.union_all()
    if not a.is_empty:
        assert a.symmetric_difference(b).area <= 0.02 * a.area
