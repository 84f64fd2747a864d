#!/usr/bin/env bash
# The demo behind `make demo`: the whole sur-cache pipeline on a bundled dataset and tiny models, on the CPU.
#   demo-assets -> extract (stage one) -> inspect -> train (stage two, from the store) -> generate --compare
#   -> evaluate
# The diffusion models are tiny and random, so the images are noise-like: the demo shows the wiring, not quality.
# Knobs (environment): SUR_CACHE (the CLI), DEMO_OUT, DEMO_SAMPLES, DEMO_TRAIN_STEPS, DEMO_GEN_STEPS, DEMO_SIZE.
set -euo pipefail

SUR_CACHE=${SUR_CACHE:-sur-cache}
OUT=${DEMO_OUT:-demo_out}
SAMPLES=${DEMO_SAMPLES:-32}
TRAIN_STEPS=${DEMO_TRAIN_STEPS:-40}
GEN_STEPS=${DEMO_GEN_STEPS:-20}
SIZE=${DEMO_SIZE:-64}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1

step() {
    printf '\n== %s\n$ %s\n' "$1" "${*:2}"
    local start=$SECONDS
    "${@:2}"
    printf '(%ss)\n' $((SECONDS - start))
}

step "build the demo dataset, a tiny random Stable Diffusion and the LLM teacher" \
    "$SUR_CACHE" demo-assets --out "$OUT" --num-samples "$SAMPLES"
step "stage one: run CLIP, VAE and the LLM once over the dataset into a feature store" \
    "$SUR_CACHE" extract --data "$OUT/data" --out "$OUT/features.zarr" --sd "$OUT/models/sd" \
    --llm "$OUT/models/llm" --no-8bit --llm-dtype float32 --resolution 32 --batch-size 8 --shard-rows 16 \
    --no-progress --overwrite
step "read the store's manifest and arrays back" \
    "$SUR_CACHE" inspect "$OUT/features.zarr"
step "stage two: train an adapter from the store (only the frozen UNet is loaded)" \
    "$SUR_CACHE" train --store "$OUT/features.zarr" --sd "$OUT/models/sd" --out "$OUT/run" --device cpu \
    --max-steps "$TRAIN_STEPS" --batch-size 4 --gradient-accumulation 1 --lr 1e-3
step "generate: the same seed without and with the adapter, side by side" \
    "$SUR_CACHE" generate --sd "$OUT/models/sd" --adapter "$OUT/run/adapter" \
    --prompt "a red circle waits by the sea" --prompt "a blue square waits in a quiet park" \
    --steps "$GEN_STEPS" --height "$SIZE" --width "$SIZE" --compare --out "$OUT/images"
step "evaluate: CLIP scores of base and adapted images per category (tiny random CLIP: the wiring, not a verdict)" \
    "$SUR_CACHE" evaluate --sd "$OUT/models/sd" --adapter "$OUT/run/adapter" --clip "$OUT/models/clip" \
    --prompts "$OUT/eval_prompts.jsonl" --num-seeds 1 --steps "$GEN_STEPS" --height "$SIZE" --width "$SIZE" \
    --no-progress --out "$OUT/evaluation"

cat <<EOF

== demo outputs (${SECONDS}s in all)
dataset        $OUT/data
feature store  $OUT/features.zarr
adapter        $OUT/run/adapter  (training log: $OUT/run/train_log.jsonl, loss curve: $OUT/run/loss.png)
images         $OUT/images  (base | with adapter, per prompt and seed)
evaluation     $OUT/evaluation/report.html  (open it in a browser; metrics.json and scores.csv beside it)
EOF
