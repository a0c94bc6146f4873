"""Window planning: the raster window the model sees for each prompt.

Each prompt gets a window of the model's input size around it in the raster's pixel grid,
snapped to a half-window grid so that nearby prompts share a window (and one image
embedding). A box larger than the window gets a window containing it, read downsampled to the
model size. Planning never changes the prompts given: clipped prompts are new values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from affine import Affine

from terrasam.prompts.sources import Prompt, Report

BOX_MARGIN = 0.1  # context added on each side of a box larger than the model window


@dataclass(frozen=True)
class WindowPlan:
    """A source window read at ``(out_h, out_w)`` pixels: what the model sees for a prompt."""

    col_off: float  # source pixels (fractions only with --gsd)
    row_off: float
    width: float
    height: float
    out_w: int
    out_h: int

    @property
    def scale(self) -> tuple[float, float]:
        """Source pixels per model-image pixel along x and y."""
        return (self.width / self.out_w, self.height / self.out_h)

    def transform(self, raster_transform: Affine) -> Affine:
        """Model-image pixel -> CRS coordinates."""
        sx, sy = self.scale
        return (raster_transform @ Affine.translation(self.col_off, self.row_off)
                @ Affine.scale(sx, sy))

    def to_image(self, xy: np.ndarray) -> np.ndarray:
        """Source-pixel (x, y) -> model-image pixel (x, y)."""
        sx, sy = self.scale
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        return (xy - [self.col_off, self.row_off]) / [sx, sy]

    def contains(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        return ((xy[:, 0] >= self.col_off) & (xy[:, 0] < self.col_off + self.width)
                & (xy[:, 1] >= self.row_off) & (xy[:, 1] < self.row_off + self.height))


def _axis(a: float, b: float, n: int, size: int) -> int:
    """Origin of a ``size`` window holding [a, b] in a raster of ``n`` pixels (n > size)."""
    half = size // 2
    centre = (a + b) / 2
    if b - a <= half:
        # snap to a half-window grid: nearby prompts land in the same window and share an
        # embedding, and the prompt stays at least a quarter window from the edges
        origin = (round(centre / half) - 1) * half
    else:
        origin = math.floor(centre - size / 2)
    return int(min(max(origin, 0), n - size))


def plan_window(extent, width: int, height: int, size: int) -> WindowPlan:
    """The window the model sees for a prompt whose source-pixel extent is ``extent``.

    Up to ``size`` pixels: a ``size`` window (snapped to a stride of size/2 when the prompt
    fits in half of it) clamped inside the raster. Larger: a square window holding the extent
    plus a margin, clamped to the raster, read downsampled so its longer side is ``size``.
    """
    x0, y0, x1, y1 = (float(v) for v in extent)
    longest = max(x1 - x0, y1 - y0)
    if longest <= size:
        cols = (_axis(x0, x1, width, size), size) if width > size else (0, width)
        rows = (_axis(y0, y1, height, size), size) if height > size else (0, height)
        return WindowPlan(cols[0], rows[0], cols[1], rows[1], cols[1], rows[1])
    side = math.ceil(longest * (1 + 2 * BOX_MARGIN))
    factor = side / size
    spans = []
    for a, b, n in ((x0, x1, width), (y0, y1, height)):
        length = min(side, n)
        origin = int(min(max(math.floor((a + b) / 2 - length / 2), 0), n - length))
        spans.append((origin, length, max(1, round(length / factor))))
    (c0, w, ow), (r0, h, oh) = spans
    return WindowPlan(c0, r0, w, h, ow, oh)


def _inside(xy: np.ndarray, width: int, height: int) -> np.ndarray:
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    return (np.isfinite(xy).all(axis=1) & (xy[:, 0] >= 0) & (xy[:, 0] < width)
            & (xy[:, 1] >= 0) & (xy[:, 1] < height))


def clip_prompts(prompts: list[Prompt], width: int, height: int, report: Report) -> list[Prompt]:
    """The prompts that touch the raster, with their boxes clipped to it (new values; the
    prompts given are not changed).

    Ids of prompts wholly outside go to ``report.outside``; positive points outside the raster
    are left out of prompts that keep something inside (counted in ``report.dropped_points``).
    """
    live = []
    for p in prompts:
        pos = p.labels == 1
        ok = _inside(p.points, width, height)
        box = None
        if p.box is not None and np.isfinite(p.box).all():
            bx0, by0 = max(p.box[0], 0.0), max(p.box[1], 0.0)
            bx1, by1 = min(p.box[2], float(width)), min(p.box[3], float(height))
            if bx1 > bx0 and by1 > by0:
                box = np.array([bx0, by0, bx1, by1])
        if box is None and not (pos & ok).any():
            report.outside.append(p.id)
            continue
        report.dropped_points += int(np.count_nonzero(pos & ~ok))
        keep = (pos & ok) | ~pos  # negatives stay: the window may still hold them
        live.append(dataclasses.replace(p, box=box, points=p.points[keep],
                                        labels=p.labels[keep]))
    return live


def _extent(p: Prompt) -> tuple[float, float, float, float]:
    """Source-pixel bounds of a prompt's positive points and box."""
    xy = p.points[p.labels == 1]
    parts = [xy.min(axis=0), xy.max(axis=0)] if len(xy) else []
    if p.box is not None:
        parts += [p.box[:2], p.box[2:]]
    stack = np.array(parts)
    return (*stack.min(axis=0), *stack.max(axis=0))


