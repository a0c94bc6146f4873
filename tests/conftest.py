"""Shared fixtures. Fixtures specific to one module live in its test file or in tests/synth.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network
# runs remember their speed per tile (terrasam.speed): in a folder of this session, not the
# user's cache
os.environ.setdefault("TERRASAM_CACHE_DIR", tempfile.mkdtemp(prefix="terrasam-test-cache-"))

SHARED_DATA = Path(
    os.environ.get("TERRASAM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


@pytest.fixture
def shared_data() -> Path:
    """The folder of real rasters beside the repository; skips the test when absent."""
    if not (SHARED_DATA / "naip_2020_5m.tif").exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_raster() -> Path:
    """The sample raster shipped in the package (a 512 x 512 px, 4-band NAIP crop)."""
    from terrasam.data import sample_raster

    return sample_raster()


@pytest.fixture(scope="session")
def sam_file(tmp_path_factory) -> Path:
    """A tiny random SAM checkpoint in Meta's .pth layout."""
    from terrasam.testing import random_checkpoint

    return random_checkpoint("sam-vit-b", tmp_path_factory.mktemp("sam"), format="meta")


@pytest.fixture(scope="session")
def sam2_file(tmp_path_factory) -> Path:
    """A tiny random SAM 2.1 checkpoint in Meta's .pt layout."""
    from terrasam.testing import random_checkpoint

    return random_checkpoint("sam2.1-hiera-tiny", tmp_path_factory.mktemp("sam2"), format="meta")
