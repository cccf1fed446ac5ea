#!/usr/bin/env bash
# Reproduce the CPU tables of benchmarks/RESULTS.md: tiny-llava and mini-llava, torch eager vs ONNX Runtime,
# methods none / cls-topk / gridprune / gprune at 576 / 192 / 128 / 64 kept tokens (combinations the exporter
# cannot lower are recorded as skipped), then the same reports with ratios from the quietest repeat (min), and
# a sweep with ONNX Runtime on the portable opset-18 decoder.onnx (what TensorRT builds) instead of the
# fused-attention decoder.ort.onnx it runs by default. About 15 minutes on 2 cores.
#
# One intra-op thread for both backends and an interleaved schedule: on a shared machine the repeats of every
# combination then see the same background load, so the ratios hold even when absolute times drift.
#   PYTHON=/path/to/python OUT=dir benchmarks/run_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT" docs
BENCH=("$PY" -m edgeprune bench)
SWEEP=(--methods none,cls-topk,gridprune,gprune --tokens 576,192,128,64 --backends torch,ort
       --threads 1 --schedule interleaved --prompt-tokens 32 --new-tokens 32)

"${BENCH[@]}" --model tiny-llava "${SWEEP[@]}" --warmup 3 --repeat 15 \
    --out "$OUT/tiny-llava.json" --markdown "$OUT/tiny-llava.md" --plot "$OUT/tiny-llava.png"
"${BENCH[@]}" --model mini-llava "${SWEEP[@]}" --warmup 2 --repeat 10 \
    --out "$OUT/mini-llava.json" --markdown "$OUT/mini-llava.md" --plot docs/bench.png \
    --trace "$OUT/mini-llava-trace.json"
for m in tiny-llava mini-llava; do
    "${BENCH[@]}" --report-from "$OUT/$m.json" --statistic min --markdown "$OUT/$m-min.md"
    "${BENCH[@]}" --model "$m" --methods none,cls-topk --tokens 576,64 --backends torch,ort --ort-decoder portable \
        --threads 1 --schedule interleaved --warmup 2 --repeat 10 \
        --out "$OUT/$m-portable.json" --markdown "$OUT/$m-portable.md"
done
