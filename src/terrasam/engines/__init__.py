"""Engines run a tile job (read -> model -> mask records) over a tile list, in tile order.

``local``: one model in this process, tiles streamed through it, results spilled per tile to a
work directory (:mod:`terrasam.engines.workdir`) so that a killed run resumes.
``dask``: the same jobs on a ``dask.distributed`` cluster (a client, a scheduler address, or
``dask-local``: a LocalCluster on this machine), same work directory, same output.

An engine has one call, ``run(tiles, reader, job, model, *, workdir, progress, timings)``,
yielding ``(tile, records)`` in the order of ``tiles``; ``job`` is a tile job and ``model`` a
picklable :class:`~terrasam.models.ref.ModelRef`.
"""

from __future__ import annotations

from terrasam.errors import TerrasamError

ENGINES = ("local", "dask", "dask-local")


def get_engine(engine="local", *, client=None, scheduler=None, workers=None,
               threads_per_worker=1):
    """An engine by name (with its options), or the engine object given.

    ``dask``: on ``client`` (a ``distributed.Client``) or the scheduler at ``scheduler``;
    ``dask-local``: a LocalCluster of ``workers`` processes of ``threads_per_worker`` threads.
    """
    if not isinstance(engine, str):
        return engine
    if engine == "local":
        if client is not None or scheduler or workers:
            raise TerrasamError("--scheduler, --workers and a Dask client need --engine dask "
                                "or dask-local")
        from terrasam.engines.local import LocalEngine

        return LocalEngine()
    if engine in ("dask", "dask-local"):
        from terrasam.engines.dask import DaskEngine

        if engine == "dask" and client is None and not scheduler:
            raise TerrasamError("--engine dask needs --scheduler ADDRESS (or use dask-local "
                                "for a cluster on this machine)")
        if engine == "dask-local" and (client is not None or scheduler):
            raise TerrasamError("--engine dask-local starts its own cluster; use --engine dask "
                                "with --scheduler")
        return DaskEngine(client=client, scheduler=scheduler, workers=workers,
                          threads_per_worker=threads_per_worker)
    raise TerrasamError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
