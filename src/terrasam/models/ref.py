"""A model reference: what travels to an engine's workers instead of a loaded model.

A :class:`ModelRef` is a small picklable value (model id or checkpoint, device, dtype,
compile, backend). Each process loads the model once from it (:meth:`ModelRef.load`, cached per
process) and keeps it for every tile it runs. A loaded adapter never crosses a process: a
reference made from one (``ModelRef.of(adapter)``) works in this process only.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from terrasam.errors import TerrasamError

_CACHE: dict = {}  # key -> adapter: the model most recently loaded in this process
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from and how to run it; ``load()`` gives the Adapter."""

    model: str | None = None
    checkpoint: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    backend: str = "torch"
    adapter: object = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, adapter) -> ModelRef:
        """A reference to a model already loaded in this process (local engine only)."""
        return cls(model=getattr(adapter, "model_id", None), adapter=adapter)

    @classmethod
    def for_run(cls, model=None, checkpoint=None, *, device="auto", dtype="auto",
                compile=False, fast=False, text=False, adapter=None,
                backend="torch") -> ModelRef:
        """The reference a command runs with, after terrasam's loading policy: text concepts
        default to ``sam3``; ``fast`` runs in bfloat16 unless a dtype is given."""
        if adapter is not None:
            return cls.of(adapter)
        if text and model is None and checkpoint is None:
            model = "sam3"
        if fast and dtype == "auto":
            dtype = "bfloat16"  # fast mode promises speed, not bit-parity
        return cls(model=model, checkpoint=None if checkpoint is None else str(checkpoint),
                   device=str(device), dtype=str(dtype), compile=bool(compile),
                   backend=str(backend))

    def _key(self) -> tuple:
        stamp = None
        if self.checkpoint is not None:
            try:
                st = os.stat(self.checkpoint)
                stamp = (st.st_size, st.st_mtime_ns)
            except OSError:
                pass
        return (self.model, self.checkpoint, stamp, self.device, self.dtype, self.compile,
                self.backend)

    def load(self):
        """The Adapter: loaded once per process and kept while the same reference is used."""
        if self.adapter is not None:
            return self.adapter
        from terrasam.models import load_model

        key = self._key()
        with _LOCK:
            adapter = _CACHE.get(key)
            if adapter is None:
                _CACHE.clear()  # one model at a time: a process never holds two
                adapter = load_model(self.model, self.checkpoint, device=self.device,
                                     dtype=self.dtype, compile=self.compile,
                                     backend=self.backend)
                _CACHE[key] = adapter
        return adapter

    def __getstate__(self):
        if self.adapter is not None:
            raise TerrasamError(
                "a model loaded in this process cannot be sent to other processes; "
                "give model= or checkpoint= instead of adapter=")
        return self.__dict__.copy()

    def __setstate__(self, state):
        self.__dict__.update(state)


def clear_cache() -> None:
    """Forget the model this process keeps loaded."""
    with _LOCK:
        _CACHE.clear()
