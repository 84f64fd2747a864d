#!/usr/bin/env bash
# Device check of stage two, for one run on a lent H100/H200 (about 2-4 minutes):
#   1. the GPU test of tests/stages/test_train.py (bf16, fused attention, fused AdamW, pinned copies, resume),
#   2. bench/bench_train.py: UNet-only vs cached vs online step at B=16, features-only samples/s at B=256,
#   3. a summary; bench/results/train_*.csv and the log are copied to $OUT.
# Run from anywhere: bash bench/gpu_check_train.sh. Needs what sur-cache needs (torch, diffusers, transformers,
# accelerate, zarr, numcodecs, fsspec, safetensors, click, tqdm, pillow, matplotlib); pytest for step 1.
# Each step has its own time limit, so that one slow step cannot use the whole device budget.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-}
LOG=$(mktemp)
exec > >(tee "$LOG") 2>&1
started=$SECONDS
export HF_HUB_OFFLINE=1

step() { echo; echo "=== $1 ($((SECONDS - started)) s elapsed)"; }
copy_out() {  # on every exit, so that a failed or cut-short run still returns what it wrote
  if [ -n "$OUT" ]; then
    mkdir -p "$OUT/results"
    cp bench/results/train_*.csv "$OUT/results/" 2>/dev/null
    cp "$LOG" "$OUT/gpu_check_train.log"
  fi
}
trap copy_out EXIT

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, diffusers, accelerate, zarr; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__, 'zarr', zarr.__version__)"

# pyproject maps stages/ and kernels/ into sur_cache; without an installed package, a shim of symlinks does the same.
if ! (cd / && "$PYTHON" -c "import sur_cache.stages.train" 2>/dev/null); then
  shim=$(mktemp -d)
  mkdir -p "$shim/sur_cache"
  ln -s "$PWD"/sur_cache/* "$shim/sur_cache/"
  ln -s "$PWD/kernels" "$shim/sur_cache/kernels"
  ln -s "$PWD/stages" "$shim/sur_cache/stages"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  echo "sur_cache not installed: using the symlink shim $shim"
fi

step "GPU test of the trainer"
tests_status="not run (pytest missing)"
if "$PYTHON" -c "import pytest" 2>/dev/null; then
  timeout 180 "$PYTHON" -P -m pytest -m gpu tests/stages/test_train.py -q -p no:cacheprovider -rfE
  code=$?
  tests_status=$([ "$code" = 0 ] && echo "passed" || echo "FAILED (exit $code)")
fi

step "benchmark: unet_only / cached / online at B=16, features-only at B=256"
timeout 240 "$PYTHON" -P bench/bench_train.py
bench_status=$?

step "summary"
echo "GPU test: $tests_status"
echo "benchmark: exit $bench_status (124 = hit its time limit)"
ls -la bench/results/train_*.csv 2>/dev/null
echo "total $((SECONDS - started)) s"
