"""Seconds per tile remembered from earlier runs on this machine, for the plan line's estimate.

One small JSON file in terrasam's cache folder (``$TERRASAM_CACHE_DIR``, else
``$XDG_CACHE_HOME/terrasam`` or ``~/.cache/terrasam``): ``{key: seconds per tile}``, the key
naming everything that decides a tile's time (model, device, dtype, backend, tile size and the
tile job's settings, e.g. the points per side). It is written atomically at the end of a
successful run; a file that cannot be read or written is ignored: it never breaks a run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

FILE = "tile_speed.json"
MAX_KEYS = 200  # the oldest records go first


def path() -> Path:
    """The speed file."""
    root = os.environ.get("TERRASAM_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "terrasam"
    return Path(root) / FILE


def key(adapter, tile_shape, job) -> str:
    """What decides a tile's time, as one string."""
    parts = {"model": getattr(adapter, "model_id", None), "device": str(adapter.device),
             "dtype": str(adapter.dtype), "backend": getattr(adapter, "backend", None),
             "tile": list(tile_shape), "job": job.describe()}
    return json.dumps(parts, sort_keys=True, default=str)


def _read() -> dict:
    try:
        data = json.loads(path().read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items() if _usable(v)}  # anything else is dropped


def _usable(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value > 0


def lookup(name: str) -> float | None:
    """Seconds per tile recorded for ``name``; None without a usable record."""
    return _read().get(name)


def record(name: str, seconds_per_tile: float) -> None:
    """Remember ``seconds_per_tile`` for ``name`` (atomically; errors are ignored)."""
    if not (math.isfinite(seconds_per_tile) and seconds_per_tile > 0):
        return
    data = _read()
    data.pop(name, None)
    data[name] = float(seconds_per_tile)
    for old in list(data)[:-MAX_KEYS]:
        del data[old]
    target = path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tile_speed.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass
