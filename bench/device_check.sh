#!/usr/bin/env bash
# The one prepared run for a lent H100/H200 (15 minutes of device time per session, start-up included), in order of
# priority, each step capped and the whole run kept under DEADLINE seconds:
#   1. every GPU-marked test (kernel fp16/bf16 vs 2x PyTorch's error, models, generate, trainer),
#   4. issue 12's stage-two measurements (bench_train.py): features-only samples/s at B=256 and 1024, eager and
#      --compile reduce-overhead; the cached SD 1.5 step and UNet-only at B=16, eager and compiled; online/cached;
#      then the host-cost rows (ATen ops and CUDA launches per step, eager vs compiled); its CSV is rewritten after
#      every row, so a step stopped by its cap keeps what it measured,
#   4b. the fused kernel's per-launch breakdown at B=16 (bench_attention.py, no sweep),
#   5. stage one's benchmark: VAE, CLIP, LLaMA-13B int8 extrapolated from 4 layers, then the real extract end to
#      end, --no-overlap vs --overlap, at the LLM batch --llm-batch-size auto picks,
#   then, while time is left: 1b. SDXL at real shapes, B=8 at 1024 px: UNet-only vs cached vs online step
#   (bench_sdxl.py) and the adapter at d=2048, B=8; 2. `make bench`'s attention benchmark (eager, SDPA, fused, CUDA
#   graphs; whole adapter; profiler traces); 3. torch.compile rows for the two headline shapes.
# bench/results/ is archived to $OUT/results.tar.gz and the log written to $OUT on every exit.
# Device call (the image lacks diffusers, zarr, numcodecs, bitsandbytes: bash ../shared/device/wheels.sh first):
#   carry [".whl"]; command: bash bench/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE=${DEADLINE:-480}  # run it with timeout_s 540: start-up and transfers take the rest of 15 minutes
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

# STEPS picks what runs (a comma-separated subset, in this order); the default is all of them. One call cannot
# finish every step in DEADLINE: a session with time for a second call runs the rest, e.g. STEPS=extract,sdxl.
STEPS=${STEPS:-tests,train,breakdown,extract,sdxl,attention,compile}
selected() { [[ ",$STEPS," == *",$1,"* ]]; }
tests=- train=- breakdown=- extract=- sdxl=- sdxl_adapter=- attention=- compile=-

if selected tests; then
  step "1. GPU tests"
  capped 150 python3 -P -m pytest -m gpu tests -q -p no:cacheprovider -rfEs
  tests=$?
fi

if selected train; then
  step "4. stage two benchmark (issue 12: features-only, cached vs UNet-only, online, eager vs compiled)"
  capped 240 python3 bench/bench_train.py
  train=$?
fi

if selected breakdown; then
  step "4b. the fused kernel's per-launch breakdown at B=16"
  capped 45 python3 bench/bench_attention.py --providers fused --batch-sizes 16 --widths 768 --adapter-providers "" \
    --breakdown-batch-sizes 16 --no-sweep --no-traces
  breakdown=$?
fi

if selected extract; then
  step "5. stage one benchmark: components, then extract end to end, sequential vs overlapped"
  capped 150 python3 bench/bench_extract.py
  extract=$?
fi

if selected sdxl; then
  step "1b. SDXL stage two and the adapter at d=2048 (B=8)"
  capped 200 python3 bench/bench_sdxl.py --batch-size 8
  sdxl=$?
  capped 60 python3 bench/bench_attention.py --providers eager,sdpa,fused --widths 2048 --batch-sizes 8 \
    --adapter-batch-sizes 8 --adapter-providers eager,sdpa,fused --no-traces
  sdxl_adapter=$?
fi

if selected attention; then
  step "2. attention benchmark (make bench)"
  capped 170 python3 bench/bench_attention.py --providers eager,sdpa,fused,fused+graph
  attention=$?
fi

if selected compile; then
  step "3. torch.compile rows"
  capped 70 python3 bench/bench_attention.py --providers compile --batch-sizes 16,256 --widths 768 \
    --adapter-providers "" --no-traces
  compile=$?
fi

step "summary (exit codes; 124 = time limit; - = not selected)"
echo "gpu tests $tests | train $train | breakdown $breakdown | extract $extract | sdxl $sdxl | sdxl adapter $sdxl_adapter | attention $attention | compile $compile"
ls -la bench/results/
