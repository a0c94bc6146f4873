"""Automatic mask generation ("segment everything") on one tile.

terrasam's own implementation of the automatic mask generators of Meta's
``segment_anything`` and ``sam2``. In exact mode (the default) it returns the masks those
generators return for the same model, parameters and image, while spending compute only
where it changes the answer: predicted-IoU filtering happens on the decoder's low-resolution
output, only survivors are upsampled (by ``adapter.upscale``, in small chunks) and scored for
stability, and accepted masks are kept cropped to their box.

terrasam extensions, all off unless asked for:

* ``valid`` (a nodata mask): grid points on invalid pixels are not decoded, masks with more
  than ``nodata_max_fraction`` of their pixels on nodata are dropped before NMS, and the
  remaining masks are clipped to valid pixels. With ``valid=None`` (or all valid) the result
  is the reference's.
* prompt pruning (``prompt_pruning`` or ``fast``): the grid is decoded coarse to fine and
  grid points inside an already accepted mask are skipped.
* coverage passes (``coverage_passes``): after the grid, prompts are placed at the most
  interior pixels of large valid areas that no accepted mask covers, and decoded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from terrasam.amg_utils import (
    box_near_crop_edge,
    build_layer_point_grids,
    disk,
    fill_small_lowres,
    generate_crop_boxes,
    masks_to_boxes,
    nms,
    remove_small_regions,
    sample_uncovered_points,
)
from terrasam.errors import TerrasamError
from terrasam.malloc import fix_mmap_threshold
from terrasam.models.device import decode_batch_for
from terrasam.progress import report
from terrasam.tiling import MaskRecord, TileProfile

SAM2_FAMILIES = ("sam2", "sam3", "edgetam")
# bytes of upsampled logits per chunk: under glibc's 32 MiB mmap ceiling, so that each
# chunk reuses the freed memory of the last instead of page-faulting in fresh memory
_UPSCALE_BUDGET = 24 << 20
_PRUNE_STRIDES = (4, 2, 1)  # coarse-to-fine grid levels of prompt pruning


@dataclass
class AMGParams:
    """Every knob of the automatic mask generator, under its upstream name.

    The defaults are segment_anything's; use :meth:`for_family` for a model family's
    defaults (SAM 2 / SAM 3: ``pred_iou_thresh`` 0.8).
    """

    points_per_side: int | None = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    point_grids: list | None = None
    min_mask_region_area: int = 0
    use_m2m: bool = False
    multimask_output: bool = True
    # terrasam's own options
    fast: bool = False
    prompt_pruning: bool | None = None  # None: on when ``fast``
    coverage_passes: int = 0
    coverage_min_radius: float | None = None  # px; None: a quarter of the grid spacing
    nodata_max_fraction: float = 0.5
    decode_batch: int | None = None  # prompts per decoder call; None: set by the device

    @classmethod
    def for_family(cls, family: str, **overrides) -> AMGParams:
        """The family's upstream defaults ("sam", "sam_hq", "sam2", "sam3") with overrides."""
        if family not in ("sam", "sam_hq", *SAM2_FAMILIES):
            raise TerrasamError(f"unknown model family {family!r}; "
                                "expected one of sam, sam_hq, sam2, sam3")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}" if close else ""
                raise TerrasamError(f"unknown automatic mask generator option {key!r}{hint}")
        base = {"pred_iou_thresh": 0.8} if family in SAM2_FAMILIES else {}
        if overrides.get("point_grids") is not None and "points_per_side" not in overrides:
            base["points_per_side"] = None
        params = cls(**{**base, **overrides})
        params.validate()
        return params

    @property
    def pruning(self) -> bool:
        return self.fast if self.prompt_pruning is None else bool(self.prompt_pruning)

    def validate(self) -> None:
        """Raise TerrasamError (one sentence) for an impossible combination or value."""
        if (self.points_per_side is None) == (self.point_grids is None):
            raise TerrasamError("give exactly one of points_per_side and point_grids")
        ints = {"points_per_batch": 1, "crop_n_layers": 0, "crop_n_points_downscale_factor": 1,
                "min_mask_region_area": 0, "coverage_passes": 0}
        if self.points_per_side is not None:
            ints["points_per_side"] = 1
        if self.decode_batch is not None:
            ints["decode_batch"] = 1
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise TerrasamError(f"{name} must be an integer >= {lo}, not {v!r}")
        unit = ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh",
                "crop_overlap_ratio", "nodata_max_fraction")
        for name in (*unit, "stability_score_offset", "mask_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                raise TerrasamError(f"{name} must be a number, not {v!r}")
            if name in unit and not 0.0 <= v <= 1.0:
                raise TerrasamError(f"{name} must be between 0 and 1, not {v!r}")
        if self.stability_score_offset < 0:
            raise TerrasamError("stability_score_offset must be >= 0")
        if self.coverage_min_radius is not None and not self.coverage_min_radius > 0:
            raise TerrasamError("coverage_min_radius must be a positive number of pixels")
        for name in ("use_m2m", "multimask_output", "fast"):
            if not isinstance(getattr(self, name), bool):
                raise TerrasamError(f"{name} must be true or false")
        if self.prompt_pruning is not None and not isinstance(self.prompt_pruning, bool):
            raise TerrasamError("prompt_pruning must be true or false")
        if self.point_grids is not None:
            grids = self.point_grids
            if not isinstance(grids, (list, tuple)) or len(grids) < self.crop_n_layers + 1:
                raise TerrasamError(f"point_grids must be a list of {self.crop_n_layers + 1} "
                                    "point lists, one per crop layer")
            for g in grids:
                a = np.asarray(g, dtype=float) if _is_numeric(g) else None
                if a is None or a.ndim != 2 or a.shape[1] != 2 or not len(a) or \
                        a.min() < 0 or a.max() > 1:
                    raise TerrasamError("each point grid must be a non-empty list of [x, y] "
                                        "pairs normalised to [0, 1]")

    def layer_grids(self) -> list[np.ndarray]:
        """The normalised point grid of each crop layer."""
        if self.point_grids is not None:
            return [np.asarray(g, dtype=np.float64).reshape(-1, 2) for g in self.point_grids]
        return build_layer_point_grids(self.points_per_side, self.crop_n_layers,
                                       self.crop_n_points_downscale_factor)


def _is_numeric(g) -> bool:
    try:
        np.asarray(g, dtype=float)
        return True
    except (TypeError, ValueError):
        return False


# the profile is shared by every tile job; the generator's historical name stays
AMGProfile = TileProfile


@dataclass(frozen=True)
class AmgJob:
    """The tile job of ``segment``: automatic mask generation with ``params``."""

    params: AMGParams
    concepts: tuple[str, ...] = ("auto",)

    def __call__(self, adapter, rgb, valid, profile: TileProfile | None = None
                 ) -> list[MaskRecord]:
        return generate(adapter, rgb, self.params, valid=valid, profile=profile)

    def describe(self) -> dict:
        return {"job": "amg", "amg": dataclasses.asdict(self.params)}

    def new_profile(self) -> TileProfile:
        return TileProfile()


@dataclass(frozen=True)
class _Bits:
    """A boolean mask bit-packed and deflated while it waits for NMS: with thresholds at 0 a
    tile holds thousands of near-tile-sized candidates, 1 MB each as bytes; SAM's masks are
    smooth blobs, so their packed rows deflate well."""

    data: bytes  # zlib of np.packbits of the mask
    shape: tuple[int, int]

    @staticmethod
    def pack(mask: np.ndarray) -> _Bits:
        return _Bits(zlib.compress(np.packbits(mask, axis=None).tobytes(), 1), mask.shape)

    def unpack(self) -> np.ndarray:
        h, w = self.shape
        bits = np.frombuffer(zlib.decompress(self.data), dtype=np.uint8)
        return np.unpackbits(bits, count=h * w).reshape(h, w).view(bool)


@dataclass
class _Cands:
    """Accepted candidate masks with every per-mask field, filtered and joined together."""

    masks: list = field(default_factory=list)  # _Bits of masks cropped to the inclusive box
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))  # inclusive
    iou: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    stab: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    crops: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))

    def __len__(self) -> int:
        return len(self.masks)

    def take(self, idx) -> _Cands:
        idx = np.asarray(idx, dtype=np.int64)
        return _Cands([self.masks[i] for i in idx], self.boxes[idx], self.iou[idx],
                      self.stab[idx], self.points[idx], self.crops[idx])

    @staticmethod
    def join(parts: list[_Cands]) -> _Cands:
        parts = [p for p in parts if len(p)]
        if not parts:
            return _Cands()
        return _Cands([m for p in parts for m in p.masks],
                      *(np.concatenate([getattr(p, k) for p in parts])
                        for k in ("boxes", "iou", "stab", "points", "crops")))


