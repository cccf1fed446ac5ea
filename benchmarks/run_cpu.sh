#!/usr/bin/env bash
# Reproduce the CPU tables of benchmarks/RESULTS.md.
#
#   QUICK=1 benchmarks/run_cpu.sh   # ~10 minutes on 2 shared cores: the per-CPU sweep RESULTS.md reports first
#                                   # (mini-llava, none / cls-topk / gridprune at 576 and 64, torch vs ORT, with
#                                   # roofline figures), the preprocessing micro-benchmark and the ORT-vs-torch probe
#   benchmarks/run_cpu.sh           # also the full sweeps: tiny-llava and mini-llava, methods none / cls-topk /
#                                   # gridprune / gprune at 576 / 192 / 128 / 64, their min-statistic reports and the
#                                   # portable-decoder sweeps (about 15 more minutes)
#
# One intra-op thread for both backends and an interleaved schedule: on a shared machine the repeats of every
# combination then see the same background load, so the ratios hold even when absolute times drift. Every JSON
# records the CPU model, its ISA extensions (AVX2/AVX-512/AMX, ARM cores) and the library versions; results are
# per CPU, so the quick sweep's files are named after a short CPU tag.
#   PYTHON=/path/to/python OUT=dir [QUICK=1] benchmarks/run_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT" docs
BENCH=("$PY" -m edgeprune bench)
CPU=$("$PY" -c "from edgeprune.bench.system import machine_info as m; c = m()['cpu'].lower()
print('xeon' if 'xeon' in c else 'epyc' if 'epyc' in c else 'arm' if 'arm' in c or not c else c.split()[0])")

"${BENCH[@]}" --model mini-llava --methods none,cls-topk,gridprune --tokens 576,64 --backends torch,ort \
    --threads 1 --schedule interleaved --warmup 2 --repeat 5 --prompt-tokens 32 --new-tokens 32 \
    --out "$OUT/mini-llava-$CPU.json" --markdown "$OUT/mini-llava-$CPU.md" --plot docs/bench.png
"$PY" benchmarks/preprocess_bench.py --repeat 30 > "$OUT/preprocess-$CPU.md"
if [ -d "${PROBE_BUNDLE:-}" ]; then  # a mini-llava none bundle: edgeprune export --model mini-llava --out DIR
    "$PY" benchmarks/ort_cpu_probe.py --bundle "$PROBE_BUNDLE" > "$OUT/ort-probe-$CPU.md"
fi
[ "${QUICK:-0}" = 1 ] && exit 0

SWEEP=(--methods none,cls-topk,gridprune,gprune --tokens 576,192,128,64 --backends torch,ort
       --threads 1 --schedule interleaved --prompt-tokens 32 --new-tokens 32)
"${BENCH[@]}" --model tiny-llava "${SWEEP[@]}" --warmup 3 --repeat 15 \
    --out "$OUT/tiny-llava.json" --markdown "$OUT/tiny-llava.md" --plot "$OUT/tiny-llava.png"
"${BENCH[@]}" --model mini-llava "${SWEEP[@]}" --warmup 2 --repeat 10 \
    --out "$OUT/mini-llava.json" --markdown "$OUT/mini-llava.md" --plot "$OUT/mini-llava.png" \
    --trace "$OUT/mini-llava-trace.json"
for m in tiny-llava mini-llava; do
    "${BENCH[@]}" --report-from "$OUT/$m.json" --statistic min --markdown "$OUT/$m-min.md"
    "${BENCH[@]}" --model "$m" --methods none,cls-topk --tokens 576,64 --backends torch,ort --ort-decoder portable \
        --threads 1 --schedule interleaved --warmup 2 --repeat 10 \
        --out "$OUT/$m-portable.json" --markdown "$OUT/$m-portable.md"
done
