"""TextJob: every instance of one or more text concepts on one tile (SAM 3).

One image embedding per tile serves every concept; each concept's instances become mask
records whose ``concept`` is the concept's index, so the pipeline stitches each concept on
its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from terrasam.errors import TerrasamError
from terrasam.tiling import MaskRecord, TileProfile, records_from_masks


@dataclass(frozen=True)
class TextJob:
    """The tile job of ``prompt --text``: SAM 3 instances of each concept."""

    concepts: tuple[str, ...]
    score_threshold: float = 0.5
    mask_threshold: float = 0.5

    def __post_init__(self):
        concepts = tuple(str(c).strip() for c in self.concepts)
        if not concepts or any(not c for c in concepts):
            raise TerrasamError("a text prompt must not be empty.")
        object.__setattr__(self, "concepts", concepts)

    def __call__(self, adapter, rgb, valid, profile: TileProfile | None = None
                 ) -> list[MaskRecord]:
        import torch

        t0 = time.perf_counter()
        records: list[MaskRecord] = []
        with torch.inference_mode():
            embedding = adapter.embed(rgb)
            t1 = time.perf_counter()
            for k, text in enumerate(self.concepts):
                dets = adapter.segment_text(rgb, text, score_threshold=self.score_threshold,
                                            mask_threshold=self.mask_threshold,
                                            embedding=embedding)
                records += records_from_masks([d["mask"] for d in dets],
                                              [d["score"] for d in dets], valid, concept=k)
        if profile is not None:
            t2 = time.perf_counter()
            profile.embed_s += t1 - t0
            profile.decode_s += t2 - t1
            profile.total_s += t2 - t0
            profile.tiles += 1
            profile.embed_calls += 1
            profile.masks += len(records)
            profile.count_coverage(records, valid, rgb.shape[:2])
        return records

    def describe(self) -> dict:
        return {"job": "text", "concepts": list(self.concepts),
                "score_threshold": self.score_threshold, "mask_threshold": self.mask_threshold}

    def new_profile(self) -> TileProfile:
        return TileProfile()
