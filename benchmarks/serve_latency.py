"""Click-to-polygon latency of `terrasam serve`, over real HTTP, as the page asks for it.

A full-size model with random weights in Meta's format (nothing is downloaded) serves a raster
(default: ``../shared/data/naip_2020_5m.tif``, else a synthetic 2048 px scene). Measured per
click, from sending ``POST /api/segment`` to the polygon parsed from the answer:

* first click: nothing embedded yet (background prefetch off), so image encoder + decoder;
* next clicks: other points of the same window, the embedding comes from the cache;
* after prefetch (rasters larger than two windows): a click in a window the background
  thread embedded while the "user" looked at it.

"in the model" is the time spent in the image encoder and mask decoder; the rest is reading,
vectorising the mask into its exact pixel-edge polygon, cleaning it, and JSON over HTTP.
Random weights give noise masks, i.e. polygons with very many vertices: their vectorising
costs far more than a trained model's smooth masks do.

    python benchmarks/serve_latency.py                         # sam2.1-hiera-tiny, 5 next clicks
    python benchmarks/serve_latency.py --model sam-vit-b --clicks 9 --raster ortho.tif
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "naip_2020_5m.tif"


def _post(url: str, token: str, body: dict) -> tuple[float, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "X-Terrasam-Token": token})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    return time.perf_counter() - t0, out


def _synthetic(path: Path) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import synth

    synth.make_scene(2048, 2048, path=path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sam2.1-hiera-tiny")
    ap.add_argument("--raster", type=Path, default=None)
    ap.add_argument("--clicks", type=int, default=5, help="next clicks in the same window")
    ap.add_argument("--dir", type=Path, default=None, help="where the checkpoint is written")
    args = ap.parse_args()

    from pyproj import Transformer

    from terrasam.serve.app import Server, create_app
    from terrasam.serve.session import Session
    from terrasam.testing import random_checkpoint

    work = Path(args.dir or tempfile.mkdtemp(prefix="terrasam-serve-bench-"))
    raster = args.raster or (SHARED if SHARED.exists() else _synthetic(work / "scene.tif"))
    ckpt = random_checkpoint(args.model, work / "ckpt", size="full", format="meta")
    t0 = time.perf_counter()
    session = Session(raster, checkpoint=ckpt, device="cpu", dtype="float32")
    load_s = time.perf_counter() - t0
    server = Server(create_app(session), "127.0.0.1", 0).start()
    try:
        with urllib.request.urlopen(server.url + "api/info") as r:
            info = json.loads(r.read())
        to_lonlat = Transformer.from_crs(session.crs, "EPSG:4326", always_xy=True)
        size = session.image_size
        w, h = session.width, session.height
        rng = np.random.default_rng(0)
        # clicks in the first window (top-left), away from its edges
        span_x, span_y = min(w, size), min(h, size)

        def click(col, row):
            x, y = session._reader.transform @ (col, row)
            lon, lat = to_lonlat.transform(x, y)
            return _post(server.url + "api/segment", info["token"],
                         {"points": [{"lon": lon, "lat": lat, "label": 1}]})

        def spot(x0, y0, sx, sy):
            return (x0 + sx * rng.uniform(0.3, 0.45), y0 + sy * rng.uniform(0.3, 0.45))

        def row(name, results):
            return (name, [s for s, _ in results],
                    [o["timing"]["model_s"] for _, o in results],
                    [o["timing"]["embeddings_computed"] for _, o in results],
                    [len(json.dumps(o["feature"])) if o["feature"] else 0 for _, o in results])

        rows = [row("first click (embedding + decoder)", [click(*spot(0, 0, span_x, span_y))])]
        rows.append(row(f"next clicks, same window (median of {args.clicks})",
                        [click(*spot(0, 0, span_x, span_y)) for _ in range(args.clicks)]))
        if w > 2 * size or h > 2 * size:
            # the "user" pans to the far corner; the page asks for a prefetch, waits, clicks
            cx, cy = w - size // 2, h - size // 2
            (lo0, la0), (lo1, la1) = (to_lonlat.transform(*(session._reader.transform @ p))
                                      for p in ((cx - 200, cy + 200), (cx + 200, cy - 200)))
            _post(server.url + "api/prefetch", info["token"],
                  {"bounds": {"west": min(lo0, lo1), "south": min(la0, la1),
                              "east": max(lo0, lo1), "north": max(la0, la1)}})
            while session.status()["prefetch_pending"]:
                time.sleep(0.05)
            rows.append(row("first click after background prefetch", [click(cx + 10, cy + 10)]))
    finally:
        server.stop()
        session.close()

    print(f"\nmodel {args.model} (full size, random weights), raster {raster.name} "
          f"({w} x {h} px), model load {load_s:.1f} s\n")
    print("| click | click to polygon (s) | of which in the model (s) | windows embedded | "
          "polygon GeoJSON (kB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, times, model, n, size in rows:
        print(f"| {name} | {statistics.median(times):.3f} | {statistics.median(model):.3f} | "
              f"{max(n)} | {statistics.median(size) / 1000:.0f} |")


if __name__ == "__main__":
    main()
