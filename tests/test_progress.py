"""Progress: the counter never passes the total; the bar moves within a unit of work."""

from __future__ import annotations

import io

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
