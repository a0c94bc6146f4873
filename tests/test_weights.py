"""Weights resolution and loading: HF cache, offline error, strictness, weights-only, sha256."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from terrasam.errors import TerrasamError
from terrasam.models import get_spec, load_model
from terrasam.models.device import resolve_device, resolve_dtype
from terrasam.models.weights import read_state_dict
from terrasam.testing import random_checkpoint


@pytest.fixture(scope="module")
def meta_file(tmp_path_factory) -> Path:
    return random_checkpoint("sam-vit-b", tmp_path_factory.mktemp("meta"), format="meta", seed=2)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return random_checkpoint("sam-vit-b", tmp_path_factory.mktemp("hf") / "m", format="hf", seed=2)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf_home" / "hub"


def _fake_hub_snapshot(hub: Path, repo: str, folder: Path) -> None:
    """Lay out `folder` as the cached main revision of `repo`, as huggingface_hub does."""
    root = hub / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(folder, root / "snapshots" / commit)


def test_offline_without_cache_is_one_sentence(empty_hub):
    with pytest.raises(TerrasamError) as err:
        load_model("sam-vit-b", device="cpu")
    msg = str(err.value)
    spec = get_spec("sam-vit-b")
    assert "\n" not in msg and msg.count(": ") <= 1
    for part in ("sam-vit-b", spec.hf_repo, spec.meta_url, "--checkpoint", "HF_HUB_OFFLINE",
                 str(empty_hub)):
        assert part in msg


def test_model_id_resolves_from_the_local_cache_offline(empty_hub, hf_folder):
    _fake_hub_snapshot(empty_hub, "facebook/sam-vit-base", hf_folder)
    adapter = load_model("sam-vit-b", device="cpu")
    assert adapter.model_id == "sam-vit-b" and adapter.checkpoint == "hf://facebook/sam-vit-base"
    expected = hashlib.sha256((hf_folder / "model.safetensors").read_bytes()).hexdigest()
    assert adapter.checkpoint_sha256 == expected


def test_meta_checkpoint_sha256(meta_file):
    adapter = load_model(checkpoint=meta_file, device="cpu")
    assert adapter.checkpoint == str(meta_file)
    assert adapter.checkpoint_sha256 == hashlib.sha256(meta_file.read_bytes()).hexdigest()


def test_hf_folder_loads_and_infers_family(hf_folder):
    adapter = load_model(checkpoint=hf_folder, device="cpu")
    assert adapter.family == "sam" and adapter.model_id == "sam-custom"


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_meta_loading_is_strict(meta_file, tmp_path, change):
    sd = torch.load(meta_file, weights_only=True)
    if change == "missing":
        del sd["mask_decoder.iou_token.weight"]
        expected = "iou_token"
    elif change == "extra":
        sd["mask_decoder.extra_head.weight"] = torch.zeros(3)
        expected = "mask_decoder.extra_head.weight"
    else:
        sd["mask_decoder.output_upscaling.0.bias"] = torch.zeros(5)
        expected = "upscale_conv1.bias|output_upscaling.0.bias"
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(TerrasamError, match=expected):
        load_model(checkpoint=path, device="cpu")


def test_hf_folder_loading_is_strict(hf_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(hf_folder, folder)
    sd = load_file(folder / "model.safetensors")
    del sd["mask_decoder.iou_token.weight"]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TerrasamError, match="missing key mask_decoder.iou_token.weight"):
        load_model(checkpoint=folder, device="cpu")


class Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(TerrasamError, match="refusing to load .*holds Python code "
                                            r"\(\w+\.getcwd\).*loads only weights"):
        load_model(checkpoint=path, device="cpu")


def test_wrapped_state_dict_is_unwrapped(meta_file, tmp_path):
    sd = torch.load(meta_file, weights_only=True)
    path = tmp_path / "wrapped.pt"
    torch.save({"model": sd}, path)
    assert set(read_state_dict(path)) == set(sd)
    assert load_model(checkpoint=path, device="cpu").family == "sam"


def test_checkpoint_and_model_id_must_agree(tmp_path):
    path = random_checkpoint("sam-hq-vit-b", tmp_path, format="meta")
    with pytest.raises(TerrasamError, match="holds a sam_hq model, not sam-vit-b"):
        load_model("sam-vit-b", checkpoint=path, device="cpu")


def test_bad_checkpoint_paths(tmp_path):
    with pytest.raises(TerrasamError, match="does not exist"):
        load_model(checkpoint=tmp_path / "nope.pth")
    with pytest.raises(TerrasamError, match="without config.json"):
        load_model(checkpoint=tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(TerrasamError, match="is not a checkpoint"):
        load_model(checkpoint=tmp_path / "notes.txt")
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(TerrasamError, match="junk.pth is a text file, not a PyTorch checkpoint"):
        load_model(checkpoint=tmp_path / "junk.pth")
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(TerrasamError, match="not a checkpoint terrasam recognises"):
        load_model(checkpoint=tmp_path / "other.pth")
    with pytest.raises(TerrasamError, match="unknown model 'sam-vit-x'"):
        load_model("sam-vit-x")


def test_device_and_dtype_choices():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(TerrasamError, match="no CUDA GPU"):
            resolve_device("cuda")
        assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(TerrasamError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(TerrasamError, match="unknown dtype"):
        resolve_dtype("int8")


def test_bfloat16_adapter_runs(meta_file):
    import numpy as np

    adapter = load_model(checkpoint=meta_file, device="cpu", dtype="bfloat16")
    emb = adapter.embed(np.zeros((64, 80, 3), dtype=np.uint8))
    lo, iou = adapter.decode(emb, np.array([[[10.0, 20.0]]]))
    assert emb.features.dtype == torch.bfloat16
    assert lo.dtype == torch.float32 and lo.shape == (1, 3, 256, 256)
    assert adapter.upscale(lo, emb).shape == (1, 3, 64, 80)
