#!/usr/bin/env bash
# Download, on a machine with internet, the wheels benchmarks/gpu_check.sh installs on a CUDA
# machine without internet (CPython 3.12, x86-64 Linux) into .whl/ at the repository root.
# PyTorch, transformers, numpy, scipy, pillow, pyarrow and the rest are expected there already;
# versions are pinned so the whole set stays under 60 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  rasterio==1.4.3 pyogrio==0.10.0 pyproj==3.7.2 shapely==2.2.0 geopandas==1.2.0 \
  exactextract==0.3.0 affine==3.0.1 cligj==0.7.2 click-plugins==1.1.1.2 \
  folium==0.20.0 branca==0.8.2 xyzservices==2026.9.1 django-js-lib-leaflet==1.9.4.1
du -sh .whl