class _Clock:
    def __init__(self, profile: AMGProfile, device: torch.device):
        self.profile = profile
        self.sync = device.type == "cuda"
        self.prompts = 1  # prompts the tile's grids hold, and those decoded so far
        self.decoded = 0

    def decoded_batch(self, n: int) -> None:
        """Count ``n`` decoded prompts and tell the progress bar (never a whole tile: what
        follows the last batch, NMS, still takes time)."""
        self.decoded += n
        report(min(0.95, self.decoded / self.prompts))

    def add(self, name: str, start: float) -> float:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        setattr(self.profile, name, getattr(self.profile, name) + now - start)
        return now


def generate(adapter, image: np.ndarray, params: AMGParams | None = None,
             valid: np.ndarray | None = None, profile: AMGProfile | None = None
             ) -> list[MaskRecord]:
    """Segment everything in an (H, W, 3) uint8 image; returns the masks in the reference
    generator's order. ``valid`` (H, W) bool marks pixels with data; ``profile`` (an
    AMGProfile) accumulates time, decoder calls, mask count and coverage."""
    fix_mmap_threshold()  # else the candidates' freed buffers stay with the process
    params = params if params is not None else AMGParams.for_family(adapter.family)
    params.validate()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise TerrasamError(f"the image must be an (H, W, 3) uint8 array, not {image.dtype} "
                            f"{image.shape}")
    h, w = image.shape[:2]
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != (h, w):
            raise TerrasamError(f"the valid mask is {valid.shape}, the image {(h, w)}")
        if valid.all():
            valid = None
    prof = profile if profile is not None else AMGProfile()
    clock = _Clock(prof, torch.device(getattr(adapter, "device", "cpu")))
    t0 = time.perf_counter()
    with torch.inference_mode():
        records = _generate(adapter, image, params, valid, clock)
    prof.total_s += time.perf_counter() - t0
    prof.tiles += 1
    prof.masks += len(records)
    if profile is not None:
        prof.count_coverage(records, valid, (h, w))
    return records


