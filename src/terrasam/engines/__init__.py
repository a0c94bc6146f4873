"""Engines run a tile job (read -> model -> mask records) over a tile list, in tile order.

``local``: one model in this process, tiles streamed through it, results spilled per tile to a
work directory (:mod:`terrasam.engines.workdir`) so that a killed run resumes.

An engine has one call, ``run(tiles, reader, job, model, *, workdir, progress, timings)``,
yielding ``(tile, records)`` in the order of ``tiles``; ``job`` is a tile job and ``model`` a
picklable :class:`~terrasam.models.ref.ModelRef`.
"""

from __future__ import annotations

from terrasam.errors import TerrasamError

ENGINES = ("local",)


def get_engine(engine="local"):
    """An engine by name, or the engine object given."""
    if not isinstance(engine, str):
        return engine
    if engine == "local":
        from terrasam.engines.local import LocalEngine

        return LocalEngine()
    raise TerrasamError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
