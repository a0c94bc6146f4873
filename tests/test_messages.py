"""Messages say what is wrong in terrasam's words: checkpoints, usage errors, prompts, model
ids, reruns with other parameters, and the summary line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from pyproj import Transformer

import synth
from oracle import OracleAdapter
from terrasam.api import prompt
from terrasam.cli import main
from terrasam.errors import TerrasamError
from terrasam.models import load_model
from terrasam.models.registry import get_spec
from terrasam.testing import random_checkpoint


def one_line_error(result) -> str:
    """The single ``terrasam: error:`` line of a failed CLI run (exit code 1)."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("terrasam: error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return synth.make_scene(128, 128, path=tmp_path_factory.mktemp("msg") / "utm.tif")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return random_checkpoint("sam-vit-b", tmp_path_factory.mktemp("hf") / "m", format="hf")


def load_error(path) -> str:
    with pytest.raises(TerrasamError) as err:
        load_model(checkpoint=path, device="cpu")
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_text_and_empty_checkpoints(tmp_path, suffix):
    text = tmp_path / f"page{suffix}"
    text.write_text("<html><body>403 Forbidden</body></html>\n")
    message = load_error(text)
    assert "is a text file" in message and str(text) in message
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    message = load_error(empty)
    assert "is empty (0 bytes)" in message
    for internal in ("EOFError", "pop from empty list", "header too small"):
        assert internal not in message


def test_truncated_checkpoints(tmp_path, sam_file, sam2_file, hf_folder):
    sources = [sam_file, sam2_file, hf_folder / "model.safetensors"]
    for src in sources:
        data = src.read_bytes()
        cut = tmp_path / f"cut_{src.name}"
        cut.write_bytes(data[: len(data) // 2])
        message = load_error(cut)
        assert "is truncated or corrupted" in message, message
        assert "miniz" not in message and "central directory" not in message
        assert "download it again" in message


def test_legacy_pickle_truncated(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"w": torch.zeros(100)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:40])
    assert "is truncated or corrupted" in load_error(path)


class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_holding_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "x": _Payload(marker)}, path)
    assert not marker.exists()
    message = load_error(path)
    assert not marker.exists()
    assert "holds Python code" in message and "terrasam loads only weights" in message
    assert "weights_only=False" not in message and "weights_only" not in message
    result = CliRunner().invoke(main, ["models"])  # the command line stays usable
    assert result.exit_code == 0


def test_meta_file_missing_a_key_names_it_as_in_the_file(tmp_path, sam_file, sam2_file):
    sd = torch.load(sam2_file, weights_only=True)["model"]
    del sd["image_encoder.trunk.patch_embed.proj.weight"]
    path = tmp_path / "sam2_missing.pt"
    torch.save({"model": sd}, path)
    assert "'image_encoder.trunk.patch_embed.proj.weight'" in load_error(path)

    sd = torch.load(sam_file, weights_only=True)
    del sd["image_encoder.patch_embed.proj.weight"]
    path = tmp_path / "sam_missing.pth"
    torch.save(sd, path)
    message = load_error(path)
    assert "'image_encoder.patch_embed.proj.weight'" in message and "incomplete" in message


def test_mismatched_shapes_are_one_sentence_in_the_files_names(tmp_path, sam_file):
    sd = torch.load(sam_file, weights_only=True)
    key = "image_encoder.blocks.0.mlp.lin1.weight"
    sd[key] = torch.zeros(7, 3)
    path = tmp_path / "shape.pth"
    torch.save(sd, path)
    message = load_error(path)
    assert key in message and "has shape (7, 3)" in message
    assert "torch.Size" not in message and "copying a param" not in message

    sd = torch.load(sam_file, weights_only=True)
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 9)  # a width no head count divides
    path = tmp_path / "heads.pth"
    torch.save(sd, path)
    assert "fit no SAM architecture" in load_error(path)


def test_sam2_file_with_a_wrong_shape_names_the_tensor(tmp_path, sam2_file):
    sd = torch.load(sam2_file, weights_only=True)["model"]
    key = "sam_mask_decoder.iou_token.weight"
    sd[key] = torch.zeros(1, 7)
    path = tmp_path / "shape.pt"
    torch.save({"model": sd}, path)
    message = load_error(path)
    assert f"tensor {key!r} has shape (1, 7), expected (1, " in message


