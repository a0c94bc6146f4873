"""The sample raster shipped with terrasam, so that the examples run on a fresh install.

``naip_sample.tif``: a 512 x 512 px crop (2.56 x 2.56 km, North Dakota farmland: fields,
ponds, a road) of USDA NAIP 2020 imagery resampled to 5 m, 4 bands (red, green, blue, NIR),
uint8, nodata 0, EPSG:26914. NAIP imagery is in the US public domain (USDA Farm Production
and Conservation Business Center); obtained via the public opengeos/data repository.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SAMPLE_NAME = "naip_sample.tif"


def sample_raster() -> Path:
    """The path of the bundled sample raster (a 4-band NAIP GeoTIFF, EPSG:26914)."""
    return Path(str(resources.files(__name__).joinpath(SAMPLE_NAME)))
