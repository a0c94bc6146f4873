"""Point and box prompts on a georeferenced raster, given in any CRS.

* :mod:`~terrasam.prompts.sources`: prompts from the command line, vector files or frames,
  reprojected from their own CRS into the raster's pixel grid;
* :mod:`~terrasam.prompts.windows`: the window the model sees for each prompt (nearby prompts
  share one, and one image embedding);
* :mod:`~terrasam.prompts.decode`: decoding the prompts of each window, growing a window when
  an object runs past its edge.

:func:`terrasam.prompt` wires them; text prompts (SAM 3) run through the tiled pipeline.
"""

from __future__ import annotations

from terrasam.prompts.decode import MAX_DOWNSAMPLE, PARTS, run_point_box
from terrasam.prompts.sources import (
    PROMPT_TYPES,
    Prompt,
    Report,
    collect_prompts,
    parse_box,
    parse_point,
)
from terrasam.prompts.windows import WindowPlan, clip_prompts, plan_window, plan_windows

__all__ = ["MAX_DOWNSAMPLE", "PARTS", "PROMPT_TYPES", "Prompt", "Report", "WindowPlan",
           "clip_prompts", "collect_prompts", "parse_box", "parse_point", "plan_window",
           "plan_windows", "run_point_box"]
