"""The Dask engine: the same tile jobs on a ``dask.distributed`` cluster.

The client sends each worker the tile job, the model reference and the raster reader (path,
bands, scaling: a few hundred bytes); workers read their own windows (the raster path must be
reachable from them: a shared or network path, ``/vsis3/``, ``/vsicurl/``, an ``https://``
COG), load the model once per process (:meth:`ModelRef.load` keeps it), run the job and send
back the tile's records packed to bits. The client keeps a bounded number of tiles in flight,
spills each result to the same work directory as the local engine, and yields tiles in tile
order, so stitching and writing stream as with the local engine and memory stays flat.

A worker that dies loses only its running tiles: the scheduler runs them again elsewhere and
the output is the same as an uninterrupted run. A killed client resumes from the work
directory. A tile that raises ends the run with one sentence naming the tile and the cause.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Iterator, Sequence

from terrasam.errors import TerrasamError
from terrasam.tiling import pack_records, unpack_records

INSTALL_HINT = 'the Dask engine needs dask.distributed: pip install "terrasam[dask]"'
_local = threading.local()  # per worker thread: the raster readers it opened


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise TerrasamError(INSTALL_HINT) from None
    return distributed


def _worker_reader(blob: bytes):
    """The worker thread's reader for a pickled RasterReader (opened once per thread)."""
    cache = getattr(_local, "readers", None)
    if cache is None:
        cache = _local.readers = {}
    reader = cache.get(blob)
    if reader is None:
        for old in cache.values():
            old.close()
        cache.clear()
        reader = cache[blob] = pickle.loads(blob)
    return reader


def run_tile(reader_blob: bytes, tile, job, model):
    """One tile on a worker: read, run the job, return (packed records, profile, seconds)."""
    reader = _worker_reader(reader_blob)
    adapter = model.load()
    rgb, valid = tile.read(reader)
    profile = job.new_profile()
    t0 = time.perf_counter()
    records = job(adapter, rgb, valid, profile=profile)
    return pack_records(tile, records), profile, time.perf_counter() - t0


def _portable(reader):
    """A copy of the reader whose local path is absolute (workers may have another cwd)."""
    import copy

    path = str(reader.path)
    if path.startswith("/vsi") or "://" in path or os.path.isabs(path):
        return reader
    other = copy.copy(reader)
    other.path = os.path.abspath(path)
    return other


class DaskEngine:
    """Runs tile jobs on a Dask cluster.

    client: a ``distributed.Client`` (yours; not closed here). scheduler: the address of a
    running scheduler (``tcp://host:8786``). Neither: a ``LocalCluster`` of ``workers``
    processes with ``threads_per_worker`` threads, started on first use and closed by
    :meth:`close`. max_in_flight: tiles submitted and not yet handed on (default: twice the
    cluster's threads, at least 2).
    """

    name = "dask"

    def __init__(self, client=None, scheduler: str | None = None, workers: int | None = None,
                 threads_per_worker: int = 1, max_in_flight: int | None = None):
        _import_distributed()
        self._client = client
        self.scheduler = scheduler
        self.workers = workers
        self.threads_per_worker = int(threads_per_worker)
        self.max_in_flight = max_in_flight
        self._owned: list = []  # cluster/client started here

    @property
    def client(self):
        if self._client is None:
            distributed = _import_distributed()
            if self.scheduler:
                try:
                    self._client = distributed.Client(self.scheduler, timeout="20s")
                except (OSError, TimeoutError) as exc:
                    raise TerrasamError(f"cannot reach the Dask scheduler at {self.scheduler} "
                                        f"({exc})") from None
            else:
                n = self.workers or max(1, (os.cpu_count() or 1) // self.threads_per_worker)
                cluster = distributed.LocalCluster(
                    n_workers=n, threads_per_worker=self.threads_per_worker, processes=True,
                    host="127.0.0.1", dashboard_address=None)
                self._client = distributed.Client(cluster)
                self._owned.append(cluster)
            self._owned.insert(0, self._client)
        return self._client

    def close(self) -> None:
        """Close the client and cluster this engine started (never one given to it)."""
        for thing in self._owned:
            try:
                thing.close()
            except Exception:  # closing a cluster that is already down
                pass
        if self._owned:
            self._client = None
        self._owned = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _slots(self) -> int:
        if self.max_in_flight:
            return max(1, int(self.max_in_flight))
        threads = sum(self.client.nthreads().values()) or 1
        return max(2, 2 * threads)

    def run(self, tiles: Sequence, reader, job, model, *, workdir=None, progress=None,
            timings=None) -> Iterator[tuple]:
        """Yield ``(tile, records)`` for every tile in order (see the module docstring)."""
        from terrasam.engines.local import Timings

        distributed = _import_distributed()
        timings = timings if timings is not None else Timings()
        if timings.profile is None:
            timings.profile = job.new_profile()
        pickle.dumps(model)  # a reference to a model loaded here says so in one sentence
        _ = reader.scaling  # computed once here, travels with the reader
        blob = pickle.dumps(_portable(reader))
        cached = {t.index for t in tiles if workdir is not None and workdir.has(t)}
        todo = [t for t in tiles if t.index not in cached]
        client = self.client if todo else None
        slots = self._slots() if todo else 0
        futures: dict[int, object] = {}  # submitted, not yet handed on: at most ``slots``
        next_todo = 0

        def submit(t):
            return client.submit(run_tile, blob, t, job, model, pure=False,
                                 key=f"terrasam-tile-{t.index}-{os.urandom(4).hex()}")

        def submit_more():
            nonlocal next_todo
            while next_todo < len(todo) and len(futures) < slots:
                futures[todo[next_todo].index] = submit(todo[next_todo])
                next_todo += 1

        try:
            submit_more()
            for tile in tiles:
                records = None
                if tile.index in cached:
                    records = workdir.load(tile)
                    if records is not None:
                        timings.tiles_resumed += 1
                    else:  # unreadable spill file: compute it again
                        client = client or self.client
                        futures[tile.index] = submit(tile)
                if records is None:
                    fut = futures[tile.index]
                    t0 = time.perf_counter()
                    try:
                        packed, profile, seconds = fut.result()
                    except distributed.CancelledError:
                        raise TerrasamError(
                            f"the Dask cluster cancelled tile {tile.index}; is it shutting "
                            "down?") from None
                    except Exception as exc:
                        raise TerrasamError(_tile_failure(tile, exc)) from exc
                    timings.read_wait += time.perf_counter() - t0
                    del futures[tile.index]
                    records = unpack_records(packed, tile)
                    timings.model += seconds
                    timings.profile.merge(profile)
                    timings.tiles_run += 1
                    if workdir is not None:
                        t0 = time.perf_counter()
                        workdir.save(tile, records)
                        timings.spill += time.perf_counter() - t0
                    submit_more()
                    if progress is not None:  # resumed tiles are counted by the bar's start
                        progress.update(1)
                yield tile, records
        finally:
            for fut in futures.values():
                fut.cancel()


def _tile_failure(tile, exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    reason = text[0].rstrip(".") if text else type(exc).__name__
    if isinstance(exc, TerrasamError):
        return f"{tile.label} failed: {reason}"
    return f"{tile.label} failed on a Dask worker: {type(exc).__name__}: {reason}"
