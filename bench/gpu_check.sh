#!/usr/bin/env bash
# Device check of the fused attention-calibration kernel, for one run on a lent H100/H200 (about 4 minutes expected,
# 8 at most: the three steps are capped at 150 + 210 + 120 s):
#   1. the GPU-marked kernel tests (fp16/bf16 within 2x PyTorch's error, edge shapes, determinism),
#   2. the benchmark without torch.compile (core, whole adapter, profiler traces), then torch.compile alone,
#   3. a summary; bench/results/ (CSV, traces, the PNG where matplotlib exists) and the log are copied to $OUT.
# Run from anywhere: bash bench/gpu_check.sh. Needs torch, triton, click, safetensors; pytest for step 1 (add its
# wheels: pytest pluggy iniconfig), and what sur_cache.adapter imports for the adapter rows.
# Each step has its own time limit, so that one slow step cannot use the whole device budget.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=$(command -v "${PYTHON:-python3}")
[[ $PYTHON == /* ]] || PYTHON="$PWD/$PYTHON"  # absolute (some checks run from /), symlinks kept (a venv's python)
OUT=${OUT:-}
[ -n "$OUT" ] && mkdir -p "$OUT"
LOG=${OUT:+$OUT/gpu_check.log}
exec > >(tee "${LOG:-/dev/null}") 2>&1
started=$SECONDS

step() { echo; echo "=== $1 ($((SECONDS - started)) s elapsed)"; }
copy_out() {  # on every exit, so that a failed or cut-short run still returns what it wrote
  if [ -n "$OUT" ]; then
    mkdir -p "$OUT/results"
    cp -r bench/results/. "$OUT/results/" 2>/dev/null
  fi
}
trap copy_out EXIT

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# pyproject maps kernels/ to sur_cache.kernels; without an installed package, a shim folder of symlinks does the same.
if ! (cd / && "$PYTHON" -c "import sur_cache.kernels" 2>/dev/null); then
  shim=$(mktemp -d)
  mkdir -p "$shim/sur_cache"
  ln -s "$PWD"/sur_cache/* "$shim/sur_cache/"
  ln -s "$PWD/kernels" "$shim/sur_cache/kernels"
  ln -s "$PWD/stages" "$shim/sur_cache/stages"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  echo "sur_cache not installed: using the symlink shim $shim"
fi
(cd / && "$PYTHON" -c "import sur_cache.kernels") || { echo "FATAL: cannot import sur_cache.kernels"; exit 1; }

step "GPU kernel tests"
tests_status="not run (pytest missing: install the wheels pytest, pluggy, iniconfig)"
if "$PYTHON" -c "import pytest" 2>/dev/null; then
  # -P keeps the repo root off sys.path (its sur_cache/ folder has no kernels/); --noconftest skips the tiny-model
  # fixtures of tests/conftest.py, which these tests do not use.
  timeout 150 "$PYTHON" -P -m pytest -m gpu tests/kernels -q --noconftest -p no:cacheprovider -rfE
  code=$?
  tests_status=$([ "$code" = 0 ] && echo "passed" || echo "FAILED (exit $code)")
fi

step "benchmark: eager, SDPA, fused, CUDA graphs; whole adapter; traces"
timeout 210 "$PYTHON" bench/bench_attention.py --providers eager,sdpa,fused,fused+graph
bench_status=$?

step "benchmark: torch.compile (compile time printed per shape)"
timeout 120 "$PYTHON" bench/bench_attention.py --providers compile --adapter-providers "" --no-traces
compile_status=$?

step "summary"
echo "GPU tests: $tests_status"
echo "benchmark: exit $bench_status; torch.compile benchmark: exit $compile_status (124 = hit its time limit)"
ls -la bench/results/
echo "total $((SECONDS - started)) s"