def _generate(adapter, image, params, valid, clock) -> list[MaskRecord]:
    h, w = image.shape[:2]
    crop_boxes, layers = generate_crop_boxes((h, w), params.crop_n_layers,
                                             params.crop_overlap_ratio)
    grids = params.layer_grids()
    clock.prompts = max(1, sum(len(grids[layer]) for layer in layers))
    parts = []
    for crop_box, layer in zip(crop_boxes, layers):
        x0, y0, x1, y1 = crop_box
        crop_valid = None if valid is None else valid[y0:y1, x0:x1]
        if crop_valid is not None and not crop_valid.any():
            continue
        job = _CropJob(adapter, image, crop_box, params, crop_valid, clock)
        parts.append(job.run(grids[layer]))
    data = _Cands.join(parts)
    t = time.perf_counter()
    if len(crop_boxes) > 1 and len(data):
        # prefer masks from smaller crops
        crop_t = torch.as_tensor(data.crops)
        scores = 1 / ((crop_t[:, 2] - crop_t[:, 0]) * (crop_t[:, 3] - crop_t[:, 1]))
        keep = nms(torch.as_tensor(data.boxes), scores, params.crop_nms_thresh)
        clock.profile.rejected_nms += len(data) - len(keep)
        data = data.take(keep)
    if params.min_mask_region_area > 0 and adapter.family not in SAM2_FAMILIES and len(data):
        before = len(data)
        data = _remove_small_regions(data, params.min_mask_region_area,
                                     max(params.box_nms_thresh, params.crop_nms_thresh), (h, w))
        clock.profile.rejected_nms += before - len(data)
    records = _to_records(data, valid)
    clock.add("post_s", t)
    return records


