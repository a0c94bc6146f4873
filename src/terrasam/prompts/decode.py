"""Window decoding: prompts sharing a window share one embedding and one decoder pass.

When a prompt's best mask is cut by a window edge inside the raster, the prompt is run again
in a window grown past that edge.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from terrasam.prompts.sources import Prompt, Report, _warn
from terrasam.prompts.windows import WindowPlan, _extent, _grown, _inside

PARTS = ("all", "prompt")
MAX_DOWNSAMPLE = 4.0  # warn when a box is read at coarser than 1/4 of the raster's resolution
MAX_GROW = 3  # times a prompt is re-run in a larger window when its mask is cut by an edge
STABILITY_OFFSET = 1.0  # the automatic generator's default stability_score_offset
_BATCH = 32  # prompts per decoder call
_UPSCALE_CHUNK = 8  # masks upscaled to window size at once (bounds memory)


def _prompt_arrays(p: Prompt, plan: WindowPlan, valid: np.ndarray):
    """Model-image points/labels/box of a prompt, nodata and out-of-window points removed.

    Returns (points (N, 2), labels (N,), box (4,) | None, status) with status "ok" or "nodata".
    """
    h, w = valid.shape
    xy = plan.to_image(p.points)
    labels = p.labels.copy()
    if p.extra_negatives:
        xy = np.concatenate([xy, plan.to_image(np.array(p.extra_negatives))])
        labels = np.concatenate([labels, np.zeros(len(p.extra_negatives), np.int64)])
    inside = _inside(xy, w, h)
    cols = np.clip(np.floor(xy[:, 0]), 0, w - 1).astype(int)
    rows = np.clip(np.floor(xy[:, 1]), 0, h - 1).astype(int)
    on_data = inside & valid[rows, cols]
    pos = labels == 1
    dropped = int(np.count_nonzero(pos & ~on_data))
    keep = on_data | (~pos & inside)
    box = None
    if p.box is not None:
        box = np.concatenate([plan.to_image(p.box[:2])[0], plan.to_image(p.box[2:])[0]])
        bx0, by0 = int(math.floor(box[0])), int(math.floor(box[1]))
        bx1, by1 = int(math.ceil(box[2])), int(math.ceil(box[3]))
        if not valid[max(by0, 0):by1, max(bx0, 0):bx1].any():
            return None, None, None, "nodata", 0
    if box is None and not (keep & pos).any():
        return None, None, None, "nodata", 0
    return xy[keep], labels[keep], box, "ok", dropped


def _keep_prompt_parts(mask: np.ndarray, points: np.ndarray, labels: np.ndarray, box) -> np.ndarray:
    """Only the connected parts of ``mask`` holding a positive point or overlapping the box."""
    from scipy import ndimage

    comp, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask
    h, w = mask.shape
    wanted = set()
    for x, y in points[labels == 1]:
        c, r = int(min(max(math.floor(x), 0), w - 1)), int(min(max(math.floor(y), 0), h - 1))
        if comp[r, c]:
            wanted.add(int(comp[r, c]))
    if box is not None:
        x0, y0 = max(int(math.floor(box[0])), 0), max(int(math.floor(box[1])), 0)
        x1, y1 = int(math.ceil(box[2])), int(math.ceil(box[3]))
        wanted.update(int(v) for v in np.unique(comp[y0:y1, x0:x1]) if v)
    if not wanted:
        return mask
    return np.isin(comp, sorted(wanted))


def _decode_window(adapter, embedding, items, valid, multimask_all: bool, parts: str):
    """Decode prompts sharing one embedding; yields (prompt, mask, score, stability, rank).

    The stability score is the automatic generator's: the IoU of the mask's logits cut at
    ``mask_threshold`` plus and minus ``STABILITY_OFFSET``.
    """
    import torch

    from terrasam.amg_utils import stability_score

    batches: dict = defaultdict(list)
    for item in items:
        p, xy, labels, box = item
        batches[(box is not None, len(xy))].append(item)
    for (has_box, n), group in batches.items():
        for start in range(0, len(group), _BATCH):
            chunk = group[start:start + _BATCH]
            pts = np.stack([c[1] for c in chunk]).astype(np.float32) if n else None
            labs = np.stack([c[2] for c in chunk]).astype(np.int64) if n else None
            bxs = np.stack([c[3] for c in chunk]).astype(np.float32) if has_box else None
            with torch.inference_mode():
                low, iou = adapter.decode(embedding, points=pts, point_labels=labs, boxes=bxs,
                                          multimask=True)
            iou_np = iou.float().cpu().numpy().reshape(len(chunk), -1)
            picks = []
            for i in range(len(chunk)):
                order = np.argsort(-iou_np[i], kind="stable")
                picks += [(i, int(j), r) for r, j in enumerate(order if multimask_all
                                                              else order[:1], start=1)]
            for start2 in range(0, len(picks), _UPSCALE_CHUNK):
                sel = picks[start2:start2 + _UPSCALE_CHUNK]
                bi = torch.tensor([s[0] for s in sel], device=low.device)
                mi = torch.tensor([s[1] for s in sel], device=low.device)
                with torch.inference_mode():
                    logits = adapter.upscale(low[bi, mi], embedding)
                    stab = stability_score(logits.float(), adapter.mask_threshold,
                                           STABILITY_OFFSET).cpu().numpy()
                masks = (logits > adapter.mask_threshold).cpu().numpy()
                for (i, j, rank), mask, st in zip(sel, masks, stab):
                    p, xy, labels, box = chunk[i]
                    mask = mask & valid
                    if parts == "prompt":
                        mask = _keep_prompt_parts(mask, xy, labels, box)
                    yield p, mask, float(iou_np[i, j]), float(st), rank


def run_point_box(reader, adapter, prompts: list[Prompt], plans: dict, report: Report, *,
                  multimask_all=False, parts="all", max_downsample=MAX_DOWNSAMPLE,
                  scale=1.0, max_grow=MAX_GROW, quiet=True, warn=None,
                  embed=None) -> list[dict]:
    """Segment each placed prompt; returns rows (prompt_id, type, geometry, score, ...).

    Prompts sharing a window share one embedding. When the best mask is cut by a window edge
    inside the raster, the prompt is run again (up to ``max_grow`` times) in a window grown
    past that edge, read downsampled when it exceeds the model's input size.
    ``embed(plan, rgb)`` gives the embedding of a window's image (default
    ``adapter.embed(rgb)``): where a cache of embeddings per window plugs in.
    """
    from terrasam.progress import Progress
    from terrasam.vectorize import mask_to_geometry

    warn = warn or _warn
    size = int(adapter.image_size)
    pending: dict = defaultdict(list)
    for p in prompts:
        if p.id in plans:
            pending[plans[p.id]].append(p)
    final: dict[int, WindowPlan] = {}
    rows = []
    progress = Progress(len(pending), "windows", quiet=quiet)
    for attempt in range(max_grow + 1):
        regrow: dict = defaultdict(list)
        for plan in sorted(pending, key=lambda w: (w.row_off, w.col_off, w.height, w.width)):
            rgb, valid = reader.read((plan.col_off, plan.row_off, plan.width, plan.height),
                                     out_shape=(plan.out_h, plan.out_w))
            items = []
            for p in pending[plan]:
                xy, labels, box, status, dropped = _prompt_arrays(p, plan, valid)
                if attempt == 0:
                    report.dropped_points += dropped
                if status == "nodata":
                    report.nodata.append(p.id)
                    continue
                items.append((p, xy, labels, box))
            if items:
                embedding = adapter.embed(rgb) if embed is None else embed(plan, rgb)
                transform = plan.transform(reader.transform)
                moved = set()
                for p, mask, score, stab, rank in _decode_window(
                        adapter, embedding, items, valid, multimask_all, parts):
                    if p.id in moved:
                        continue
                    if rank == 1 and attempt < max_grow and mask.any():
                        new = _grown(plan, mask, _extent(p), reader.width, reader.height,
                                     size, scale)
                        if new is not None:
                            moved.add(p.id)
                            regrow[new].append(p)
                            continue
                    final[p.id] = plan
                    geom = mask_to_geometry(mask, transform)
                    if geom is None or geom.is_empty:
                        if rank == 1:
                            report.empty.append(p.id)
                        continue
                    rows.append({"prompt_id": p.id, "prompt_type": p.type, "prompt": p.wkt,
                                 "prompt_crs": p.crs, "score": score, "predicted_iou": score,
                                 "stability_score": stab, "rank": rank, "geometry": geom})
                del embedding
            progress.update()
        if not regrow:
            break
        progress.total += len(regrow)
        pending = regrow
    progress.close()
    coarse = [i for i, w in final.items() if max(w.scale) / scale > max_downsample]
    if coarse:
        worst = max(max(final[i].scale) for i in coarse) / scale
        them = "1 prompt spans" if len(coarse) == 1 else f"{len(coarse)} prompts span"
        warn(f"{them} more than the model's {size}-pixel input and were "
             f"read at down to 1/{worst:.1f} of the working resolution "
             f"(prompt ids {_ids(coarse)}); small details may be lost")
    rows.sort(key=lambda r: (r["prompt_id"], r["rank"]))
    return rows


def _ids(ids, limit: int = 10) -> str:
    ids = sorted(ids)
    text = ", ".join(str(i) for i in ids[:limit])
    return text + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def _report_skips(report: Report, total: int, warn) -> None:
    if report.outside:
        warn(f"{len(report.outside)} of {total} prompts fall outside the raster and were "
             f"skipped (prompt ids {_ids(report.outside)})")
    if report.nodata:
        warn(f"{len(report.nodata)} of {total} prompts fall on nodata and were skipped "
             f"(prompt ids {_ids(report.nodata)})")
    if report.empty:
        warn(f"{len(report.empty)} of {total} prompts gave an empty mask "
             f"(prompt ids {_ids(report.empty)})")
    if report.dropped_points:
        n = report.dropped_points
        warn(f"{n} positive point{'s' if n > 1 else ''} outside the raster or on nodata "
             f"{'were' if n > 1 else 'was'} left out of {'their prompts' if n > 1 else 'its prompt'}")
    if report.unused_negatives:
        n = report.unused_negatives
        warn(f"{n} negative point{'s are' if n > 1 else ' is'} outside the window of every "
             f"prompt {'they' if n > 1 else 'it'} could refine and {'were' if n > 1 else 'was'} "
             "ignored")
