#!/usr/bin/env bash
# The GPU evaluation, in stages that each fit one device call (<= 10 minutes). Run from the repo root:
#   OUT=/some/dir benchmark/device.sh tests|kernels|quick|throughput|llama8b ...
# Every stage writes its full log to $OUT/<stage>.log; the figures go to docs/benchmarks.md by hand.
#   tests       GPU-marked tests (Triton kernels natively, engine triton vs torch, graphs, overlap, quant):
#               ~6.5 minutes on an H100, so alone in its call
#   kernels     the kernel micro-benchmarks (attention, norms, quantized linears)
#   quick       offline benchmark and batch-1 latency on Qwen3-0.6B dummy only
#   throughput  offline benchmark on Qwen3-0.6B dummy (overlap on and off), transformers' generate on the
#               same workload, batch-1 latency
#   llama8b     Llama-3.1-8B dummy: batch-1 latency bf16 / int4 / fp8, offline benchmark bf16 vs fp8
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/minisgl-out}
mkdir -p "$OUT"
QWEN=benchmark/configs/qwen3-0.6b
LLAMA=benchmark/configs/llama-3.1-8b

step() {  # step NAME TIMEOUT CMD...: run CMD with a time limit, log to $OUT/NAME.log, keep going on failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v 'it/s]$' | tee "$OUT/$name.log" | tail -n 25
}

for stage in "$@"; do
    case $stage in
    tests)
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
        step gpu_tests 560 python -m pytest -o addopts= -q -rfE --durations=15 -m gpu -p no:cacheprovider --continue-on-collection-errors tests
        ;;
    kernels)
        [ -f benchmark/kernels.py ] && step kernels 100 python benchmark/kernels.py --quick
        [ -f benchmark/quant_kernels.py ] && step quant_kernels 100 python benchmark/quant_kernels.py
        ;;
    quick)  # the headline figures alone, for a check after a change
        step offline_overlap 150 python benchmark/offline/bench.py --model $QWEN
        step latency_qwen 60 python benchmark/latency.py --model $QWEN
        ;;
    throughput)
        step offline_overlap 100 python benchmark/offline/bench.py --model $QWEN
        step offline_no_overlap 100 env MINISGL_DISABLE_OVERLAP_SCHEDULING=1 python benchmark/offline/bench.py --model $QWEN
        step latency_qwen 60 python benchmark/latency.py --model $QWEN
        step offline_hf 300 python benchmark/offline/bench_hf.py --model $QWEN
        ;;
    llama8b)
        for q in none int4 fp8; do  # one graph (batch 1) keeps each run's capture short
            step latency_llama_$q 80 python benchmark/latency.py --model $LLAMA --quantization $q \
                --cuda-graph-max-bs 1 --decode-tokens 128
        done
        for q in none fp8; do
            step offline_llama_$q 130 python benchmark/offline/bench.py --model $LLAMA --quantization $q
        done
        ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
done
