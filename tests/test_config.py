"""Config files: the [amg] table from TOML and YAML, with one-sentence errors."""

from __future__ import annotations

import pytest

from terrasam.config import amg_params, load_config
from terrasam.errors import TerrasamError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_amg_table(tmp_path):
    path = write(tmp_path, "opts.toml", """
[amg]
points_per_side = 48
pred-iou-thresh = 0.86
crop_n_layers = 1
fast = true

[segment]
tile_size = 512
""")
    cfg = load_config(path)
    assert cfg["amg"] == {"points_per_side": 48, "pred_iou_thresh": 0.86, "crop_n_layers": 1,
                          "fast": True}
    assert cfg["segment"] == {"tile_size": 512}
    p = amg_params("sam2", path, box_nms_thresh=0.5, stability_score_thresh=None)
    assert (p.points_per_side, p.pred_iou_thresh, p.crop_n_layers, p.box_nms_thresh) == \
        (48, 0.86, 1, 0.5)
    assert p.stability_score_thresh == 0.95 and p.pruning
    # the family default applies when the file does not set the option
    assert amg_params("sam2", write(tmp_path, "b.toml", "[amg]\ncrop_n_layers = 1\n")) \
        .pred_iou_thresh == 0.8


def test_yaml_amg_table_with_point_grids(tmp_path):
    path = write(tmp_path, "opts.yaml", """
amg:
  point_grids:
    - [[0.25, 0.25], [0.75, 0.75]]
  min_mask_region_area: 100
  use_m2m: true
""")
    p = amg_params("sam2", load_config(path))
    assert p.points_per_side is None and p.use_m2m and p.min_mask_region_area == 100
    assert p.layer_grids()[0].tolist() == [[0.25, 0.25], [0.75, 0.75]]
    assert load_config(write(tmp_path, "empty.yml", "")) == {}


@pytest.mark.parametrize("name, text, message", [
    ("a.toml", "[amg]\npoints_per_sid = 4\n",
     "config file a.toml: unknown [amg] option 'points_per_sid'; did you mean 'points_per_side'"),
    ("b.toml", "[amg]\npred_iou_thresh = 1.5\n",
     "config file b.toml: [amg] pred_iou_thresh must be between 0 and 1, not 1.5"),
    ("c.yaml", "amg:\n  points_per_side: 12.5\n",
     "config file c.yaml: [amg] points_per_side must be an integer >= 1, not 12.5"),
    ("d.yaml", "amg:\n  use_m2m: maybe\n", "config file d.yaml: [amg] use_m2m must be true or false"),
    ("e.yaml", "amg: 3\n", "config file e.yaml: [amg] must be a table of options"),
    ("f.yaml", "- 1\n- 2\n", "must hold tables of options, not a list"),
    ("g.toml", "[amg\n", "is not valid TOML"),
    ("h.yaml", "amg: [1, 2\n", "is not valid YAML"),
    ("i.json", "{}", "must end in .toml, .yaml or .yml"),
])
def test_config_errors_are_one_sentence(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    with pytest.raises(TerrasamError) as err:
        load_config(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(TerrasamError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