def _plan(extent, width: int, height: int, size: int, scale: float) -> WindowPlan:
    """plan_window for a source-pixel extent, planned in the processing grid (--gsd)."""
    if scale == 1.0:
        return plan_window(extent, width, height, size)
    pw = max(1, math.ceil(width / scale - 1e-9))
    ph = max(1, math.ceil(height / scale - 1e-9))
    w = plan_window([v / scale for v in extent], pw, ph, size)
    return WindowPlan(w.col_off * scale, w.row_off * scale, w.width * scale, w.height * scale,
                      w.out_w, w.out_h)


def _grown(plan: WindowPlan, mask: np.ndarray, extent, width: int, height: int, size: int,
           scale: float) -> WindowPlan | None:
    """A larger window when ``mask`` is cut by an edge of ``plan`` inside the raster."""
    eps = 1e-6
    cut = {"left": plan.col_off > eps and mask[:, 0].any(),
           "top": plan.row_off > eps and mask[0, :].any(),
           "right": plan.col_off + plan.width < width - eps and mask[:, -1].any(),
           "bottom": plan.row_off + plan.height < height - eps and mask[-1, :].any()}
    if not any(cut.values()):
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    sx, sy = plan.scale
    x0 = min(plan.col_off + cols[0] * sx, extent[0])
    x1 = max(plan.col_off + (cols[-1] + 1) * sx, extent[2])
    y0 = min(plan.row_off + rows[0] * sy, extent[1])
    y1 = max(plan.row_off + (rows[-1] + 1) * sy, extent[3])
    # The object goes on past the cut edge by an unknown amount: first a full-resolution
    # window centred on it (when it could fit), else look as far again as it reaches.
    span = size * scale
    longest = max(x1 - x0, y1 - y0)
    if longest + 2 * scale <= span:
        gx = gy = min(span / 8, (span - longest) / 2)
    else:
        gx, gy = max(x1 - x0, plan.width / 2), max(y1 - y0, plan.height / 2)
    x0 -= gx if cut["left"] else 0
    x1 += gx if cut["right"] else 0
    y0 -= gy if cut["top"] else 0
    y1 += gy if cut["bottom"] else 0
    extent = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    new = _plan(extent, width, height, size, scale)
    return None if new == plan else new


def plan_windows(prompts: list[Prompt], negatives: np.ndarray, width: int, height: int,
                 size: int, report: Report, scale: float = 1.0
                 ) -> tuple[list[Prompt], dict[int, WindowPlan]]:
    """``(prompts, {prompt id: WindowPlan})`` for clipped prompts: the prompts returned carry
    the ungrouped negative points that refine them (the prompts given are not changed).

    ``scale`` (source pixels per processing pixel, from --gsd) sets the resolution windows are
    planned and read at. An ungrouped negative point refines every ungrouped prompt whose
    window holds it; those refining none are counted in ``report.unused_negatives``.
    """
    plans = {p.id: _plan(_extent(p), width, height, size, scale) for p in prompts}
    used = np.zeros(len(negatives), dtype=bool)
    out = []
    for p in prompts:
        if p.group is None and len(negatives):
            hit = plans[p.id].contains(negatives)
            p = dataclasses.replace(p, extra_negatives=[tuple(v) for v in negatives[hit]])
            used |= hit
        out.append(p)
    report.unused_negatives += int(np.count_nonzero(~used))
    return out, plans