class _CropJob:
    """Decodes the prompts of one crop against its embedding and keeps accepted masks."""

    def __init__(self, adapter, image, crop_box, params: AMGParams, valid, clock: _Clock):
        self.adapter, self.params, self.valid, self.clock = adapter, params, valid, clock
        self.crop_box = list(crop_box)
        x0, y0, x1, y1 = crop_box
        self.image_box = [0, 0, image.shape[1], image.shape[0]]
        self.size = (y1 - y0, x1 - x0)
        t = time.perf_counter()
        self.emb = adapter.embed(np.ascontiguousarray(image[y0:y1, x0:x1]))
        clock.add("embed_s", t)
        clock.profile.embed_calls += 1
        self.covered = np.zeros(self.size, dtype=bool)  # union of accepted masks (crop pixels)
        # an explicit decode batch wins; else what the device's memory holds best
        self.batch = params.decode_batch or decode_batch_for(
            getattr(adapter, "device", "cpu"), params.points_per_batch)

    def run(self, grid: np.ndarray) -> _Cands:
        ch, cw = self.size
        points = grid * np.array([cw, ch], dtype=np.float64)
        if self.valid is not None:
            points = points[self._on(self.valid, points)]
        if self.params.pruning:
            parts = []
            level = _prune_levels(points)
            for lv in range(len(_PRUNE_STRIDES)):
                todo = points[level == lv]
                todo = todo[~self._on(self.covered, todo)]
                parts.append(self._decode(todo))
        else:
            parts = [self._decode(points)]
        parts += self._coverage_passes(len(grid))
        data = _Cands.join(parts)
        t = time.perf_counter()
        if len(data):
            keep = nms(torch.as_tensor(_nms_boxes(data.boxes)), torch.as_tensor(data.iou),
                       self.params.box_nms_thresh)
            self.clock.profile.rejected_nms += len(data) - len(keep)
            data = data.take(keep)
            x0, y0 = self.crop_box[:2]
            data.boxes = data.boxes + np.array([x0, y0, x0, y0])
            data.points = data.points + np.array([x0, y0], dtype=np.float64)
            data.crops = np.tile(np.asarray(self.crop_box, np.int64), (len(data), 1))
        self.clock.add("post_s", t)
        return data

    @staticmethod
    def _on(bitmap: np.ndarray, points: np.ndarray) -> np.ndarray:
        h, w = bitmap.shape
        cols = np.clip(np.floor(points[:, 0]).astype(np.int64), 0, w - 1)
        rows = np.clip(np.floor(points[:, 1]).astype(np.int64), 0, h - 1)
        return bitmap[rows, cols]

    def _coverage_passes(self, n_grid: int) -> list[_Cands]:
        p = self.params
        ch, cw = self.size
        spacing = math.sqrt(ch * cw / max(n_grid, 1))
        min_r = p.coverage_min_radius or max(spacing / 4, 2.0)
        tried = np.zeros(self.size, dtype=bool)
        parts = []
        for _ in range(p.coverage_passes):
            t = time.perf_counter()
            free = ~self.covered & ~tried
            if self.valid is not None:
                free &= self.valid
            points, radii = sample_uncovered_points(free, min_r, 2 * p.points_per_batch)
            self.clock.add("post_s", t)
            if not len(points):
                break
            for (x, y), r in zip(points, radii):
                # only near the prompt: the rest of its region may hold other objects
                ys, xs, foot = disk(self.size, x, y, max(min_r, r / 2))
                tried[ys, xs] |= foot
            parts.append(self._decode(points))
        return parts

    def _decode(self, points: np.ndarray) -> _Cands:
        parts = []
        for start in range(0, len(points), self.batch):
            parts.append(self._decode_batch(points[start:start + self.batch]))
            self.clock.decoded_batch(len(points[start:start + self.batch]))
        return _Cands.join(parts)

    def _call(self, pts: np.ndarray, mask_inputs=None, multimask=True, iou_thresh=None):
        t = time.perf_counter()
        hint = {} if iou_thresh is None else {"iou_thresh": iou_thresh}
        logits, iou = self.adapter.decode(
            self.emb, points=pts[:, None, :], point_labels=np.ones((len(pts), 1), np.int64),
            mask_inputs=mask_inputs, multimask=multimask, **hint)
        self.clock.add("decode_s", t)
        self.clock.profile.decoder_calls += len(pts)
        return logits, iou

    def _decode_batch(self, pts: np.ndarray) -> _Cands:
        p = self.params
        # the IoU filter comes right after this decode (after the refinement with m2m): the
        # adapter may skip the logits of masks it will drop
        hint = p.pred_iou_thresh if p.pred_iou_thresh > 0.0 else None
        logits, iou = self._call_checked(pts, p.multimask_output, None if p.use_m2m else hint)
        m = iou.shape[1]
        logits, iou = logits.flatten(0, 1), iou.flatten(0, 1).float()
        pts = np.repeat(pts, m, axis=0)  # point-major, mask-minor, like the references
        if p.use_m2m:
            # one refinement step per candidate, its clamped low-res logits as mask input
            new_logits, new_iou = [], []
            for s in range(0, len(pts), self.batch):
                lo, io = self._call_checked(
                    pts[s:s + self.batch], False, hint,
                    mask_inputs=logits[s:s + self.batch, None].clamp(-32.0, 32.0))
                new_logits.append(lo[:, 0])
                new_iou.append(io[:, 0])
            logits, iou = torch.cat(new_logits), torch.cat(new_iou).float()
        t, upscale_before = time.perf_counter(), self.clock.profile.upscale_s
        keep = torch.arange(len(iou), device=iou.device)
        if p.pred_iou_thresh > 0.0:
            keep = keep[iou > p.pred_iou_thresh]
        self.clock.profile.candidates += len(iou)
        self.clock.profile.rejected_iou += len(iou) - len(keep)
        h, w = self.size
        chunk = max(1, _UPSCALE_BUDGET // (4 * h * w))
        iou_np, out = iou.cpu().numpy(), []
        for idx in keep.split(chunk):
            if not len(idx):
                continue
            if int(idx[-1] - idx[0]) == len(idx) - 1:  # a run: a view, no gather
                idx = slice(int(idx[0]), int(idx[-1]) + 1)
            else:
                idx = idx.cpu().numpy()
            out.append(self._accept(logits[idx], iou_np[idx], pts[idx]))
        self.clock.add("post_s", t)
        self.clock.profile.post_s -= self.clock.profile.upscale_s - upscale_before
        return _Cands.join(out)

    def _call_checked(self, pts, multimask, hint, mask_inputs=None):
        """Decode with the IoU hint; should the adapter have skipped a mask that passes the
        filter (its own rounding of the threshold), decode again without the hint."""
        logits, iou = self._call(pts, mask_inputs=mask_inputs, multimask=multimask,
                                 iou_thresh=hint)
        if hint is not None:
            kept = iou.float() > hint
            if kept.any() and bool(torch.isneginf(logits[kept].flatten(1).amax(1)).any()):
                logits, iou = self._call(pts, mask_inputs=mask_inputs, multimask=multimask)
        return logits, iou

    def _accept(self, low: torch.Tensor, iou: np.ndarray, pts: np.ndarray) -> _Cands:
        """Upsample survivors of the IoU filter, score, threshold, box, keep the good ones."""
        p = self.params
        if p.min_mask_region_area > 0 and self.adapter.family in SAM2_FAMILIES:
            low = fill_small_lowres(low, p.min_mask_region_area, self.adapter.mask_threshold)
        t = time.perf_counter()
        up = self.adapter.upscale(low, self.emb)
        self.clock.add("upscale_s", t)
        thr, off = p.mask_threshold, p.stability_score_offset
        if up.device.type == "cpu":
            up = up.detach().float().contiguous()
            rmax = up.amax(dim=2).numpy()  # row maxima in torch: threaded, faster than numpy
            up = up.numpy()
            stab, boxes = _mask_stats(up, rmax, thr, off)
            thr = np.float32(thr)  # numpy compares float32 maps with it as torch does
        else:
            stab, boxes = _mask_stats_torch(up, thr, off)
        ok = ~np.isnan(stab)  # empty at both cut-offs: an empty mask
        if p.stability_score_thresh > 0.0:
            ok &= stab >= np.float32(p.stability_score_thresh)
        ok &= boxes[:, 2] >= 0  # empty masks interact with nothing in NMS: dropped early
        idx = np.flatnonzero(ok)
        profile = self.clock.profile
        profile.rejected_stability += len(ok) - len(idx)
        if len(idx):
            n = len(idx)
            idx = idx[~box_near_crop_edge(boxes[idx], self.crop_box, self.image_box)]
            profile.rejected_edge += n - len(idx)
        track = self.params.pruning or self.params.coverage_passes > 0
        keep, crops = [], []
        for i in idx:
            x0, y0, x1, y1 = (int(v) for v in boxes[i])
            crop = up[i, y0:y1 + 1, x0:x1 + 1] > thr
            if isinstance(crop, torch.Tensor):
                crop = crop.cpu().numpy()
            if self.valid is not None:
                bad = np.count_nonzero(crop & ~self.valid[y0:y1 + 1, x0:x1 + 1])
                if bad > p.nodata_max_fraction * np.count_nonzero(crop):
                    profile.rejected_nodata += 1
                    continue
            if track:
                self.covered[y0:y1 + 1, x0:x1 + 1] |= crop
            keep.append(i)
            crops.append(_Bits.pack(crop))
        keep = np.asarray(keep, dtype=np.int64)
        return _Cands(crops, boxes[keep].reshape(-1, 4), iou[keep],
                      stab[keep], pts[keep], np.zeros((len(keep), 4), np.int64))


def _mask_stats(u: np.ndarray, rmax: np.ndarray, thr: float, off: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Stability score (NaN when empty at both cut-offs) and the inclusive box of the mask
    at ``thr`` ((-1, -1, -1, -1) when empty) of each (H, W) logit map of a CPU chunk.

    Each count only looks at the window of its own cut-off, found from the row maxima
    ``rmax`` (N, H) and the column maxima over the low cut's rows (no row outside them
    exceeds any cut): the high cut's window lies inside the mask's, inside the low cut's.
    Comparisons are in float32, like the references' tensor-with-scalar comparisons.
    """
    n = len(u)
    lo_c, thr_c, hi_c = (np.float32(v) for v in (thr - off, thr, thr + off))
    buf = np.empty(u.shape[1] * u.shape[2], dtype=bool)
    stab = np.full(n, np.nan, dtype=np.float32)
    boxes = np.full((n, 4), -1, dtype=np.int64)
    for i in range(n):
        r = np.flatnonzero(rmax[i] > lo_c)
        if not len(r):
            continue
        cmax = u[i, r[0]:r[-1] + 1].max(axis=0)
        counts = []
        for cut in (lo_c, hi_c):
            r, c = np.flatnonzero(rmax[i] > cut), np.flatnonzero(cmax > cut)
            if not len(r):
                counts.append(0)
                continue
            win = u[i, r[0]:r[-1] + 1, c[0]:c[-1] + 1]
            b = buf[:win.size].reshape(win.shape)
            np.greater(win, cut, out=b)
            counts.append(np.count_nonzero(b))
        if counts[0]:
            stab[i] = np.float32(counts[1]) / np.float32(counts[0])
        r, c = np.flatnonzero(rmax[i] > thr_c), np.flatnonzero(cmax > thr_c)
        if len(r):
            boxes[i] = (c[0], r[0], c[-1], r[-1])
    return stab, boxes


def _mask_stats_torch(up: torch.Tensor, thr: float, off: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """_mask_stats for a chunk on an accelerator: whole-chunk reductions, no per-mask loop."""
    up = up.float()
    high = (up > thr + off).flatten(1).sum(1)
    low = (up > thr - off).flatten(1).sum(1)
    stab = (high.float() / low.float()).cpu().numpy()  # 0 / 0: NaN
    boxes = masks_to_boxes(up > thr).cpu().numpy()
    empty = ~(up.flatten(1).amax(1) > thr).cpu().numpy()
    boxes[empty] = -1
    return stab, boxes


def _prune_levels(points: np.ndarray) -> np.ndarray:
    """Coarse-to-fine level of each point: level k holds the points on the sub-lattice of
    stride _PRUNE_STRIDES[k] (by rank of the distinct x and y values) not in a coarser one."""
    if not len(points):
        return np.zeros(0, dtype=np.int64)
    rx = np.unique(points[:, 0], return_inverse=True)[1].ravel()
    ry = np.unique(points[:, 1], return_inverse=True)[1].ravel()
    level = np.full(len(points), len(_PRUNE_STRIDES) - 1, dtype=np.int64)
    for k in range(len(_PRUNE_STRIDES) - 2, -1, -1):
        s = _PRUNE_STRIDES[k]
        on = (rx % s == s // 2) & (ry % s == s // 2)
        level[on] = k
    return level


def _remove_small_regions(data: _Cands, min_area: int, nms_thresh: float,
                          size: tuple[int, int]) -> _Cands:
    """segment_anything's post-processing: fill small holes, drop small islands, then
    re-run NMS preferring masks that did not change."""
    masks, boxes, unchanged = [], [], []
    for bits, box in zip(data.masks, data.boxes):
        mask, box, changed = _clean_mask(bits.unpack(), box, min_area, size)
        masks.append(_Bits.pack(mask))
        boxes.append(box)
        unchanged.append(0.0 if changed else 1.0)
    boxes = np.asarray(boxes, dtype=np.int64)
    keep = nms(torch.as_tensor(boxes), torch.tensor(unchanged), nms_thresh).numpy()
    out = data.take(keep)
    out.masks = [masks[i] for i in keep]
    out.boxes = boxes[keep]
    return out


def _clean_mask(mask: np.ndarray, box: np.ndarray, min_area: int, size: tuple[int, int]):
    """Holes then islands on a mask cropped to its inclusive box; exact as on the full image.

    The background outside the box is represented by a one-pixel pad on every side that is
    not an image edge; each connected piece of that outside area counts with its true area.
    """
    h, w = size
    x0, y0, x1, y1 = (int(v) for v in box)
    pads = (y0 > 0, y1 < h - 1, x0 > 0, x1 < w - 1)  # top, bottom, left, right
    padded = np.pad(mask, ((int(pads[0]), int(pads[1])), (int(pads[2]), int(pads[3]))),
                    constant_values=False)
    inner = np.zeros(padded.shape, dtype=bool)
    inner[int(pads[0]):padded.shape[0] - int(pads[1]),
          int(pads[2]):padded.shape[1] - int(pads[3])] = True
    labels, n = ndimage.label(~padded, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels[inner], minlength=n + 1).astype(np.int64)
    eight = np.ones((3, 3), bool)
    pad_labels, n_pieces = ndimage.label(~inner, structure=eight)
    if n_pieces == 1:
        areas = [h * w - (x1 - x0 + 1) * (y1 - y0 + 1)]
    elif x0 == 0 and x1 == w - 1:  # the box spans the width: a part above, a part below
        areas = [w * y0, w * (h - 1 - y1)]
    else:  # the box spans the height: a part left, a part right
        areas = [h * x0, h * (w - 1 - x1)]
    pieces = [(tuple(np.argwhere(pad_labels == k + 1)[0]), areas[k]) for k in range(n_pieces)]
    for (r, c), area in pieces:
        sizes[labels[r, c]] += area
    sizes[0] = np.iinfo(np.int64).max  # label 0: mask pixels, never a hole
    small = sizes < min_area
    if any(small[labels[r, c]] for (r, c), _ in pieces):
        # the whole outside area is a "hole": only the full-image computation says what
        full = np.zeros(size, dtype=bool)
        full[y0:y1 + 1, x0:x1 + 1] = mask
        full, c1 = remove_small_regions(full, min_area, "holes")
        full, c2 = remove_small_regions(full, min_area, "islands")
        nb = masks_to_boxes(torch.from_numpy(full)[None])[0].numpy()
        return full[nb[1]:nb[3] + 1, nb[0]:nb[2] + 1].copy(), nb, c1 or c2
    changed = bool(small[labels[inner]].any())
    if changed:
        mask = mask | small[labels][inner].reshape(mask.shape)
    mask, c2 = remove_small_regions(mask, min_area, "islands")
    if not (changed or c2):
        return mask, np.asarray(box), False
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1], cols[0], cols[-1]
    new_box = np.array([x0 + c0, y0 + r0, x0 + c1, y0 + r1], dtype=np.int64)
    return mask[r0:r1 + 1, c0:c1 + 1].copy(), new_box, True


def _nms_boxes(boxes: np.ndarray) -> np.ndarray:
    """Inclusive boxes for NMS, as the reference has them, except that a box one pixel wide
    or tall is widened by a pixel: with zero area it would overlap nothing, not even itself."""
    flat = (boxes[:, 2] == boxes[:, 0]) | (boxes[:, 3] == boxes[:, 1])
    if not flat.any():
        return boxes
    out = boxes.copy()
    out[flat, 2:] += 1
    return out


def _to_records(data: _Cands, valid: np.ndarray | None) -> list[MaskRecord]:
    records = []
    for i in range(len(data)):
        mask = data.masks[i].unpack()
        x0, y0, x1, y1 = (int(v) for v in data.boxes[i])
        if valid is not None:
            mask = mask & valid[y0:y1 + 1, x0:x1 + 1]
            if not mask.any():
                continue
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            mask = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            x0, y0, x1, y1 = x0 + cols[0], y0 + rows[0], x0 + cols[-1], y0 + rows[-1]
        records.append(MaskRecord(
            mask=mask, bbox=(int(x0), int(y0), int(x1) + 1, int(y1) + 1),
            area=int(np.count_nonzero(mask)), predicted_iou=float(data.iou[i]),
            stability_score=float(data.stab[i]),
            point=(float(data.points[i, 0]), float(data.points[i, 1])),
            crop_box=tuple(int(v) for v in data.crops[i])))
    return records
