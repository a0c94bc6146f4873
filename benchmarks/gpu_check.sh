#!/usr/bin/env bash
# The GPU path in one go, on a CUDA machine with Python 3.12 and no internet: install the
# wheels carried in .whl/ (made by benchmarks/gpu_wheels.sh), run the tests marked `cuda`,
# time encoder / decoder / AMG per 1024 px tile (gpu_bench.py) and run `segment` on the
# sample raster end to end. Prints one table; ends in one line where it cannot run.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to use another interpreter
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # the same steps on the CPU, smaller
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
START=$SECONDS
LIMIT=${GPU_CHECK_LIMIT_S:-470}  # the whole check stays under 8 minutes

fail() { echo "gpu_check: $*" >&2; exit 1; }

command -v "$PY" >/dev/null 2>&1 || fail "no $PY on this machine"
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "$DRY" = 1 ]; then DEVICE=cpu; BENCH=(--models sam2.1-hiera-tiny --modes fp32 --runs 1)
else DEVICE=cuda; BENCH=(--runs 3); fi
[ "$DRY" = 1 ] || why=$("$PY" - <<'PYEOF' 2>&1
try:
    import torch
except Exception as exc:
    print(f"PyTorch does not import here ({type(exc).__name__}); install a CUDA build first")
    raise SystemExit(1)
if not torch.cuda.is_available():
    print(f"PyTorch {torch.__version__} sees no CUDA GPU here; run this on a CUDA machine")
    raise SystemExit(1)
PYEOF
) || fail "$(echo "$why" | tail -n 1)"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import rasterio, pyogrio, geopandas, exactextract, folium" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 \
    || fail "no wheels in .whl/; run benchmarks/gpu_wheels.sh where there is internet and carry .whl/"
  SITE=${GPU_CHECK_SITE:-/tmp/terrasam-gpu-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl >/tmp/gpu_check_pip.log 2>&1 \
    || fail "installing the carried wheels failed: $(tail -n 1 /tmp/gpu_check_pip.log)"
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
"$PY" -c "import terrasam, rasterio, pyogrio, geopandas" 2>/tmp/gpu_check_import.log \
  || fail "terrasam does not import: $(tail -n 1 /tmp/gpu_check_import.log)"

left() { echo $(( LIMIT - (SECONDS - START) )); }
rows=()
step() {  # step NAME COMMAND...: run with the time left, keep its last line for the table
  local name=$1; shift
  local t0=$SECONDS out rc
  out=$(timeout "$(left)" "$@" 2>&1); rc=$?
  echo "$out"
  local last; last=$(echo "$out" | grep -v '^\s*$' | tail -n 1)
  if [ $rc -eq 0 ]; then rows+=("| $name | ok: ${last:0:90} | $((SECONDS - t0)) |")
  elif [ $rc -eq 124 ]; then rows+=("| $name | TIMED OUT | $((SECONDS - t0)) |")
  else rows+=("| $name | FAILED ($rc): ${last:0:90} | $((SECONDS - t0)) |"); fi
}

step "tests marked cuda" "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py -ra
step "encoder / decoder / AMG timings" "$PY" benchmarks/gpu_bench.py --device "$DEVICE" "${BENCH[@]}"
WORK=$(mktemp -d)
step "random full-size sam2.1-hiera-tiny checkpoint" "$PY" -c \
  "from terrasam.testing import random_checkpoint; print(random_checkpoint('sam2.1-hiera-tiny', '$WORK/ckpt', size='full'))"
SAMPLE=$("$PY" -c "import terrasam; print(terrasam.sample_raster())" 2>/dev/null)
step "segment on the sample raster" "$PY" -m terrasam segment "$SAMPLE" -o "$WORK/sample.gpkg" \
  --checkpoint "$WORK/ckpt" --model sam2.1-hiera-tiny --device "$DEVICE"
rm -rf "$WORK"

echo
echo "| step | result | seconds |"
echo "| --- | --- | ---: |"
printf '%s\n' "${rows[@]}"
echo "total: $((SECONDS - START)) s"
for r in "${rows[@]}"; do case $r in *"| ok:"*) ;; *) exit 1;; esac; done
