"""The work directory: each finished tile's records on disk, so that a killed run resumes.

``WORKDIR/tile_NNNNNN.npz`` holds one tile's records in the spill format of
:mod:`terrasam.tiling` (masks packed to bits); ``manifest.json`` holds a hash of everything
that decides a tile's result (input, bands, scaling, grid, model, the job). Re-running the
same command after a kill reuses those files; a run with different parameters finds another
hash and starts the directory afresh. Every engine uses the same directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from terrasam.errors import TerrasamError
from terrasam.tiling import pack_records, unpack_records

MANIFEST = "manifest.json"


def run_key(params: dict) -> str:
    """A stable hash of the parameters that decide every tile's result."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def save_records(path: Path, tile, records: Sequence) -> None:
    """Write a tile's mask records atomically as one small .npz."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        np.savez(fh, **pack_records(tile, records))
    os.replace(tmp, path)


# what a truncated, garbled or foreign spill file raises on load
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, IndexError, TypeError, struct.error,
               zlib.error, zipfile.BadZipFile)


def load_records(path: Path, tile) -> list | None:
    """The records saved for ``tile``, or None when the file is unreadable or for another tile."""
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        return unpack_records(data, tile)
    except _UNREADABLE:
        return None


def _warn_changed(path: Path, old: dict, new: dict) -> None:
    """Warn that a work directory from a run with other parameters is being started afresh."""
    new = json.loads(json.dumps(new, default=str))
    changed = set()
    for k in set(old) | set(new):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):  # the job's settings: name the knob
            changed.update(j for j in set(a) | set(b) if a.get(j) != b.get(j))
        elif a != b:
            changed.add(k)
    changed = sorted(changed)
    what = f" (changed: {', '.join(changed)})" if changed else ""
    warnings.warn(f"work directory {str(path)!r} is from a run with other parameters{what}; "
                  "starting afresh", UserWarning, stacklevel=3)


class WorkDir:
    """Spilled tile results of one run, reusable by the same run after a kill."""

    def __init__(self, path, params: dict):
        self.path = Path(path)
        self.key = run_key(params)
        manifest = self.path / MANIFEST
        if self.path.exists():
            if not self.path.is_dir():
                raise TerrasamError(f"work directory {str(self.path)!r} exists and is a file")
            ours = manifest.exists() or not any(self.path.iterdir())
            if not ours:
                raise TerrasamError(
                    f"work directory {str(self.path)!r} exists and is not a terrasam work "
                    "directory; remove it or choose another with --workdir")
            old = self._read_manifest()
            if old.get("key") != self.key:
                self._clear()  # another run's tiles: never reuse them
                if old:
                    _warn_changed(self.path, old.get("params") or {}, params)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not manifest.exists():
                tmp = manifest.with_name(MANIFEST + ".part")
                tmp.write_text(json.dumps({"key": self.key, "params": params}, indent=1,
                                          sort_keys=True, default=str))
                os.replace(tmp, manifest)
        except OSError as exc:
            raise TerrasamError(
                f"cannot write the work directory {str(self.path)!r} ({exc.strerror})") from None

    def _read_manifest(self) -> dict:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}

    def _clear(self) -> None:
        for f in self.path.iterdir():
            if f.name == MANIFEST or f.name.startswith("tile_"):
                f.unlink()

    def tile_path(self, tile) -> Path:
        return self.path / f"tile_{tile.index:06d}.npz"

    def has(self, tile) -> bool:
        """Whether a result file exists for ``tile`` (it may still turn out unreadable)."""
        return self.tile_path(tile).exists()

    def load(self, tile) -> list | None:
        """The saved records of ``tile``; None when there are none. An unreadable file
        (truncated by a kill, garbled) is removed with a warning: the caller recomputes."""
        p = self.tile_path(tile)
        if not p.exists():
            return None
        records = load_records(p, tile)
        if records is None:
            warnings.warn(f"work directory tile {tile.index} was unreadable; recomputing it",
                          UserWarning, stacklevel=2)
            with contextlib.suppress(OSError):
                p.unlink()
        return records

    def save(self, tile, records) -> None:
        from terrasam.io import write_failure

        path = self.tile_path(tile)
        try:
            save_records(path, tile, records)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.with_name(path.name + ".part").unlink()
            raise write_failure(path, exc) from None

    def remove(self) -> None:
        if (self.path / MANIFEST).exists():
            shutil.rmtree(self.path, ignore_errors=True)

    def remove_unused(self) -> None:
        """Remove the directory if it holds no finished tile (nothing to resume from)."""
        if not any(f.name.startswith("tile_") for f in self.path.glob("tile_*")):
            self.remove()
