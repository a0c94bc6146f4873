"""`terrasam serve`: a local web page to click on a raster and get objects as polygons.

* :mod:`~terrasam.serve.session`: the raster, the model, the embedding cache per window, the
  objects kept, the export (no web framework);
* :mod:`~terrasam.serve.tiles`: web-map tiles rendered from the raster's windows;
* :mod:`~terrasam.serve.app`: the FastAPI app, its request models and the uvicorn server
  (needs the ``serve`` extra: ``pip install "terrasam[serve]"``);
* ``static/``: the page (Leaflet is served from the vendored wheel, nothing from the internet).
"""

from __future__ import annotations

import importlib.util

from terrasam.errors import TerrasamError

INSTALL_HINT = 'terrasam serve needs FastAPI and uvicorn: pip install "terrasam[serve]".'


def require() -> None:
    """Raise a one-sentence TerrasamError when the server's packages are missing."""
    if any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn")):
        raise TerrasamError(INSTALL_HINT)


def serve(raster, **options) -> None:
    """Serve ``raster`` until interrupted; see :func:`terrasam.serve.app.serve`."""
    require()
    from terrasam.serve.app import serve as _serve

    _serve(raster, **options)


def create_app(session, **options):
    """The FastAPI app of a :class:`~terrasam.serve.session.Session`."""
    require()
    from terrasam.serve.app import create_app as _create_app

    return _create_app(session, **options)


__all__ = ["INSTALL_HINT", "create_app", "require", "serve"]
