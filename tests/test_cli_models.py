"""`terrasam models`: the table, --json, and cache detection (offline, temp HF_HOME)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from terrasam.cli import main
from terrasam.models.registry import DEFAULT_MODEL, MODELS


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


def _cache(hub, repo, files=("config.json", "model.safetensors")):
    root = hub / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("a" * 40)
    snap = root / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for name in files:
        (snap / name).write_text("{}")


def test_table_lists_every_model(hub):
    _cache(hub, "facebook/sam-vit-base")
    _cache(hub, "facebook/sam-vit-large", files=("config.json",))  # no weights: not cached
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    for model_id in MODELS:
        assert model_id in lines
    assert lines[DEFAULT_MODEL].split()[1] == "*"
    assert lines["sam-vit-b"].rstrip().endswith("yes")
    assert lines["sam-vit-l"].rstrip().endswith("no")
    assert "sam_vit_h_4b8939.pth" in lines["sam-vit-h"] and "641.1M" in lines["sam-vit-h"]
    assert "(gated)" in lines["sam3"]
    assert str(hub) in result.output


def test_json_output(hub):
    _cache(hub, "facebook/sam-vit-base")
    result = CliRunner().invoke(main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["id"] for r in rows] == list(MODELS)
    assert [r["id"] for r in rows if r["default"]] == [DEFAULT_MODEL]
    assert [r["id"] for r in rows if r["cached"]] == ["sam-vit-b"]
    by_id = {r["id"]: r for r in rows}
    assert by_id["sam-vit-b"]["params_m"] == pytest.approx(93.7)
    assert by_id["sam-hq-vit-b"]["input_size"] == 1024 and by_id["sam3"]["input_size"] == 1008


def test_command_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, terrasam.cli.models; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
