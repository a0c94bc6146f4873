"""Every option is checked before the model loads or any tile runs, in one sentence."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import synth
from terrasam import api
from terrasam.cli import main
from terrasam.errors import TerrasamError
from terrasam.models.ref import ModelRef


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return synth.make_scene(128, 128, path=tmp_path_factory.mktemp("val") / "utm.tif")


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """A checkpoint that cannot load, and a loader that fails the test if it is reached."""
    def load(self):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(ModelRef, "load", load)
    bad = tmp_path / "broken.pth"
    bad.write_text("not weights\n")
    return bad


def error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("terrasam: error: "), result.output
    return lines[0][len("terrasam: error: "):]


SEGMENT_CASES = [
    (["--min-area", "-5"], "--min-area: an area must be a non-negative number"),
    (["--min-area", "20m"], "--min-area is an area: write 20m2"),
    (["--min-area", "5parsecs"], "--min-area: unknown unit 'parsecs'"),
    (["--simplify", "-1"], "--simplify: a length must be a non-negative number"),
    (["--fill-holes", "-3"], "--fill-holes: an area must be a non-negative number"),
    (["--tile-size", "10"], "--tile-size must be between 64 and 8192 pixels, got 10"),
    (["--tile-size", "100000"], "--tile-size must be between 64 and 8192 pixels"),
    (["--tile-size", "256", "--overlap", "256"], "--overlap must be at least 0 and smaller "
                                                 "than --tile-size (256 px), got 256 px"),
    (["--overlap", "-1"], "--overlap must be at least 0 and smaller than the tile size"),
    (["--gsd", "0"], "--gsd must be a positive ground sample distance"),
    (["--gsd", "-2"], "--gsd must be a positive ground sample distance"),
    (["--pred-iou-thresh", "1.5"], "pred_iou_thresh must be between 0 and 1"),
    (["--stability-score-thresh", "-0.1"], "stability_score_thresh must be between 0 and 1"),
    (["--box-nms-thresh", "2"], "box_nms_thresh must be between 0 and 1"),
    (["--points-per-side", "0"], "points_per_side must be an integer >= 1"),
    (["--crop-n-layers", "-1"], "crop_n_layers must be an integer >= 0"),
    (["--coverage-passes", "-1"], "coverage_passes must be an integer >= 0"),
    (["--mask-threshold", "nan"], "--mask-threshold must be a finite number"),
    (["--bands", "0,1,2"], "band 0 is out of range"),
    (["--bands", "1,2,9"], "band 9 is out of range"),
    (["--scale", "log"], "invalid value for '--scale'"),
    (["--model", "sam-vit-bb"], "unknown model 'sam-vit-bb'; did you mean sam-vit-b"),
    (["--stats", "mode"], "unknown statistic 'mode'"),
    (["--label-raster", "labels.png"], "unsupported output format '.png'"),
]


@pytest.mark.parametrize("args, expected", SEGMENT_CASES, ids=[" ".join(c[0]) for c in
                                                               SEGMENT_CASES])
def test_segment_options_are_checked_before_the_model(scene, tmp_path, no_model, args,
                                                      expected):
    out = tmp_path / "o.gpkg"
    args = [str(tmp_path / a) if a.endswith(".png") else a for a in args]
    checkpoint = [] if "--model" in args else ["--checkpoint", str(no_model)]
    result = CliRunner().invoke(main, ["segment", str(scene.path), "-o", str(out), *checkpoint,
                                       *args])
    assert expected in error_line(result)
    assert list(tmp_path.iterdir()) == [no_model]  # nothing written, no work directory


PROMPT_CASES = [
    (["--min-area", "-1"], "--min-area: an area must be a non-negative number"),
    (["--simplify", "abc"], "--simplify: cannot read 'abc' as a length"),
    (["--text", "car", "--tile-size", "32"], "--tile-size must be between 64 and 8192"),
    (["--score-threshold", "2"], "invalid value for '--score-threshold'"),
]


@pytest.mark.parametrize("args, expected", PROMPT_CASES, ids=[" ".join(c[0]) for c in
                                                             PROMPT_CASES])
def test_prompt_options_are_checked_before_the_model(scene, tmp_path, no_model, args,
                                                     expected):
    x, y = scene.transform @ (20.5, 20.5)
    result = CliRunner().invoke(main, ["prompt", str(scene.path), "-o", str(tmp_path / "o.gpkg"),
                                       "--checkpoint", str(no_model), "--point", f"{x},{y}",
                                       *args])
    assert expected in error_line(result)
    assert list(tmp_path.iterdir()) == [no_model]


def test_outputs_and_paths_before_the_model(scene, tmp_path, no_model):
    runner = CliRunner()
    base = ["segment", str(scene.path), "--checkpoint", str(no_model)]
    assert "output folder" in error_line(runner.invoke(
        main, base + ["-o", str(tmp_path / "missing" / "o.gpkg")]))
    assert "unsupported output format '.xyz'" in error_line(runner.invoke(
        main, base + ["-o", str(tmp_path / "o.xyz")]))
    (tmp_path / "o.gpkg").write_bytes(b"")
    (tmp_path / "o.png").write_bytes(b"")
    line = error_line(runner.invoke(main, base + ["-o", str(tmp_path / "o.gpkg"), "--preview",
                                                  str(tmp_path / "o.png")]))
    assert f"{tmp_path / 'o.gpkg'}, {tmp_path / 'o.png'} exist; use --overwrite" in line
    (tmp_path / "afile").write_text("x")
    line = error_line(runner.invoke(main, base + ["-o", str(tmp_path / "afile" / "o.gpkg")]))
    assert f"{tmp_path / 'afile'} is a file, not a folder" in line
    line = error_line(runner.invoke(main, base + ["-o", str(tmp_path / "n.gpkg"),
                                                  "--workdir", str(tmp_path / "afile")]))
    assert "'--workdir'" in line and "is a file" in line
    line = error_line(runner.invoke(main, ["segment", str(scene.path), "-o",
                                           str(tmp_path / "n.gpkg"), "--checkpoint",
                                           str(tmp_path / "nope.pth")]))
    assert "does not exist" in line


def test_api_checks_before_the_model(scene, tmp_path, no_model):
    cases = [({"tile_size": 32}, "--tile-size must be between"),
             ({"overlap": 2000, "tile_size": 1024}, "than --tile-size (1024 px), got 2000"),
             ({"scale": "log"}, "--scale must be one of percentile, minmax, none"),
             ({"min_area": -1}, "--min-area"),
             ({"merge_iou": 1.5}, "merge_iou must be between 0 and 1"),
             ({"pred_iou_thresh": 7}, "pred_iou_thresh must be between 0 and 1"),
             ({"workdir": tmp_path / "w.gpkg", "overlap": -3}, "--overlap must be at least 0")]
    for kwargs, expected in cases:
        with pytest.raises(TerrasamError) as err:
            api.segment(scene.path, tmp_path / "o.gpkg", checkpoint=no_model, **kwargs)
        assert expected in str(err.value), (kwargs, str(err.value))
    with pytest.raises(TerrasamError, match="--mask-threshold must be between 0 and 1"):
        api.prompt(scene.path, tmp_path / "o.gpkg", points=[(0, 0)], checkpoint=no_model,
                   mask_threshold=3)
    with pytest.raises(TerrasamError, match="--overlap must be at least 0"):
        api.prompt(scene.path, tmp_path / "o.gpkg", text="car", checkpoint=no_model,
                   overlap=-1)
    assert list(tmp_path.iterdir()) == [no_model]


def test_output_without_extension_gets_gpkg(scene, tmp_path):
    from oracle import OracleAdapter

    x, y = scene.transform @ (30.5, 20.5)
    gdf = api.prompt(scene.path, tmp_path / "objects", points=[(x, y)],
                     adapter=OracleAdapter(background=scene.background, image_size=64))
    assert gdf.attrs["terrasam"]["output"] == str(tmp_path / "objects.gpkg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["objects.gpkg"]
    with pytest.raises(TerrasamError, match=r"objects.gpkg exists; use --overwrite"):
        api.prompt(scene.path, tmp_path / "objects", points=[(x, y)],
                   adapter=OracleAdapter(background=scene.background, image_size=64))


def test_output_help_lists_every_format():
    from terrasam.io import _supported

    for command in ("segment", "prompt"):
        result = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0
        text = " ".join(result.output.split())
        for ext in _supported("vector"):
            assert ext in text, (command, ext)
        assert ".gpkg (also when there is none)" in text
