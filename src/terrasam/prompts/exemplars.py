"""Visual exemplars (SAM 3): boxes around examples of the objects to find in the whole raster.

An exemplar lies in one place of the raster, but the objects like it are everywhere. SAM 3's
geometry encoder turns an exemplar box into prompt tokens by pooling the image features
inside the box (and attending to that image), so the tokens are made once, on a window
around the exemplars read at the tiles' resolution, and the same tokens are given to the
detector on every tile (:class:`terrasam.text.TextJob`). Exemplars near each other share a
window (the window planning of point/box prompts); exemplars far apart are encoded on their
own windows and their tokens joined into one prompt. With ``--text`` the text's tokens come
first: text and exemplars are one concept, as in SAM 3.

Boxes come from the command line (``--exemplar MINX,MINY,MAXX,MAXY`` in ``--crs``) or a
vector file of polygons (each polygon's bounds in the raster's CRS is an exemplar), like
``--box`` and ``--boxes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from terrasam.errors import TerrasamError
from terrasam.prompts import sources, windows

EXEMPLAR_TYPES = ("exemplar", "text+exemplar")


@dataclass(frozen=True)
class Exemplar:
    """One exemplar box in source pixels (clipped to the raster)."""

    id: int  # 1-based, positives first, in input order
    box: tuple[float, float, float, float]
    label: int  # 1 positive (--exemplar), 0 negative (--negative-exemplar)
    wkt: str  # the box as given, in its own CRS
    crs: str


def parse_exemplar(text: str, option: str = "--exemplar") -> tuple[float, float, float, float]:
    """``MINX,MINY,MAXX,MAXY`` from the command line: four finite numbers, not empty."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4:
        raise TerrasamError(f"{option} takes MINX,MINY,MAXX,MAXY, got {text!r}.")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise TerrasamError(f"{option} coordinates must be numbers, got {text!r}.") from None
    if not all(math.isfinite(v) for v in values):
        raise TerrasamError(f"{option} {text!r} has a non-finite coordinate.")
    x0, y0, x1, y1 = values
    if not (x1 > x0 and y1 > y0):
        raise TerrasamError(f"{option} {text!r} is an empty box: MINX must be below MAXX and "
                            f"MINY below MAXY.")
    return values


def check_model(model=None, checkpoint=None) -> None:
    """Exemplars need SAM 3: a --model of another family is refused before it loads."""
    if model is None:
        return
    from terrasam.models.registry import get_spec

    spec = get_spec(model)
    if spec.family != "sam3":
        raise TerrasamError(f"model {spec.model_id} does not take exemplars; exemplars are a "
                            f"SAM 3 prompt: use --model sam3.")


def _polygons(source, option: str):
    """A vector file (or frame) of exemplar polygons, its geometry types checked."""
    frame = sources._read_frame(source, "exemplars")
    name = str(source) if isinstance(source, (str, Path)) else "the exemplars frame"
    if not len(frame):
        raise TerrasamError(f"{option} {name} holds no features: it has no exemplars.")
    kinds = sorted({g.geom_type for g in frame.geometry.values
                    if g is not None and not g.is_empty})
    bad = [k for k in kinds if k not in ("Polygon", "MultiPolygon")]
    if bad:
        raise TerrasamError(f"{option} {name} holds {bad[0]} geometries; exemplars must be "
                            f"polygons (each polygon's bounding box is an exemplar).")
    return frame


def collect(positives=None, negatives=None, *, reader, crs=None, warn=None) -> list[Exemplar]:
    """The exemplars in the raster's pixels, clipped to it; one exemplar wholly outside the
    raster is an error (it cannot show what to look for).

    ``positives``/``negatives``: a vector file path, a GeoDataFrame, or ``(minx, miny, maxx,
    maxy)`` tuples in ``crs`` (default the raster's CRS)."""
    out: list[Exemplar] = []
    for source, label, option in ((positives, 1, "--exemplars"),
                                  (negatives, 0, "--negative-exemplars")):
        if source is None:
            continue
        if sources._is_tuples(source):
            items = [tuple(b) for b in source]
            if not items:
                continue
            for item in items:
                if len(item) != 4:
                    raise TerrasamError(f"an exemplar is (minx, miny, maxx, maxy), got {item!r}.")
                parse_exemplar(",".join(map(str, item)),
                               "--exemplar" if label else "--negative-exemplar")
        else:
            source = _polygons(source, option)
            items = source
        prompts, _, _report = sources.collect_prompts(
            None, items, raster_crs=reader.crs, transform=reader.transform, crs=crs, warn=warn)
        live = {p.id: p for p in windows.clip_prompts(prompts, reader.width, reader.height,
                                                      sources.Report())}
        what = "exemplar" if label else "negative exemplar"
        for p in prompts:
            if p.id not in live:
                message = str(sources.outside_error([p], reader))
                raise TerrasamError(message.replace("the prompt falls", f"{what} {p.id} falls",
                                                    1))
            q = live[p.id]
            out.append(Exemplar(len(out) + 1, tuple(float(v) for v in q.box), label, p.wkt,
                                p.crs))
    return out


def make_concept(adapter, reader, exemplars: list[Exemplar], text: str | None, *,
                 tile_size: int, scale: float = 1.0):
    """``(ConceptPrompt, description)``: the exemplars encoded on windows of ``tile_size``
    processing pixels around them (read as tiles are read), once for the whole run."""
    groups: dict = {}
    for e in exemplars:
        plan = windows._plan(e.box, reader.width, reader.height, int(tile_size), scale)
        groups.setdefault(plan, []).append(e)
    made = []
    for plan, members in sorted(groups.items(), key=lambda kv: kv[1][0].id):
        rgb, valid = reader.read((plan.col_off, plan.row_off, plan.width, plan.height),
                                 out_shape=(plan.out_h, plan.out_w))
        boxes = []
        for e in members:
            (x0, y0), (x1, y1) = plan.to_image(np.array([e.box[:2], e.box[2:]]))
            c0, r0 = max(int(math.floor(x0)), 0), max(int(math.floor(y0)), 0)
            c1, r1 = int(math.ceil(x1)), int(math.ceil(y1))
            if not valid[r0:r1, c0:c1].any():
                what = "exemplar" if e.label else "negative exemplar"
                raise TerrasamError(f"{what} {e.id} ({e.wkt}) lies on nodata only; an exemplar "
                                    f"must show an example of the objects.")
            boxes.append((x0, y0, x1, y1))
        made.append((adapter.embed(rgb), np.array(boxes), [e.label for e in members]))
    label = str(text).strip() if text else "exemplar"
    prompt = adapter.concept_prompt(text, made, label=label)
    description = tuple({"box": e.wkt, "crs": e.crs, "label": e.label} for e in exemplars)
    return prompt, description
