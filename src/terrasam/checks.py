"""Checks of a run's arguments, made before the model loads or any tile runs.

Each check raises :class:`~terrasam.errors.TerrasamError` with one sentence naming the
option as the command line spells it. ``api.segment``/``api.prompt`` and the ``serve``
command call :func:`check_run` first, so that a typo costs no model load.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from terrasam.errors import TerrasamError

SCALES = ("percentile", "minmax", "none")
MIN_TILE, MAX_TILE = 64, 8192  # below: no context for the model; above: one tile's memory
MAX_UPSAMPLE = 100  # --gsd splits a pixel into at most this many across (no detail is gained)


def _number(value, option: str) -> float:
    if isinstance(value, bool):
        raise TerrasamError(f"{option} must be a number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TerrasamError(f"{option} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise TerrasamError(f"{option} must be a finite number, got {value!r}.")
    return number


def _integer(value, option: str) -> int:
    number = _number(value, option)
    if not number.is_integer():
        raise TerrasamError(f"{option} must be a whole number of pixels, got {value!r}.")
    return int(number)


def check_fraction(value, option: str) -> None:
    """A value in [0, 1] (thresholds, ratios); None passes."""
    if value is not None and not 0.0 <= _number(value, option) <= 1.0:
        raise TerrasamError(f"{option} must be between 0 and 1, got {value!r}.")


def check_tiling(tile_size=None, overlap=None, gsd=None, image_size: int | None = None) -> None:
    """--tile-size in [64, 8192], 0 <= --overlap < tile size, --gsd > 0.

    ``image_size``: the model's input size, the default tile size (None: not known yet).
    """
    size = image_size
    if tile_size is not None:
        size = _integer(tile_size, "--tile-size")
        if not MIN_TILE <= size <= MAX_TILE:
            raise TerrasamError(f"--tile-size must be between {MIN_TILE} and {MAX_TILE} "
                                f"pixels, got {tile_size!r}.")
    if overlap is not None:
        ovl = _integer(overlap, "--overlap")
        which = "--tile-size" if tile_size is not None else "the tile size"
        if ovl < 0 or (size is not None and ovl >= size):
            than = f" ({size} px)" if size is not None else ""
            raise TerrasamError(f"--overlap must be at least 0 and smaller than {which}{than}, "
                                f"got {ovl} px.")
    if gsd is not None and not _number(gsd, "--gsd") > 0:
        raise TerrasamError(f"--gsd must be a positive ground sample distance in metres, "
                            f"got {gsd!r}.")


def check_gsd_grid(gsd, width: int, height: int, ground_res) -> None:
    """--gsd must leave the raster at least one processing pixel across and split a pixel
    into at most :data:`MAX_UPSAMPLE` x :data:`MAX_UPSAMPLE`.

    ``ground_res``: the raster's pixel size (x, y) in metres (``RasterReader.ground_res``),
    from which the processing grid is made (:func:`terrasam.tiling.grid_scale`).
    """
    import numpy as np

    if gsd is None:
        return
    gsd = _number(gsd, "--gsd")
    res = math.sqrt(float(ground_res[0]) * float(ground_res[1]))
    if not res > 0:
        return
    scale = gsd / res  # source pixels per processing pixel, as tiling.grid_scale
    given = np.format_float_positional(gsd, trim="-")  # as typed, without an exponent
    if min(width, height) / scale < 1:
        most = min(width, height) * res
        raise TerrasamError(
            f"--gsd {given} m leaves less than one pixel: the raster is {width} x {height} "
            f"pixels of {_metres(res)}, so --gsd can be at most {_metres(most, math.floor)}.")
    if 1 / scale > MAX_UPSAMPLE:
        split = f"{1 / scale:,.{1 if 1 / scale < 1000 else 0}f}"
        raise TerrasamError(
            f"--gsd {given} m would split each {_metres(res)} pixel into {split} x "
            f"{split} (at most {MAX_UPSAMPLE} x {MAX_UPSAMPLE}); give at least "
            f"{_metres(res / MAX_UPSAMPLE, math.ceil)}.")


def _metres(value: float, rounding=round) -> str:
    """A length in words with 3 significant digits: ``1.01 m``, ``0.0101 m``, ``28,196 km``;
    ``rounding`` (math.floor, math.ceil) says which way the last digit goes."""
    unit, value = ("km", value / 1000) if value >= 1000 else ("m", value)
    digits = max(0, 2 - math.floor(math.log10(value))) if value > 0 else 0
    text = f"{rounding(value * 10**digits) / 10**digits:,.{digits}f}"
    return f"{text.rstrip('0').rstrip('.') if '.' in text else text} {unit}"


def check_nodata(nodata, dtype: str) -> None:
    """--nodata must be a value the raster's type can hold (no pixel could equal another)."""
    import numpy as np

    if nodata is None or not np.issubdtype(np.dtype(dtype), np.integer):
        return
    info = np.iinfo(np.dtype(dtype))
    value = float(nodata)
    if not math.isfinite(value) or not value.is_integer() or not info.min <= value <= info.max:
        raise TerrasamError(f"--nodata {nodata:g} cannot occur in a {dtype} raster (values "
                            f"{info.min}..{info.max}); give one of its values.")


