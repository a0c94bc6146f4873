"""TextJob: every instance of one or more concepts on one tile (SAM 3).

A concept is a text, or a prompt made once from box exemplars (with or without a text):
its tokens were encoded on the exemplars' own window, and the same tokens are given to
every tile's detector run, so objects like the exemplars are found over the whole raster.
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
    # per concept: None (a text, tokenised on the worker) or a ConceptPrompt made once
    # (terrasam.models.sam3: text and/or exemplar tokens, CPU tensors)
    prompts: tuple = ()
    # what the exemplar concepts were made from (the work directory's key, provenance)
    exemplars: tuple = ()

    def __post_init__(self):
        concepts = tuple(str(c).strip() for c in self.concepts)
        if not concepts or any(not c for c in concepts):
            raise TerrasamError("a text prompt must not be empty.")
        object.__setattr__(self, "concepts", concepts)
        prompts = tuple(self.prompts) or (None,) * len(concepts)
        if len(prompts) != len(concepts):
            raise ValueError("one prompt (or None) per concept")
        object.__setattr__(self, "prompts", prompts)

    def __call__(self, adapter, rgb, valid, profile: TileProfile | None = None
                 ) -> list[MaskRecord]:
        import torch

        t0 = time.perf_counter()
        records: list[MaskRecord] = []
        with torch.inference_mode():
            embedding = adapter.embed(rgb)
            t1 = time.perf_counter()
            for k, (text, made) in enumerate(zip(self.concepts, self.prompts)):
                if made is None:
                    dets = adapter.segment_text(rgb, text, score_threshold=self.score_threshold,
                                                mask_threshold=self.mask_threshold,
                                                embedding=embedding)
                else:
                    dets = adapter.segment_concept(rgb, made,
                                                   score_threshold=self.score_threshold,
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
        out = {"job": "text", "concepts": list(self.concepts),
               "score_threshold": self.score_threshold, "mask_threshold": self.mask_threshold}
        if self.exemplars:
            out["exemplars"] = [dict(e) for e in self.exemplars]
        return out

    def new_profile(self) -> TileProfile:
        return TileProfile()
