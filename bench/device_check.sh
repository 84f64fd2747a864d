#!/usr/bin/env bash
# The one prepared run for a lent H100/H200 (15 minutes of device time per session, start-up included), in order of
# priority, each step capped and the whole run kept under DEADLINE seconds:
#   1. every GPU-marked test (kernel fp16/bf16 vs 2x PyTorch's error, models, generate, trainer),
#   1b. stage one's benchmark: VAE, CLIP, LLaMA-13B int8 extrapolated from 4 layers, then the real extract end to
#       end, --no-overlap vs --overlap, at the LLM batch --llm-batch-size auto picks (the overlap is not yet
#       measured, so ahead of the steps that were),
#   1c. SDXL at real shapes, B=8 at 1024 px: UNet-only vs cached vs online step (bench_sdxl.py), then the adapter at
#       d=2048, B=8 with the eager, SDPA and fused cores (not yet measured either),
#   2. `make bench`'s attention benchmark (eager, SDPA, fused, CUDA graphs; whole adapter; profiler traces),
#   3. torch.compile rows for the two headline shapes,
#   4. stage two's benchmark (UNet-only vs cached vs online step, features-only samples/s).
# bench/results/ is archived to $OUT/results.tar.gz and the log written to $OUT on every exit.
# Device call (the image lacks diffusers, zarr, numcodecs, bitsandbytes: bash ../shared/device/wheels.sh first):
#   carry [".whl"]; command: bash bench/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE=${DEADLINE:-420}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
# One archive: a device call returns at most 8 files.
copy_out() { tar -czf "$OUT/results.tar.gz" -C bench results; }
trap copy_out EXIT

step() { echo; echo "=== $1 ($SECONDS s elapsed)"; }
# capped CAP CMD...: run CMD with at most CAP seconds, and never past the deadline.
capped() {
  local cap=$1 left=$((DEADLINE - SECONDS))
  shift
  [ "$left" -gt 20 ] || { echo "skipped: deadline reached"; return 124; }
  timeout $((cap < left ? cap : left)) "$@"
}

step "environment and packages"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || echo "editable install failed"
if ! (cd / && python3 -c "import sur_cache.stages.train" 2>/dev/null); then  # fall back to a shim of symlinks
  shim=$(mktemp -d) && mkdir -p "$shim/sur_cache" && ln -s "$PWD"/sur_cache/* "$shim/sur_cache/"
  ln -s "$PWD/kernels" "$shim/sur_cache/kernels" && ln -s "$PWD/stages" "$shim/sur_cache/stages"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  echo "using the symlink shim $shim"
fi
python3 -c "import torch, triton, diffusers, zarr, bitsandbytes, sur_cache.kernels, sur_cache.stages.train as t
print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'zarr', zarr.__version__)"

step "1. GPU tests"
capped 150 python3 -P -m pytest -m gpu tests -q -p no:cacheprovider -rfEs
tests=$?

step "1b. stage one benchmark: components, then extract end to end, sequential vs overlapped"
capped 150 python3 bench/bench_extract.py
extract=$?

step "1c. SDXL stage two and the adapter at d=2048 (B=8)"
capped 200 python3 bench/bench_sdxl.py --batch-size 8
sdxl=$?
capped 60 python3 bench/bench_attention.py --providers eager,sdpa,fused --widths 2048 --batch-sizes 8 \
  --adapter-batch-sizes 8 --adapter-providers eager,sdpa,fused --no-traces
sdxl_adapter=$?

step "2. attention benchmark (make bench)"
capped 170 python3 bench/bench_attention.py --providers eager,sdpa,fused,fused+graph
attention=$?

step "3. torch.compile rows"
capped 70 python3 bench/bench_attention.py --providers compile --batch-sizes 16,256 --widths 768 \
  --adapter-providers "" --no-traces
compile=$?

step "4. stage two benchmark"
capped 130 python3 bench/bench_train.py
train=$?

step "summary (exit codes; 124 = time limit)"
echo "gpu tests $tests | sdxl $sdxl | sdxl adapter $sdxl_adapter | attention $attention | compile $compile | train $train | extract $extract"
ls -la bench/results/