def check_cleaning(simplify=None, min_area=None, fill_holes=None) -> None:
    """--simplify is a length, --min-area and --fill-holes areas (pixels or with a unit)."""
    from terrasam.vectorize import parse_area, parse_length

    for value, option, parse in ((simplify, "--simplify", parse_length),
                                 (min_area, "--min-area", parse_area),
                                 (fill_holes, "--fill-holes", parse_area)):
        if value is None:
            continue
        try:
            parse(value)
        except TerrasamError as exc:
            if parse is parse_area and _is_length(value):
                raise TerrasamError(f"{option} is an area: write {str(value).strip()}2 (square "
                                    f"units) or a number of pixels, not {value!r}.") from None
            raise TerrasamError(f"{option}: {str(exc).rstrip('.')}.") from None


def _is_length(value) -> bool:
    from terrasam.vectorize import parse_length

    try:
        return parse_length(value)[1] == "m"
    except TerrasamError:
        return False


def check_finite(values: dict) -> None:
    """Options given as numbers (the generator's knobs) must be finite: NaN passes no test."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise TerrasamError(f"--{name.replace('_', '-')} must be a finite number, "
                                f"got {value!r}.")


def check_scale(scale) -> None:
    """--scale is one of percentile, minmax, none."""
    if scale not in SCALES:
        raise TerrasamError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}.")


def check_model(model=None, checkpoint=None) -> int | None:
    """A known model id and an existing checkpoint; returns the model's input size if known."""
    from terrasam.models.registry import DEFAULT_MODEL, get_spec

    if checkpoint is not None and not Path(checkpoint).expanduser().exists():
        raise TerrasamError(f"checkpoint {checkpoint} does not exist.")
    spec = get_spec(model) if model is not None else None
    if spec is None and checkpoint is None:
        spec = get_spec(DEFAULT_MODEL)
    return spec.image_size if spec is not None and checkpoint is None else None


def check_backend(backend="torch", device="auto", model=None) -> None:
    """--backend: torch, or onnx / onnx-int8 with onnxruntime installed, on a device it runs
    on, for a family it exports (not SAM 3)."""
    if backend == "torch":
        return
    from terrasam.models.onnx_backend import check_backend as check

    check(backend, device, model)


def check_workdir(workdir) -> None:
    """--workdir: not a file, and creatable (its nearest existing folder is writable)."""
    if workdir is None:
        return
    path = Path(workdir).expanduser()
    if path.exists() and not path.is_dir():
        raise TerrasamError(f"--workdir {workdir} is a file; give a folder.")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise TerrasamError(f"--workdir {workdir} cannot be created: {parent} is not writable.")


def check_run(*, model=None, checkpoint=None, adapter=None, scale="percentile",
              tile_size=None, overlap=None, gsd=None, simplify=None, min_area=None,
              fill_holes=None, workdir=None, fractions: dict | None = None,
              backend="torch", device="auto") -> None:
    """Every check of a run's arguments that needs neither the raster nor the model.

    ``fractions``: ``{option name: value}`` that must lie in [0, 1].
    """
    check_scale(scale)
    if adapter is None:
        check_backend(backend, device, model)
    image_size = (int(adapter.image_size) if adapter is not None
                  else check_model(model, checkpoint))
    check_tiling(tile_size, overlap, gsd, image_size)
    check_cleaning(simplify, min_area, fill_holes)
    for option, value in (fractions or {}).items():
        check_fraction(value, option)
    check_workdir(workdir)
