"""The local engine: one model in this process, tiles streamed through it, results spilled.

Each finished tile's mask records go to ``WORKDIR/tile_NNNNNN.npz`` (masks packed to bits), and
``manifest.json`` holds a hash of everything that decides a tile's result (input, bands, scaling,
grid, model, AMG parameters). Re-running the same command after a kill reuses those files; a
run with different parameters finds a different hash and starts the work directory afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from terrasam.errors import TerrasamError

MANIFEST = "manifest.json"
SPILL_VERSION = 1


def run_key(params: dict) -> str:
    """A stable hash of the parameters that decide every tile's result."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def save_records(path: Path, tile, records: Sequence) -> None:
    """Write a tile's mask records atomically as one small .npz (masks packed to bits)."""
    n = len(records)
    bits = [np.packbits(np.asarray(r.mask, bool).ravel()) for r in records]
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in bits])
    arrays = {
        "version": np.array(SPILL_VERSION),
        "tile": np.array([tile.x0, tile.y0, tile.width, tile.height], np.int64),
        "bbox": np.array([r.bbox for r in records], np.int64).reshape(n, 4),
        "area": np.array([r.area for r in records], np.int64),
        "predicted_iou": np.array([r.predicted_iou for r in records], np.float64),
        "stability_score": np.array([r.stability_score for r in records], np.float64),
        "point": np.array([r.point for r in records], np.float64).reshape(n, 2),
        "crop_box": np.array([r.crop_box for r in records], np.int64).reshape(n, 4),
        "bits": np.concatenate(bits) if bits else np.zeros(0, np.uint8),
        "offsets": offsets,
    }
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def load_records(path: Path, tile) -> list | None:
    """The records saved for ``tile``, or None when the file is unreadable or for another tile."""
    from terrasam.amg import MaskRecord

    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError):
        return None
    if (int(data.get("version", -1)) != SPILL_VERSION
            or data["tile"].tolist() != [tile.x0, tile.y0, tile.width, tile.height]):
        return None
    out = []
    for i, (x0, y0, x1, y1) in enumerate(data["bbox"].tolist()):
        h, w = y1 - y0, x1 - x0
        raw = data["bits"][data["offsets"][i]:data["offsets"][i + 1]]
        mask = np.unpackbits(raw, count=h * w).astype(bool).reshape(h, w)
        out.append(MaskRecord(
            mask=mask, bbox=(x0, y0, x1, y1), area=int(data["area"][i]),
            predicted_iou=float(data["predicted_iou"][i]),
            stability_score=float(data["stability_score"][i]),
            point=tuple(float(v) for v in data["point"][i]),
            crop_box=tuple(int(v) for v in data["crop_box"][i])))
    return out


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

    def load(self, tile) -> list | None:
        p = self.tile_path(tile)
        return load_records(p, tile) if p.exists() else None

    def save(self, tile, records) -> None:
        save_records(self.tile_path(tile), tile, records)

    def remove(self) -> None:
        if (self.path / MANIFEST).exists():
            shutil.rmtree(self.path, ignore_errors=True)


class Timings:
    """Seconds spent in the model (AMG on a tile) and waiting for reads, for the summary."""

    def __init__(self):
        self.model = 0.0
        self.read_wait = 0.0
        self.spill = 0.0
        self.tiles_run = 0
        self.tiles_resumed = 0
        self.amg = None  # AMGProfile of the tiles computed in this run


def _read_tile(reader, tile):
    return reader.read(Window(*tile.window), out_shape=(tile.height, tile.width))


def run_tiles(tiles: Sequence, reader, get_adapter: Callable, params, *,
              workdir: WorkDir | None = None, progress=None,
              timings: Timings | None = None) -> Iterator[tuple]:
    """Yield ``(tile, records)`` for every tile, in order, from the work directory or computed.

    The next tile to compute is read in a background thread while the current one runs through
    the model. ``get_adapter`` is called once, only if some tile has to be computed.
    """
    from terrasam import amg

    timings = timings or Timings()
    if timings.amg is None:
        timings.amg = amg.AMGProfile()
    cached = {}
    if workdir is not None:
        for t in tiles:
            if workdir.tile_path(t).exists():
                cached[t.index] = True
    todo = [t for t in tiles if t.index not in cached]
    if todo:
        # the prefetch thread gets its own reader (one per thread); the scaling travels with it
        _ = reader.scaling
        thread_reader = pickle.loads(pickle.dumps(reader))
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="terrasam-read") if todo else None
    pending: dict[int, object] = {}
    next_todo = 0
    adapter = None

    def prefetch():
        nonlocal next_todo
        while next_todo < len(todo) and len(pending) < 2:
            t = todo[next_todo]
            pending[t.index] = pool.submit(_read_tile, thread_reader, t)
            next_todo += 1

    try:
        if pool is not None:
            prefetch()
        for tile in tiles:
            records = None
            if tile.index in cached:
                records = workdir.load(tile)
                if records is not None:
                    timings.tiles_resumed += 1
                else:  # unreadable spill: compute it again, in this thread
                    pending[tile.index] = None
            if records is None:
                fut = pending.pop(tile.index, None)
                t0 = time.perf_counter()
                rgb, valid = fut.result() if fut is not None else _read_tile(reader, tile)
                timings.read_wait += time.perf_counter() - t0
                if pool is not None:
                    prefetch()
                if adapter is None:
                    adapter = get_adapter()
                t0 = time.perf_counter()
                records = amg.generate(adapter, rgb, params, valid=valid, profile=timings.amg)
                timings.model += time.perf_counter() - t0
                timings.tiles_run += 1
                del rgb, valid
                if workdir is not None:
                    t0 = time.perf_counter()
                    workdir.save(tile, records)
                    timings.spill += time.perf_counter() - t0
            if progress is not None:
                progress.update(1)
            yield tile, records
    finally:
        if pool is not None:
            for fut in pending.values():
                if fut is not None:
                    fut.cancel()
            pool.shutdown(wait=True)
            thread_reader.close()