def test_checkpoint_of_another_model(tmp_path, sam2_file):
    with pytest.raises(TerrasamError, match="holds a sam2 model, not sam-vit-b"):
        load_model("sam-vit-b", checkpoint=sam2_file, device="cpu")


# --------------------------------------------------------------------------- usage errors


def test_usage_errors_use_the_one_line_form(scene, tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "o.gpkg")
    line = one_line_error(runner.invoke(main, ["prompt", str(tmp_path), "-o", out,
                                               "--point", "1,1"]))
    assert "'RASTER'" in line and "is a directory" in line
    line = one_line_error(runner.invoke(main, ["segment", str(scene.path), "-o", out,
                                               "--nodata", "abc"]))
    assert "'--nodata'" in line and "'abc' is not a valid float" in line
    assert "terrasam segment --help" in line
    line = one_line_error(runner.invoke(main, ["segment", str(scene.path)]))
    assert "missing option '--output'" in line
    line = one_line_error(runner.invoke(main, ["segment", str(scene.path), "-o", out,
                                               "--tile-sise", "3"]))
    assert "no such option '--tile-sise'" in line and "did you mean '--tile-size'" in line
    line = one_line_error(runner.invoke(main, ["segmnt"]))
    assert "no such command 'segmnt'" in line
    help_ = runner.invoke(main, ["segment", "--help"])
    assert help_.exit_code == 0 and "Usage: " in help_.output
    assert not Path(out).exists()


# --------------------------------------------------------------------------- prompts


def test_non_finite_coordinates_are_refused_as_such(scene):
    x, y = scene.transform @ (10, 10)
    with pytest.raises(TerrasamError, match=r"^point 3 has a non-finite coordinate \(nan\)"):
        prompt(scene.path, points=[(x, y), (x, y), (float("nan"), y)], adapter=OracleAdapter())
    with pytest.raises(TerrasamError, match=r"^box 1 has a non-finite coordinate \(inf\)"):
        prompt(scene.path, boxes=[(x, y, float("inf"), y + 1)], adapter=OracleAdapter())
    result = CliRunner().invoke(main, ["prompt", str(scene.path), "-o", "x.gpkg",
                                       "--point", f"{x},{y}", "--point", "nan,1"])
    assert "point 2 has a non-finite coordinate (nan)" in one_line_error(result)


def test_prompt_outside_gives_bounds_in_its_crs_and_spots_swapped_lon_lat(scene):
    t = Transformer.from_crs(scene.crs, synth.WGS84, always_xy=True)
    lon, lat = t.transform(*(scene.transform @ (64, 64)))
    with pytest.raises(TerrasamError) as err:
        prompt(scene.path, points=[(lat, lon)], crs="EPSG:4326", adapter=OracleAdapter())
    message = str(err.value)
    assert "did you swap lon/lat?" in message and "in EPSG:4326" in message
    west, south, east, north = (float(v) for v in
                                message.split("(")[1].split(" in ")[0].split(","))
    assert west < lon < east and south < lat < north  # the raster's bounds in degrees
    with pytest.raises(TerrasamError) as err:
        prompt(scene.path, points=[(lon + 1, lat)], crs="EPSG:4326", adapter=OracleAdapter())
    assert "did you swap" not in str(err.value) and "check their CRS" in str(err.value)


# --------------------------------------------------------------------------- model ids


def test_misspelled_model_id_suggests_the_closest():
    with pytest.raises(TerrasamError) as err:
        get_spec("sam2.1-hiera-tiy")
    assert "did you mean sam2.1-hiera-tiny" in str(err.value)
    with pytest.raises(TerrasamError) as err:
        get_spec("zzz")
    assert "did you mean" not in str(err.value) and "known models: sam-vit-b" in str(err.value)


# --------------------------------------------------------------------------- reruns, summary


