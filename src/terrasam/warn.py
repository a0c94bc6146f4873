"""One handler for every warning a command shows.

terrasam's own warnings and those of GDAL and libtiff (rasterio's log records, pyogrio's
RuntimeWarnings, rasterio's Python warnings) are shown as ``terrasam: warning: ...``, each
distinct message once per command. ``--quiet`` silences GDAL's (terrasam's own warnings are
about the result and stay). Other Python warnings are shown as Python shows them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from pathlib import Path

__all__ = ["routed", "set_quiet", "WarningRouter"]

_PACKAGE = Path(__file__).resolve().parent
_LIBRARY_LOGGERS = ("rasterio", "pyogrio")
_LIBRARY_MODULES = ("rasterio", "pyogrio")
_CPLE = re.compile(r"^CPLE_\w+ in ")  # rasterio's prefix: "CPLE_AppDefined in MESSAGE"
_FILE = re.compile(r"^[^\s:]+\.\w+: (?=\w+:)")  # libtiff's "name.tif: TIFFReadDirectory:..."

_current: WarningRouter | None = None


def _library_path(filename: str) -> bool:
    parts = Path(filename).parts
    return any(m in parts for m in _LIBRARY_MODULES)


def _ours(filename: str) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        return False


class WarningRouter:
    """Shows each distinct warning once through ``echo`` (default: stderr)."""

    def __init__(self, echo=None, quiet: bool = False):
        self.echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self.quiet = quiet
        self._seen: set[str] = set()

    def show(self, message: str, library: bool = False) -> None:
        """Show ``message`` unless it was shown already (or it is GDAL's and quiet is set)."""
        text = " ".join(str(message).split())
        if library:
            text = _CPLE.sub("", text)
        key = _FILE.sub("", text)
        if not text or key in self._seen or (library and self.quiet):
            return
        self._seen.add(key)
        self.echo(f"terrasam: warning: {text}")

    def showwarning(self, message, category, filename, lineno, file=None, line=None):
        """A ``warnings.showwarning`` that routes terrasam's and the GIS libraries' warnings."""
        if _ours(filename) and issubclass(category, UserWarning):
            self.show(str(message))
        elif _library_path(filename) or category.__module__.split(".")[0] in _LIBRARY_MODULES:
            self.show(str(message), library=True)
        else:
            _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


_PYTHON_SHOWWARNING = warnings.showwarning


class _LogHandler(logging.Handler):
    """GDAL's warnings as rasterio and pyogrio log them. Errors are left out: the exception
    that follows them carries the cause and becomes terrasam's one-line error."""

    def __init__(self, router: WarningRouter):
        super().__init__(logging.WARNING)
        self.router = router

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING:
            with contextlib.suppress(Exception):
                self.router.show(record.getMessage(), library=True)


@contextlib.contextmanager
def routed(echo=None, quiet: bool = False):
    """Route warnings through one :class:`WarningRouter` while the block runs."""
    global _current
    router = WarningRouter(echo, quiet)
    handler = _LogHandler(router)
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    saved = [(lg.propagate, lg.level) for lg in loggers]
    previous = _current
    with warnings.catch_warnings():
        warnings.showwarning = router.showwarning
        for lg in loggers:
            lg.addHandler(handler)
            lg.propagate = False  # not also through logging's last-resort stderr handler
            if lg.level == logging.NOTSET or lg.level > logging.WARNING:
                lg.setLevel(logging.WARNING)
        _current = router
        try:
            yield router
        finally:
            _current = previous
            for lg, (propagate, level) in zip(loggers, saved):
                lg.removeHandler(handler)
                lg.propagate, lg.level = propagate, level


def set_quiet(quiet: bool = True) -> None:
    """Silence GDAL's warnings in the command running now (its ``--quiet``)."""
    if _current is not None:
        _current.quiet = bool(quiet)
