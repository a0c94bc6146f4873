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


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts units of work (tiles) with rate and ETA.

    ``initial`` counts work already done (resumed tiles) without crediting it to the rate.
    Plain-line mode prints at most every ``every`` seconds or 10 % of the total, and at the end.
    """

    def __init__(self, total: int, desc: str = "tiles", *, quiet: bool = False,
                 initial: int = 0, stream=None, every: float = 10.0):
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
        """Show the running unit as ``fraction`` done (a tty bar only; lines stay per unit)."""
        fraction = min(max(float(fraction), 0.0), 0.99)
        if self._bar is not None and fraction > self._frac:
            self._bar.update(fraction - self._frac)
            self._frac = fraction

    def update(self, n: int = 1) -> None:
        # never past the total: a unit counted as resumed and then run again counts once
        n = max(0, min(n, self.total - self.n))
        self.n += n
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
