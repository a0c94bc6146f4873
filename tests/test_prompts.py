"""Point, box and text prompts: CRS handling, windows, groups, skips, the CLI, real tiny models."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely
from click.testing import CliRunner
from pyproj import Transformer

import synth
from oracle import OracleAdapter
from terrasam.api import prompt
from terrasam.cli import main
from terrasam.errors import TerrasamError
from terrasam.prompts import WindowPlan, parse_box, parse_point, plan_window

# default_shapes on 256 x 256: 1 rect, 2 ring (with hole), 3 diagonal band, 4 diamond, 5 rect
SIZE = 256


def iou(a, b) -> float:
    return shapely.area(shapely.intersection(a, b)) / shapely.area(shapely.union(a, b))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "utm.tif"
    return synth.make_scene(SIZE, SIZE, path=path)


@pytest.fixture(scope="module")
def bordered(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "border.tif"
    return synth.make_scene(SIZE, SIZE, path=path, nodata_border=10)


def inside_point(scene, i):
    """A CRS point well inside object i (a pixel centre of the object's interior)."""
    poly = scene.pixel_polygons[i]
    c = poly.buffer(-1.5).representative_point()
    x, y = np.floor(c.x) + 0.5, np.floor(c.y) + 0.5
    return scene.transform @ (x, y)


def to_wgs84(scene, xy):
    t = Transformer.from_crs(scene.crs, synth.WGS84, always_xy=True)
    return t.transform(*xy)


def collect(messages):
    return lambda m: messages.append(m)


# --------------------------------------------------------------------------- parsing / planning


def test_parse_point_and_box():
    assert parse_point("10.5, -3") == (10.5, -3.0)
    assert parse_point("1,2,0") == (1.0, 2.0, 0)
    assert parse_point("1,2,1,roof") == (1.0, 2.0, 1, "roof")
    assert parse_box("0,1,2,3") == (0.0, 1.0, 2.0, 3.0)
    assert parse_box("0,1,2,3,g") == (0.0, 1.0, 2.0, 3.0, "g")
    with pytest.raises(TerrasamError, match="X,Y"):
        parse_point("1")
    with pytest.raises(TerrasamError, match="must be 1 \\(positive\\) or 0"):
        parse_point("1,2,5")
    with pytest.raises(TerrasamError, match="numbers"):
        parse_box("a,1,2,3")


def test_plan_window_snaps_clamps_and_downsamples():
    # two nearby points share one snapped 128 window, a quarter window from its edges
    a = plan_window((300, 300, 300, 300), 1000, 800, 128)
    b = plan_window((310, 290, 310, 290), 1000, 800, 128)
    assert a == b
    assert a.width == a.height == a.out_w == 128
    assert a.col_off % 64 == 0 and a.col_off + 32 <= 300 <= a.col_off + 96
    # clamped inside the raster at the edges
    edge = plan_window((995, 2, 995, 2), 1000, 800, 128)
    assert (edge.col_off, edge.row_off) == (872, 0)
    # a raster smaller than the model input: the whole raster, unscaled
    assert plan_window((5, 5, 6, 6), 100, 60, 128) == WindowPlan(0, 0, 100, 60, 100, 60)
    # a box larger than the window: a window holding it, read down to the model size
    big = plan_window((100, 100, 500, 300), 1000, 800, 128)
    assert big.col_off <= 100 and big.col_off + big.width >= 500
    assert big.row_off <= 100 and big.row_off + big.height >= 300
    assert max(big.out_w, big.out_h) == 128
    assert big.scale[0] == pytest.approx(big.scale[1], rel=0.02) and big.scale[0] > 3.5


# --------------------------------------------------------------------------- oracle model


def test_points_in_wgs84_land_on_the_right_objects(scene):
    pts = [to_wgs84(scene, inside_point(scene, i)) for i in sorted(scene.polygons)]
    oracle = OracleAdapter(background=scene.background, image_size=128)
    gdf = prompt(scene.path, points=pts, crs="EPSG:4326", adapter=oracle)
    assert list(gdf.prompt_id) == sorted(scene.polygons)
    assert gdf.crs.to_epsg() == 32614
    assert set(gdf.prompt_type) == {"point"} and set(gdf.prompt_crs) == {"EPSG:4326"}
    for row in gdf.itertuples():
        assert iou(row.geometry, scene.polygons[row.prompt_id]) >= 0.99, row.prompt_id
        # the prompt column holds the coordinates as given
        x, y = shapely.from_wkt(row.prompt).coords[0]
        assert (x, y) == pytest.approx(pts[row.prompt_id - 1], abs=1e-7)
    assert gdf.area_m2.iloc[0] == pytest.approx(scene.polygons[1].area)
    assert set(gdf.model) == {"oracle"} and gdf.score.min() > 0.9


def test_nearby_prompts_share_one_embedding(scene):
    # four points inside the big rectangle (object 1): one window, one embedding, four decodes
    x0, y0, x1, y1 = scene.pixel_polygons[1].bounds
    pts = [scene.transform @ (x0 + dx, y0 + dy) for dx in (5.5, 20.5) for dy in (5.5, 30.5)]
    oracle = OracleAdapter(background=scene.background, image_size=128)
    gdf = prompt(scene.path, points=pts, adapter=oracle)
    assert oracle.embed_calls == 1 and oracle.decoder_calls == 4
    assert len(gdf) == 4 and all(iou(g, scene.polygons[1]) > 0.999 for g in gdf.geometry)


def test_object_cut_by_the_window_is_completed(scene):
    # the ring (object 2, ~100 px) seen through 64 px windows: regrown until it is whole
    oracle = OracleAdapter(background=scene.background, image_size=64)
    gdf = prompt(scene.path, points=[inside_point(scene, 2)], adapter=oracle, warn=print)
    assert oracle.embed_calls >= 2
    # read at about half resolution in the end (blurred edges), but whole
    got = gdf.geometry.iloc[0]
    assert got.bounds == pytest.approx(scene.polygons[2].bounds, abs=2.0)  # 4 px
    assert iou(got, scene.polygons[2]) > 0.75


def test_box_prompts_and_a_big_box_downsampled_with_a_warning(scene):
    boxes = []
    for i in (1, 4, 5):
        x0, y0, x1, y1 = scene.polygons[i].bounds
        boxes.append((x0 - 1, y0 - 1, x1 + 1, y1 + 1))
    oracle = OracleAdapter(background=scene.background, image_size=128)
    gdf = prompt(scene.path, boxes=boxes, adapter=oracle)
    assert list(gdf.prompt_type) == ["box"] * 3
    for row, i in zip(gdf.itertuples(), (1, 4, 5)):
        assert iou(row.geometry, scene.polygons[i]) >= 0.99
        assert shapely.from_wkt(row.prompt).bounds == pytest.approx(boxes[row.prompt_id - 1])
    # a 16 px model: the 77 px rectangle's box is read at about 1/6 resolution, reported
    messages = []
    small = OracleAdapter(background=scene.background, image_size=16, tolerance=40)
    gdf = prompt(scene.path, boxes=boxes[:1], adapter=small, warn=collect(messages))
    assert len(gdf) == 1 and iou(gdf.geometry.iloc[0], scene.polygons[1]) > 0.8
    assert any("1 prompt spans more than the model's 16-pixel input" in m
               and "(prompt ids 1)" in m for m in messages), messages


def test_negative_points_and_groups(scene):
    p1, p4, p5 = (inside_point(scene, i) for i in (1, 4, 5))
    oracle = OracleAdapter(background=scene.background, image_size=128)
    # group "g": positives on 1 and 5, a negative on 5 -> object 1 only; "h": object 4
    gdf = prompt(scene.path, points=[(*p1, 1, "g"), (*p5, 1, "g"), (*p5, 0, "g"), (*p4, 1, "h")],
                 adapter=oracle)
    assert list(gdf.prompt_type) == ["points", "point"]
    assert iou(gdf.geometry.iloc[0], scene.polygons[1]) > 0.999
    assert iou(gdf.geometry.iloc[1], scene.polygons[4]) > 0.999
    assert shapely.from_wkt(gdf.prompt.iloc[0]).geom_type == "MultiPoint"
    # an ungrouped negative refines every ungrouped prompt whose window holds it: object 5's
    # point is cancelled (reported as empty), object 1 is untouched
    messages = []
    gdf = prompt(scene.path, points=[p1, p5, (*p5, 0)], adapter=oracle, warn=collect(messages))
    assert list(gdf.prompt_id) == [1] and gdf.prompt_type.iloc[0] == "points"
    assert iou(gdf.geometry.iloc[0], scene.polygons[1]) > 0.999
    assert "1 of 2 prompts gave an empty mask (prompt ids 2)" in messages
    with pytest.raises(TerrasamError, match="group 'n' has only negative points"):
        prompt(scene.path, points=[(*p1, 0, "n")], adapter=oracle)


def test_prompt_files_in_other_crs_with_label_and_group_fields(scene, tmp_path):
    pts = {i: to_wgs84(scene, inside_point(scene, i)) for i in (1, 2, 3, 4, 5)}
    points = gpd.GeoDataFrame(
        {"lab": [1, 1, 0, 1, 1], "grp": ["a", "a", "a", "b", None]},
        geometry=gpd.points_from_xy([pts[i][0] for i in (1, 5, 5, 2, 3)],
                                    [pts[i][1] for i in (1, 5, 5, 2, 3)]),
        crs="EPSG:4326")
    points.to_file(tmp_path / "points.gpkg")
    # a box in web mercator around the ring, grouped ("b") with the point on the ring
    ring = gpd.GeoSeries([scene.polygons[2].envelope.buffer(1.0, join_style="mitre")],
                         crs=scene.crs).to_crs(3857)
    boxes = gpd.GeoDataFrame({"grp": ["b"]}, geometry=ring, crs=3857)
    boxes.to_file(tmp_path / "boxes.geojson")
    oracle = OracleAdapter(background=scene.background, image_size=128)
    gdf = prompt(scene.path, tmp_path / "out.gpkg", points=tmp_path / "points.gpkg",
                 boxes=tmp_path / "boxes.geojson", label_field="lab", group_field="grp",
                 adapter=oracle)
    got = {r.prompt_type: r for r in gdf.itertuples()}
    # "a": objects 1 + 5, minus 5 (negative); "b": the ring's box and point; the ungrouped
    # point on the diagonal band is its own prompt
    assert sorted(got) == ["box+points", "point", "points"]
    assert iou(got["points"].geometry, scene.polygons[1]) > 0.999
    assert iou(got["box+points"].geometry, scene.polygons[2]) > 0.999
    assert iou(got["point"].geometry, scene.polygons[3]) > 0.99
    # the box+points prompt is written in one CRS (its point's): the box is back in degrees
    wkt = shapely.from_wkt(got["box+points"].prompt)
    assert wkt.geom_type == "GeometryCollection" and got["box+points"].prompt_crs == "EPSG:4326"
    assert wkt.geoms[0].contains(wkt.geoms[1]) and -100 < wkt.geoms[0].bounds[0] < -98
    assert got["points"].prompt_crs == "EPSG:4326"
    written = gpd.read_file(tmp_path / "out.gpkg")
    assert len(written) == 3 and written.crs.to_epsg() == 32614
    from terrasam.io import read_provenance

    prov = read_provenance(tmp_path / "out.gpkg")
    assert prov["parameters"]["command"] == "prompt"
    assert prov["parameters"]["group_field"] == "grp"


def test_prompts_outside_or_on_nodata_are_reported_and_skipped(bordered):
    sc = bordered
    inside = [inside_point(sc, 1), inside_point(sc, 4)]
    on_nodata = [sc.transform @ (3.5, 100.5), sc.transform @ (128.5, 251.5)]
    outside = [sc.transform @ (-40.5, 10.5)]
    messages = []
    oracle = OracleAdapter(background=sc.background, image_size=128)
    gdf = prompt(sc.path, points=inside + outside + on_nodata, adapter=oracle,
                 warn=collect(messages))
    assert list(gdf.prompt_id) == [1, 2]
    assert "1 of 5 prompts fall outside the raster and were skipped (prompt ids 3)" in messages
    assert "2 of 5 prompts fall on nodata and were skipped (prompt ids 4, 5)" in messages
    skipped = gdf.attrs["terrasam"]["skipped"]
    assert skipped["outside"] == [3] and sorted(skipped["nodata"]) == [4, 5]
    with pytest.raises(TerrasamError, match=r"all 2 prompts fall outside the raster \("):
        prompt(sc.path, points=[(0.0, 0.0), (1e6, 0.0)], adapter=oracle)
    with pytest.raises(TerrasamError, match="all 2 prompts fall outside the raster or on nodata"):
        prompt(sc.path, points=on_nodata, adapter=oracle, warn=collect([]))


def test_multimask_all_parts_and_gsd(scene):
    oracle = OracleAdapter(background=scene.background, image_size=128)
    p1 = inside_point(scene, 1)
    gdf = prompt(scene.path, points=[p1], adapter=oracle, multimask_all=True)
    assert list(gdf["rank"]) == [1, 2, 3]
    assert list(gdf.score) == sorted(gdf.score, reverse=True)

    class Blob(OracleAdapter):
        """Adds a stray square to every mask (a second part away from the prompt)."""

        def decode(self, *args, **kw):
            logits, scores = super().decode(*args, **kw)
            logits[..., 2:6, 2:6] = 20.0
            return logits, scores

    blob = Blob(background=scene.background, image_size=256)
    whole = prompt(scene.path, points=[p1], adapter=blob).geometry.iloc[0]
    kept = prompt(scene.path, points=[p1], adapter=blob, parts="prompt").geometry.iloc[0]
    assert whole.geom_type == "MultiPolygon" and iou(kept, scene.polygons[1]) > 0.999
    # --gsd 1 m on a 0.5 m raster: windows read at half resolution (1 m pixel edges; the
    # bilinear read blurs the rim the oracle then leaves out)
    gdf = prompt(scene.path, points=[p1], adapter=oracle, gsd=1.0)
    coords = shapely.get_coordinates(gdf.geometry.iloc[0])
    assert np.allclose(coords, np.round(coords)) and len(coords) == 5
    assert iou(gdf.geometry.iloc[0], scene.polygons[1]) > 0.9


# --------------------------------------------------------------------------- CLI


def test_cli_errors_are_one_line(scene, tmp_path):
    runner = CliRunner()
    cases = [
        (["--point", "1,2,3,4,5"], "--point takes X,Y"),
        (["--point", "0,0", "--point", "1,1"], "all 2 prompts fall outside the raster"),
        (["--point", "1,1", "--points", str(tmp_path / "x.gpkg")], "not both"),
        (["--points", str(tmp_path / "missing.gpkg")], "does not exist"),
        (["--point", "0,0", "--crs", "EPSG:999999"], "is not a CRS"),
        ([], "give point prompts, box prompts or a text prompt"),
        (["--point", "500010,4099990,0"], "negative points need a positive point or a box"),
    ]
    for args, expected in cases:
        result = runner.invoke(main, ["prompt", str(scene.path), "-o",
                                      str(tmp_path / "o.gpkg"), *args])
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("terrasam: error: "), result.output
        assert expected in lines[0], (expected, lines[0])
    assert not (tmp_path / "o.gpkg").exists()


@pytest.mark.parametrize("model_id", ["sam-vit-b", "sam2.1-hiera-tiny"])
def test_cli_with_tiny_random_models(model_id, scene, tmp_path):
    from terrasam.io import read_provenance
    from terrasam.testing import random_checkpoint

    ckpt = random_checkpoint(model_id, tmp_path / "ckpt", size="tiny", seed=0,
                             prompt_sensitive=True)
    lon, lat = to_wgs84(scene, inside_point(scene, 1))
    x0, y0, x1, y1 = scene.polygons[4].bounds
    out = tmp_path / "out.gpkg"
    result = CliRunner().invoke(main, [
        "prompt", str(scene.path), "-o", str(out), "--checkpoint", str(ckpt),
        "--point", f"{lon},{lat}", "--crs", "EPSG:4326", "--quiet"] + [
        "--box", f"{lon - 1e-4},{lat - 1e-4},{lon + 1e-4},{lat + 1e-4}"])
    assert result.exit_code == 0, result.output
    gdf = gpd.read_file(out)
    assert set(gdf.prompt_id) <= {1, 2} and len(gdf) >= 1
    assert set(gdf.prompt_type) <= {"point", "box"}
    assert gdf.crs.to_epsg() == 32614
    bounds = shapely.box(*synth.pixel_to_crs(shapely.box(0, 0, SIZE, SIZE),
                                             scene.transform).bounds)
    assert all(bounds.contains(g) for g in gdf.geometry)
    assert ((gdf.score > 0) & (gdf.score <= 1.5)).all()
    prov = read_provenance(out)
    assert prov["parameters"]["command"] == "prompt"
    assert prov["parameters"]["crs"] == "EPSG:4326"


def test_text_over_several_tiles_is_stitched(scene):
    """A fake SAM 3 answering "rect" with the colour components of the rectangles."""

    class TextOracle(OracleAdapter):
        def segment_text(self, image, text, score_threshold=0.5, mask_threshold=0.5,
                         embedding=None):
            self.text_calls = getattr(self, "text_calls", 0) + 1
            out = []
            for i in (1, 5):
                colour = np.array(synth.colour(i))
                same = np.all(np.abs(image.astype(int) - colour) <= 8, axis=-1)
                if same.any():
                    out.append({"mask": same, "score": 0.9 - 0.1 * (i == 5), "box": None})
            return out

    oracle = TextOracle(background=scene.background, image_size=96)
    oracle.family = "sam3"
    gdf = prompt(scene.path, text="rect", adapter=oracle, scale="none")
    assert oracle.text_calls == 16  # 4 x 4 tiles of 96 px with 24 px overlap over 256 px
    assert len(gdf) == 2 and set(gdf.prompt_type) == {"text"} and set(gdf.prompt) == {"rect"}
    assert set(gdf.prompt_id) == {1}
    by_area = gdf.sort_values("area_m2", ascending=False)
    assert iou(by_area.geometry.iloc[0], scene.polygons[1]) > 0.999  # spans 2 tiles
    assert iou(by_area.geometry.iloc[1], scene.polygons[5]) > 0.999
    assert sorted(gdf.score) == pytest.approx([0.8, 0.9])


def test_text_needs_a_text_model(scene):
    oracle = OracleAdapter(background=scene.background, image_size=128)
    with pytest.raises(TerrasamError, match="does not take text prompts"):
        prompt(scene.path, text="pool", adapter=oracle)


def test_torch_not_imported_by_the_cli_module():
    import subprocess
    import sys

    code = "import sys, terrasam.cli.prompt; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def tiny_tokenizer(folder):
    """A word-level tokenizer saved beside a tiny SAM 3 checkpoint (no hub files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<|startoftext|>", "<|endoftext|>", "<unk>", "swimming", "pool", "roof"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=32)
    fast.save_pretrained(folder)


def test_cli_tiny_random_sam3_text_over_tiles_and_points(tmp_path):
    pytest.importorskip("terrasam.models.sam3")
    from terrasam.testing import random_checkpoint

    ckpt = random_checkpoint("sam3", tmp_path / "ckpt", size="tiny", seed=0)
    if not list(ckpt.glob("tokenizer*")):
        tiny_tokenizer(ckpt)
    sc = synth.make_scene(160, 160, path=tmp_path / "s.tif")
    out = tmp_path / "text.gpkg"
    result = CliRunner().invoke(main, [
        "prompt", str(sc.path), "-o", str(out), "--checkpoint", str(ckpt), "--text",
        "swimming pool", "--tile-size", "96", "--overlap", "32", "--score-threshold", "0",
        "--quiet"])
    assert result.exit_code == 0, result.output
    gdf = gpd.read_file(out)
    assert len(gdf) > 0 and set(gdf.prompt_type) == {"text"}
    assert set(gdf.prompt) == {"swimming pool"} and set(gdf.prompt_id) == {1}
    frame = synth.pixel_to_crs(shapely.box(0, 0, 160, 160), sc.transform)
    assert all(frame.buffer(1e-6).contains(g) for g in gdf.geometry)
    assert gdf.score.between(0, 1).all()
    # a point prompt runs through SAM 3's tracker (from the same checkpoint folder)
    result = CliRunner().invoke(main, [
        "prompt", str(sc.path), "-o", str(tmp_path / "pt.gpkg"), "--checkpoint", str(ckpt),
        "--point", ",".join(map(str, inside_point(sc, 1))), "--quiet"])
    assert result.exit_code == 0, result.output
    points = gpd.read_file(tmp_path / "pt.gpkg")
    assert list(points.prompt_type) == ["point"] and set(points.model) == {"sam3"}


# --------------------------------------------------------------------------- issue 14


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    from terrasam.testing import random_checkpoint

    return random_checkpoint("sam-vit-b", tmp_path_factory.mktemp("tiny"), format="meta",
                             prompt_sensitive=True)


def test_cli_box_half_outside_is_clipped_and_segmented(scene, tmp_path, tiny_sam):
    # the box runs 100 m (200 px) past the raster's left and top edges
    x0, y0, x1, y1 = scene.polygons[1].bounds
    left, top = scene.transform @ (0, 0)
    out = tmp_path / "half.gpkg"
    result = CliRunner().invoke(main, [
        "prompt", str(scene.path), "-o", str(out), "--checkpoint", str(tiny_sam),
        "--box", f"{left - 100},{y0},{x1},{top + 100}", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "nodata" not in result.output and "outside" not in result.output
    gdf = gpd.read_file(out)
    assert len(gdf) == 1 and list(gdf.prompt_type) == ["box"]
    raster = shapely.box(*synth.pixel_to_crs(shapely.box(0, 0, SIZE, SIZE),
                                             scene.transform).bounds)
    assert raster.buffer(1e-6).contains(gdf.geometry.iloc[0]) and gdf.area_m2.iloc[0] > 0
    # the prompt column keeps the box as given, not clipped
    assert shapely.from_wkt(gdf.prompt.iloc[0]).bounds[0] == pytest.approx(left - 100)


def test_box_half_outside_with_the_oracle_is_the_object(scene):
    x0, y0, x1, y1 = scene.polygons[1].bounds
    left, _ = scene.transform @ (0, 0)
    messages = []
    oracle = OracleAdapter(background=scene.background, image_size=128)
    gdf = prompt(scene.path, boxes=[(left - 500, y0, x1, y1)], adapter=oracle,
                 warn=collect(messages))
    assert messages == [] and len(gdf) == 1
    assert iou(gdf.geometry.iloc[0], scene.polygons[1]) >= 0.99


def test_prompt_rows_carry_predicted_iou_and_stability_score(scene, tmp_path):
    oracle = OracleAdapter(background=scene.background, image_size=128, iou=0.91)
    out = tmp_path / "scores.gpkg"
    prompt(scene.path, out, points=[inside_point(scene, 1)], boxes=[scene.polygons[4].bounds],
           adapter=oracle)
    gdf = gpd.read_file(out)
    assert {"predicted_iou", "stability_score", "score"} <= set(gdf.columns)
    assert gdf.predicted_iou.tolist() == pytest.approx([0.91, 0.91])
    assert (gdf.predicted_iou == gdf.score).all()
    # the oracle's logits are +-20: the same mask at threshold -1 and +1
    assert gdf.stability_score.tolist() == [1.0, 1.0]


def test_stability_score_is_the_generators(scene):
    class SoftEdges(OracleAdapter):
        """Logits of 0.5 (inside at the threshold, outside at threshold + offset) on the
        first rows of the window: a mask whose stability is below 1."""

        def upscale(self, low, embedding):
            out = super().upscale(low, embedding).clone()
            out[..., :8, :] = 0.5
            self.last = out.numpy().copy()
            return out

    oracle = SoftEdges(background=scene.background, image_size=SIZE)
    gdf = prompt(scene.path, points=[inside_point(scene, 1)], adapter=oracle)
    logits = oracle.last[0]
    want = np.count_nonzero(logits > 1.0) / np.count_nonzero(logits > -1.0)
    assert 0 < want < 1
    assert gdf.stability_score.iloc[0] == pytest.approx(want)
