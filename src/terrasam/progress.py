"""Progress of long jobs: a tqdm bar on a terminal, plain lines otherwise, nothing when quiet."""

from __future__ import annotations

import sys
import time


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
        self.n = initial
        self._initial = initial
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

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="tile",
                             file=self._stream, dynamic_ncols=True)
        elif initial:
            self._line(f"{desc}: {initial}/{total} already done, resuming")

    def _line(self, text: str) -> None:
        print(text, file=self._stream, flush=True)

    def rate(self) -> float:
        """Units per second over the work done in this run."""
        elapsed = time.monotonic() - self._start
        return (self.n - self._initial) / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        step = max(1, self.total // 10)
        if self.n >= self.total or now - self._last_line >= self._every \
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
