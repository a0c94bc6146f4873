"""The local engine: tiles run through one model in this process, results spilled to disk.

It runs any tile job (:mod:`terrasam.tiling`) from a picklable model reference: the next
tile to compute is read in a background thread while the current one runs through the model,
each finished tile is saved to the work directory (:mod:`terrasam.engines.workdir`), and
tiles already there are read back instead of computed.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from terrasam.engines.workdir import WorkDir
from terrasam.errors import TerrasamError
from terrasam.progress import reporting


class Timings:
    """Seconds spent in the model and waiting for reads and spills, and the job's profile."""

    def __init__(self, profile=None):
        self.model = 0.0
        self.read_wait = 0.0
        self.spill = 0.0
        self.tiles_run = 0
        self.tiles_resumed = 0
        self.profile = profile  # the job's TileProfile of the tiles computed in this run


def read_tile(reader, tile):
    """(rgb, valid) of a tile, read at its processing resolution; a read error (a corrupt
    block, a file cut short) becomes one sentence naming the file and the tile."""
    from rasterio.errors import RasterioError

    try:
        return tile.read(reader)
    except RasterioError as exc:
        text = str(exc).strip().splitlines()
        reason = text[0].rstrip(".") if text else type(exc).__name__
        raise TerrasamError(f"cannot read {tile.label} of {reader.path}: {reason}") from None


def run_tiles(tiles: Sequence, reader, job, model, *, workdir: WorkDir | None = None,
              progress=None, timings: Timings | None = None) -> Iterator[tuple]:
    """Yield ``(tile, records)`` for every tile, in order, from the work directory or computed.

    ``job`` is a tile job, ``model`` a :class:`~terrasam.models.ref.ModelRef`, loaded only if
    some tile has to be computed.
    """
    timings = timings if timings is not None else Timings()
    if timings.profile is None:
        timings.profile = job.new_profile()
    cached = {t.index for t in tiles if workdir is not None and workdir.has(t)}
    todo = [t for t in tiles if t.index not in cached]
    thread_reader = None
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
            pending[t.index] = pool.submit(read_tile, thread_reader, t)
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
            if records is None:  # to compute (or an unreadable spill file: again, here)
                fut = pending.pop(tile.index, None)
                t0 = time.perf_counter()
                rgb, valid = fut.result() if fut is not None else read_tile(reader, tile)
                timings.read_wait += time.perf_counter() - t0
                if pool is not None:
                    prefetch()
                if adapter is None:
                    adapter = model.load()
                t0 = time.perf_counter()
                with reporting(progress):  # the bar moves within the tile
                    records = job(adapter, rgb, valid, profile=timings.profile)
                timings.model += time.perf_counter() - t0
                timings.tiles_run += 1
                del rgb, valid
                if workdir is not None:
                    t0 = time.perf_counter()
                    workdir.save(tile, records)
                    timings.spill += time.perf_counter() - t0
                if progress is not None:  # resumed tiles are counted by the bar's start
                    progress.update(1)
            yield tile, records
    finally:
        if pool is not None:
            for fut in pending.values():
                if fut is not None:
                    fut.cancel()
            # Ctrl-C: queued reads are dropped; a read under way is one tile, soon done
            pool.shutdown(wait=True, cancel_futures=True)
            thread_reader.close()


class LocalEngine:
    """Runs tile jobs in this process (see :func:`run_tiles`)."""

    name = "local"

    def run(self, tiles, reader, job, model, *, workdir=None, progress=None, timings=None):
        return run_tiles(tiles, reader, job, model, workdir=workdir, progress=progress,
                         timings=timings)