def test_rerun_with_other_parameters_names_them(tmp_path):
    from terrasam.engines.workdir import MANIFEST, WorkDir

    params = {"tile_size": 256, "amg": {"pred_iou_thresh": 0.8, "points_per_side": 8},
              "model": "m"}
    first = WorkDir(tmp_path / "w", params)
    (first.path / "tile_000001.npz").write_bytes(b"x")
    with pytest.warns(UserWarning) as caught:
        WorkDir(tmp_path / "w", {**params, "tile_size": 512,
                                 "amg": {"pred_iou_thresh": 0.5, "points_per_side": 8}})
    message = str(caught[0].message)
    assert "is from a run with other parameters (changed: pred_iou_thresh, tile_size); " \
           "starting afresh" in message
    assert not (tmp_path / "w" / "tile_000001.npz").exists()
    assert json.loads((tmp_path / "w" / MANIFEST).read_text())["params"]["tile_size"] == 512


def test_cli_summary_and_warning_lines(scene, tmp_path, sam_file):
    x, y = scene.transform @ (30.5, 20.5)
    out = tmp_path / "one.gpkg"
    result = CliRunner().invoke(main, ["prompt", str(scene.path), "-o", str(out),
                                       "--checkpoint", str(sam_file), "--point", f"{x},{y}"])
    assert result.exit_code == 0, result.output
    assert f"1 object from 1 prompt -> {out}" in result.output
    work = tmp_path / "seg.gpkg.terrasam-work"
    runner = CliRunner()
    common = ["segment", str(scene.path), "-o", str(tmp_path / "seg.gpkg"), "--checkpoint",
              str(sam_file), "--points-per-side", "2", "--keep-workdir", "--overwrite"]
    first = runner.invoke(main, common + ["--tile-size", "64", "-q"])
    assert first.exit_code == 0, first.output
    assert work.is_dir()
    second = runner.invoke(main, common + ["--tile-size", "96"])
    assert second.exit_code == 0, second.output
    warning = [line for line in second.output.splitlines() if line.startswith("terrasam: w")]
    assert warning == [f"terrasam: warning: work directory {str(work)!r} is from a run with "
                       "other parameters (changed: overlap, tile_size); starting afresh"]
    summary = [line for line in second.output.splitlines() if " from 4 tiles in " in line]
    assert len(summary) == 1 and "1 objects" not in summary[0] and "1 tiles" not in summary[0]


def test_model_folder_with_broken_files(tmp_path, hf_folder):
    import shutil

    cases = {"trunc": "is truncated or corrupted", "empty": "is empty (0 bytes)",
             "text": "is a text file, not a safetensors file",
             "config-empty": "config.json is empty",
             "config-text": "config.json is not valid JSON (Expecting value at line 1)",
             "config-wider": "does not match the model it describes: wrong-shaped keys "
                             "vision_encoder."}
    for case, expected in cases.items():
        folder = tmp_path / case
        shutil.copytree(hf_folder, folder)
        weights = folder / "model.safetensors"
        if case == "trunc":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif case == "empty":
            weights.write_bytes(b"")
        elif case == "text":
            weights.write_text("<html>")
        elif case == "config-empty":
            (folder / "config.json").write_text("")
        elif case == "config-text":
            (folder / "config.json").write_text("hello")
        else:  # a config of a wider model than the weights
            config = json.loads((folder / "config.json").read_text())
            config["vision_config"]["hidden_size"] += 16
            (folder / "config.json").write_text(json.dumps(config))
        message = load_error(folder)
        assert expected in message, (case, message)
        assert "ignore_mismatched_sizes" not in message and "header" not in message


def test_prompt_files_that_cannot_be_used(scene, tmp_path):
    zero = tmp_path / "zero.geojson"
    zero.write_bytes(b"")
    junk = tmp_path / "junk.geojson"
    junk.write_text("{not json at all")
    none = tmp_path / "none.geojson"
    none.write_text('{"type": "FeatureCollection", "features": []}')
    cases = [(zero, "is empty (0 bytes)"),
             (junk, "is not a vector file GDAL reads"),
             (none, "holds no features: it has no point prompts")]
    for path, expected in cases:
        with pytest.raises(TerrasamError) as err:
            prompt(scene.path, points=str(path), adapter=OracleAdapter())
        message = str(err.value)
        assert str(path) in message and expected in message, message
        assert "prefixing the file path" not in message and "driver" not in message
