"""Progress of long jobs: a tqdm bar on a terminal, plain lines otherwise, nothing when quiet.

A tile job reports how far it is inside a tile with :func:`report` (the fraction of its
prompts decoded); the engine that runs it in this process routes that to its bar with
:func:`reporting`, so that the bar moves within a long tile. Elsewhere :func:`report` does
nothing.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

_hook = threading.local()


def report(fraction: float) -> None:
    """Tell the current bar that the running unit of work is ``fraction`` (0..1) done."""
    fn = getattr(_hook, "fn", None)
    if fn is not None:
        fn(fraction)


@contextlib.contextmanager
def reporting(progress):
    """Route :func:`report` calls in this thread to ``progress.partial`` (None: nowhere)."""
    old = getattr(_hook, "fn", None)
    _hook.fn = progress.partial if progress is not None else None
    try:
        yield
    finally:
        _hook.fn = old


def note(text: str, *, quiet: bool = False, stream=None) -> None:
    """One line about the phase a job is in (on a terminal too), unless quiet."""
    if not quiet:
        print(text, file=stream or sys.stderr, flush=True)


def about(seconds: float) -> str:
    """A duration in words for an estimate, rounded: ``about 40 s``, ``about 12 min``,
    ``about 2 h 5 min``."""
    seconds = max(float(seconds), 0.0)
    if seconds < 55:
        return f"about {max(5, 5 * round(seconds / 5))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"about {minutes} min"
    h, m = divmod(minutes, 60)
    return f"about {h} h" + (f" {m} min" if m else "")


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts units of work (tiles) with rate and ETA.

    ``initial`` counts work already done (resumed tiles) without crediting it to the rate.
    ``estimate``: print an estimate of the run from the first unit's reports (:meth:`partial`).
    Plain-line mode prints at most every ``every`` seconds or 10 % of the total, and at the end.
    """

    def __init__(self, total: int, desc: str = "tiles", *, quiet: bool = False,
                 initial: int = 0, stream=None, every: float = 10.0, estimate: bool = True):
        self.total, self.desc, self.quiet = total, desc, quiet
        initial = min(initial, total)
        self.n = initial
        self._initial = initial
        self._frac = 0.0  # how much of the running unit the bar already shows
        self._stream = stream or sys.stderr
        self._every = every
        self._start = time.monotonic()
        self._last_line = self._start
        self._last_n = initial
        self._bar = None
        self._unit_start = self._start  # when the running unit began (its first: the start)
        self._first_report = None  # (seconds into the unit, fraction) of its first report
        # the in-unit estimate is printed once, in the first unit (``estimate``: at all)
        self._estimated = not estimate
        if quiet:
            return
        if self._stream.isatty():
            from tqdm import tqdm

            # one decimal: the bar also moves by fractions of a unit (see report)
            fmt = ("{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} "
                   "[{elapsed}<{remaining}, {rate_fmt}]")
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=desc.rstrip("s"),
                             file=self._stream, dynamic_ncols=True, bar_format=fmt)
        elif initial:
            self._line(f"{desc}: {initial}/{total} already done, resuming")

    def _line(self, text: str) -> None:
        print(text, file=self._stream, flush=True)

    def rate(self) -> float:
        """Units per second over the work done in this run."""
        elapsed = time.monotonic() - self._start
        return (self.n - self._initial) / elapsed if elapsed > 0 else 0.0

    def partial(self, fraction: float) -> None:
        """Show the running unit as ``fraction`` done (a tty bar only; lines stay per unit).

        In the first unit of the run, the second report (the image embedded, two batches of
        prompts decoded) also gives the estimate line: the time to the first report (the
        embedding and one batch) plus the rest at the rate between the two reports.
        """
        fraction = min(max(float(fraction), 0.0), 0.99)
        if not self._estimated and self.n == self._initial and not self.quiet:
            self._estimate(time.monotonic() - self._unit_start, fraction)
        if self._bar is not None and fraction > self._frac:
            self._bar.update(fraction - self._frac)
            self._frac = fraction

    def _estimate(self, at: float, fraction: float) -> None:
        if self._first_report is None:
            self._first_report = (at, fraction)
            return
        t1, f1 = self._first_report
        if fraction <= f1:
            return
        unit = t1 + (1.0 - f1) * (at - t1) / (fraction - f1)
        left = self.total - self.n
        self._estimated = True
        text = (f"estimate: {about(unit * left)} for {left} {self.desc}"
                if left != 1 else f"estimate: {about(unit)} for 1 {self.desc.rstrip('s')}")
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            self._line(text)

    def update(self, n: int = 1) -> None:
        # never past the total: a unit counted as resumed and then run again counts once
        n = max(0, min(n, self.total - self.n))
        self.n += n
        self._unit_start = time.monotonic()
        self._estimated = True  # a finished unit gives the rate (and ETA) itself
        frac, self._frac = self._frac, 0.0
        if self.quiet or (n == 0 and not frac):
            return
        if self._bar is not None:
            self._bar.update(n - frac)
            return
        now = time.monotonic()
        step = max(1, self.total // 10)
        first = self.n - self._initial == n  # the first unit of this run gives the estimate
        if first or self.n >= self.total or now - self._last_line >= self._every \
                or self.n - self._last_n >= step:
            rate = self.rate()
            eta = (self.total - self.n) / rate if rate > 0 else 0.0
            self._line(f"{self.desc}: {self.n}/{self.total} ({rate:.2f} {self.desc}/s, "
                       f"elapsed {_clock(now - self._start)}, ETA {_clock(eta)})")
            self._last_line, self._last_n = now, self.n

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
