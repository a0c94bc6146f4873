"""Regenerate the Meta key->shape fixtures from the official packages (not run by the tests).

    python -m pip install --no-deps --target /tmp/metakeys segment-anything==1.0 \
        segment-anything-hq==0.3
    PYTHONPATH=/tmp/metakeys:/tmp/stubs python tests/data/meta_keys/generate.py

/tmp/stubs holds empty stand-ins for `torchvision.transforms.functional` (resize,
to_pil_image), `torchvision.ops.boxes` (batched_nms, box_area) and `timm.models.layers` /
`timm.models.registry` (imported by SAM-HQ's TinyViT file): only the model classes are built,
on torch's meta device, so no weights are created or downloaded.
"""

import importlib
import json
from pathlib import Path

import torch

PACKAGES = [("segment-anything==1.0", "segment_anything", "sam"),
            ("segment-anything-hq==0.3", "segment_anything_hq", "sam_hq")]


def main() -> None:
    out = Path(__file__).parent
    for package, module, prefix in PACKAGES:
        build = importlib.import_module(f"{module}.build_sam")
        for variant in ("vit_b", "vit_l", "vit_h"):
            with torch.device("meta"):
                model = getattr(build, f"build_sam_{variant}")(checkpoint=None)
            keys = {k: list(t.shape) for k, t in sorted(model.state_dict().items())}
            lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items()]
            source = (f"{package} build_sam_{variant}(checkpoint=None).state_dict() on the meta "
                      "device; see generate.py")
            text = "{\n" + f'  "_source": {json.dumps(source)},\n  "keys": {{\n'
            text += ",\n".join("  " + line for line in lines) + "\n  }\n}\n"
            (out / f"{prefix}_{variant}.json").write_text(text)


if __name__ == "__main__":
    main()
