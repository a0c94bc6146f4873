"""Ctrl-C (SIGINT) through the real command line: answered within two seconds in every phase,
one message, exit 130, nothing partial left beside the output, and a rerun resumes to the
same result as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import pytest
import shapely

import synth

TESTS = Path(__file__).resolve().parent
MESSAGE = "terrasam: interrupted: run the same command to resume"
CLI_FAST = ["--tile-size", "128", "--overlap", "32", "--points-per-side", "8", "--scale", "none"]
SHAPES = [synth.rect(20, 20, 60, 70), synth.rect(150, 160, 200, 230), synth.rect(250, 30, 300, 90),
          synth.rect(330, 300, 380, 370)]

# the CLI with the oracle as model; MODE slows one phase down and touches MARK when it is in it:
# "tiles": every tile takes 0.4 s (Python code, interruptible at once); "stitch" / "write":
# one long GEOS call (native code that holds Python's signal handling back until it returns)
WRAPPER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from oracle import OracleAdapter
from terrasam.models.ref import ModelRef
import terrasam.cli
oracle = OracleAdapter(background={background!r})
ModelRef.for_run = classmethod(lambda cls, *a, **k: cls.of(oracle))
mode, mark = sys.argv[1], Path(sys.argv[2])


def long_native_call():
    import numpy as np, shapely
    rng = np.random.default_rng(0)
    discs = shapely.buffer(shapely.points(rng.random((60000, 2)) * 1000), 3, quad_segs=4)
    mark.touch()
    shapely.union_all(discs)  # some 10 s in GEOS, the GIL released


if mode == "tiles":
    embed = OracleAdapter.embed
    def slow_embed(self, image):
        mark.touch()
        time.sleep(0.4)
        return embed(self, image)
    OracleAdapter.embed = slow_embed
elif mode == "stitch":
    from terrasam.stitch import Stitcher
    finish = Stitcher.finish
    def slow_finish(self, *args, **kwargs):
        long_native_call()
        return finish(self, *args, **kwargs)
    Stitcher.finish = slow_finish
elif mode == "write":
    from terrasam import io
    write = io.VectorWriter.write
    def slow_write(self, gdf):
        write(self, gdf)
        io.temp_name(self.out).write_text("partial")  # a temporary the forced exit must remove
        long_native_call()
    io.VectorWriter.write = slow_write
terrasam.cli.main(sys.argv[3:], prog_name="terrasam")
"""


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("interrupt")
    return synth.make_scene(400, 400, shapes=SHAPES, path=d / "in.tif")


def start(tmp_path, scene, mode, *args) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "wrap.py"
    script.write_text(WRAPPER.format(tests=str(TESTS), background=tuple(scene.background)))
    mark = tmp_path / "mark"
    mark.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen([sys.executable, str(script), mode, str(mark), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    return proc, mark


def interrupt(proc: subprocess.Popen, mark: Path, after: float = 0.0) -> tuple[float, str]:
    """SIGINT once MARK exists (+ ``after`` s); (seconds until the process ended, stderr)."""
    t0 = time.monotonic()
    while not mark.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() - t0 < 240, "the phase to interrupt was never reached"
        time.sleep(0.02)
    time.sleep(after)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return time.monotonic() - sent, err


def segment_args(out: Path, scene, workdir: Path) -> list:
    return ["segment", scene.path, "-o", out, "--workdir", workdir, *CLI_FAST, "-q"]


def test_ctrl_c_between_tiles_then_rerun_resumes_to_the_same_objects(tmp_path, scene):
    out, work = tmp_path / "objects.gpkg", tmp_path / "work"
    proc, mark = start(tmp_path, scene, "tiles", *segment_args(out, scene, work))
    # a few tiles in: 16 tiles of 0.4 s each, interrupted after about 5 of them
    waited, err = interrupt(proc, mark, after=2.0)
    assert proc.returncode == 130, err
    assert waited < 2.0
    assert err.strip().splitlines()[-1] == MESSAGE and err.count(MESSAGE) == 1
    assert "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mark", "work", "wrap.py"]
    done_before = len(list(work.rglob("*.npz")))
    assert done_before >= 1  # finished tiles are kept for the rerun

    # the rerun (no slowdown) resumes, and gives what an uninterrupted run gives
    proc, _ = start(tmp_path, scene, "none", *segment_args(out, scene, work)[:-1])
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "done before" in err
    fresh_out = tmp_path / "fresh" / "objects.gpkg"
    fresh_out.parent.mkdir()
    proc, _ = start(tmp_path, scene, "none", *segment_args(fresh_out, scene, tmp_path / "w2"))
    assert proc.wait(timeout=240) == 0
    a, b = gpd.read_file(out), gpd.read_file(fresh_out)
    assert len(a) == len(b) >= len(SHAPES)
    assert all(shapely.equals(x, y) for x, y in zip(a.geometry, b.geometry))
    assert list(a["id"]) == list(b["id"])


@pytest.mark.parametrize("phase", ["stitch", "write"])
def test_ctrl_c_inside_a_long_native_call_is_answered_within_two_seconds(tmp_path, scene, phase):
    out, work = tmp_path / "objects.gpkg", tmp_path / "work"
    proc, mark = start(tmp_path, scene, phase, *segment_args(out, scene, work))
    waited, err = interrupt(proc, mark, after=0.3)
    assert proc.returncode == 130, err
    assert waited < 2.5  # 1.5 s of grace for the main thread, then the forced exit
    assert err.strip().splitlines()[-1] == MESSAGE and err.count(MESSAGE) == 1
    assert not out.exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["mark", "work", "wrap.py"], left  # no staging file, no temporary
    assert any(work.rglob("*.npz"))  # every tile was finished: the rerun only stitches


def test_the_message_is_said_once_per_run_in_a_long_lived_process(capsys):
    from terrasam import interrupt

    for _ in range(2):  # two runs in one process (the API, a test runner)
        with interrupt.answered(MESSAGE):
            pass
        interrupt.say_once(MESSAGE)
        interrupt.say_once(MESSAGE)  # the CLI and the watcher racing: still once
    assert capsys.readouterr().err == f"{MESSAGE}\n{MESSAGE}\n"
