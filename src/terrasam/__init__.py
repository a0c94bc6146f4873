"""terrasam: Segment Anything on georeferenced rasters, delivered as GIS vectors."""

__version__ = "0.1.0"

__all__ = ["__version__", "segment", "prompt", "sample_raster", "TerrasamError"]

from terrasam.data import sample_raster
from terrasam.errors import TerrasamError


def __getattr__(name):
    # The Python API pulls in torch and transformers; import it only when asked for.
    if name in ("segment", "prompt"):
        from terrasam import api

        return getattr(api, name)
    raise AttributeError(f"module 'terrasam' has no attribute {name!r}")
