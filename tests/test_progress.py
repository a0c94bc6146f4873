"""Progress: the counter never passes the total; the bar moves within a unit of work."""

from __future__ import annotations

import io

import pytest

from terrasam.progress import Progress, report, reporting


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_resumed_units_run_again_never_pass_the_total():
    stream = io.StringIO()
    with Progress(20, "tiles", stream=stream, initial=25) as bar:
        for _ in range(20):
            bar.update()
    assert bar.n == 20
    lines = stream.getvalue().splitlines()
    assert lines[0] == "tiles: 20/20 already done, resuming"
    assert all(int(line.split()[1].split("/")[0]) <= 20 for line in lines)


def test_first_unit_prints_an_estimate_line():
    stream = io.StringIO()
    with Progress(50, "tiles", stream=stream, every=1e9) as bar:
        bar.update()
    assert stream.getvalue().startswith("tiles: 1/50 (") and "ETA" in stream.getvalue()


def test_reported_fractions_move_the_bar_within_a_unit():
    stream = _Tty()
    bar = Progress(2, "tiles", stream=stream)
    report(0.5)  # no bar routed: nothing happens
    with reporting(bar):
        report(0.5)
        assert bar._bar.n == 0.5 and bar.n == 0
        report(0.25)  # never backwards
        assert bar._bar.n == 0.5
    report(0.9)  # routing ended with the block
    assert bar._bar.n == 0.5
    bar.update()
    assert bar._bar.n == 1.0 and bar.n == 1
    bar.close()
    assert "1.0/2" in stream.getvalue()


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _run_first_unit(monkeypatch, total, quiet=False, tty=False):
    """Embedding + one batch by 30 s (10 % of the prompts), the next batch 10 s later."""
    import terrasam.progress as progress

    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    stream = _Tty() if tty else io.StringIO()
    bar = Progress(total, "tiles", stream=stream, quiet=quiet, every=1e9)
    with reporting(bar):
        clock.now = 30.0
        report(0.1)
        assert "estimate" not in stream.getvalue()  # one report gives no rate yet
        clock.now = 40.0
        report(0.2)
        lines = stream.getvalue().splitlines()
        clock.now = 120.0
        report(0.95)
    bar.update()
    bar.close()
    return lines, stream.getvalue().splitlines()


def test_the_first_tile_estimates_the_run_before_it_ends(monkeypatch):
    # a tile: 30 s + 90 % of the prompts at 10 s per 10 % = 120 s; 4 tiles = 8 min
    early, lines = _run_first_unit(monkeypatch, 4)
    assert early == ["estimate: about 8 min for 4 tiles"]
    assert lines[0] == early[0] and lines[1].startswith("tiles: 1/4 (")
    assert sum("estimate" in x for x in lines) == 1  # once


def test_a_one_tile_run_gets_its_estimate_too_and_quiet_none(monkeypatch):
    assert _run_first_unit(monkeypatch, 1)[0] == ["estimate: about 2 min for 1 tile"]
    assert _run_first_unit(monkeypatch, 1, quiet=True)[1] == []
    early, _ = _run_first_unit(monkeypatch, 30, tty=True)  # above the bar
    assert any(x.strip().endswith("estimate: about 1 h for 30 tiles") for x in early), early


def test_about_rounds_for_people():
    from terrasam.progress import about

    assert [about(s) for s in (0, 12, 41, 59, 89, 600, 3599, 3600, 7530)] == [
        "about 5 s", "about 10 s", "about 40 s", "about 1 min", "about 1 min",
        "about 10 min", "about 1 h", "about 1 h", "about 2 h 6 min"]


def test_segment_prints_the_estimate_within_the_first_tile(tmp_path, capsys, monkeypatch):
    # the oracle decodes 4 batches of 16 prompts per tile: the estimate line comes after the
    # plan and before the first tile's line, whatever the numbers
    import re

    from oracle import OracleAdapter
    from synth import make_scene
    from terrasam import api

    monkeypatch.setenv("TERRASAM_CACHE_DIR", str(tmp_path / "cache"))  # no earlier runs
    scene = make_scene(200, 120, path=tmp_path / "s.tif")
    api.segment(scene.path, tmp_path / "o.gpkg", adapter=OracleAdapter(), tile_size=128,
                overlap=32, points_per_side=8, points_per_batch=16)
    lines = capsys.readouterr().err.splitlines()
    plan = next(i for i, x in enumerate(lines) if "time estimate within the first tile" in x)
    est = [i for i, x in enumerate(lines) if x.startswith("estimate: ")]
    first = next(i for i, x in enumerate(lines) if x.startswith("tiles: 1/2 ("))
    assert len(est) == 1 and plan < est[0] < first, lines
    assert re.fullmatch(r"estimate: about \d+ (s|min) for 2 tiles", lines[est[0]]), lines
    api.segment(scene.path, tmp_path / "q.gpkg", adapter=OracleAdapter(), tile_size=128,
                overlap=32, points_per_side=8, points_per_batch=16, quiet=True)
    assert "estimate" not in capsys.readouterr().err


def test_earlier_runs_give_the_plan_line_its_estimate(tmp_path, capsys, monkeypatch):
    import json

    from oracle import OracleAdapter
    from synth import make_scene
    from terrasam import api, speed

    monkeypatch.setenv("TERRASAM_CACHE_DIR", str(tmp_path / "cache"))
    scene = make_scene(200, 120, path=tmp_path / "s.tif")
    args = dict(adapter=OracleAdapter(), tile_size=128, overlap=32, points_per_side=8,
                points_per_batch=16)
    api.segment(scene.path, tmp_path / "a.gpkg", **args)
    records = json.loads(speed.path().read_text())
    (name, seconds), = records.items()  # one record, of this model, device, tile and job
    assert seconds > 0 and '"model": "oracle"' in name and '"tile": [128, 120]' in name
    assert '"points_per_side": 8' in name
    capsys.readouterr()
    speed.path().write_text(json.dumps({name: 90.0}))  # 90 s a tile: 2 tiles, 3 min
    api.segment(scene.path, tmp_path / "b.gpkg", **args)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("; about 3 min for 2 tiles (earlier runs here)"), lines
    assert not any(x.startswith("estimate:") for x in lines)  # said already
    api.segment(scene.path, tmp_path / "c.gpkg", quiet=True, **args)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"k": "slow"}'])
def test_a_corrupt_or_unwritable_speed_file_is_ignored(tmp_path, capsys, monkeypatch, content):
    from oracle import OracleAdapter
    from synth import make_scene
    from terrasam import api, speed

    monkeypatch.setenv("TERRASAM_CACHE_DIR", str(tmp_path / "cache"))
    speed.path().parent.mkdir()
    speed.path().write_bytes(content)
    assert speed.lookup("k") is None
    scene = make_scene(200, 120, path=tmp_path / "s.tif")
    args = dict(adapter=OracleAdapter(), tile_size=128, overlap=32, points_per_side=8)
    api.segment(scene.path, tmp_path / "a.gpkg", **args)
    assert "time estimate within the first tile" in capsys.readouterr().err
    assert len(__import__("json").loads(speed.path().read_text())) == 1  # rewritten whole
    # a cache "folder" that is a file: nothing can be written there, not even by root
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("TERRASAM_CACHE_DIR", str(tmp_path / "file"))
    speed.record("other", 1.0)
    gdf = api.segment(scene.path, tmp_path / "b.gpkg", **args)
    assert len(gdf) and (tmp_path / "b.gpkg").exists()
    assert (tmp_path / "file").read_text() == "x"
