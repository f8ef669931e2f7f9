"""Every threshold that picks between two kernels for the same product, in one place.

Each is a number of rows (tokens in the batch) at which one kernel starts to beat the other on the hardware
named beside it; docs/benchmarks.md says how to measure them again. Changing one changes speed, never results
beyond summation order.
"""

# ---- CUDA (kernels/quant_matmul.py, quant/fp8.py) -------------------------------------------------------------
# Up to this many rows a W8A16/W4A16 linear is a memory-bound GEMV: each program streams a few weight rows once.
GEMV_MAX_M = 4
# From this many rows on, the weight is dequantized into a temporary and multiplied by cuBLAS (as vLLM's AWQ path
# does from 256 tokens): the in-register GEMMs fall behind, int4's sooner (H100).
W4_DEQUANT_MIN_M = 128
W8_DEQUANT_MIN_M = 512
# Up to this many rows an fp8 GEMM is bound by reading the weight, so the W8A16 kernels stream the fp8 weight and
# skip quantizing the activations; beyond it, fp8 tensor-core GEMMs (torch._scaled_mm) win (H100).
FP8_WEIGHT_ONLY_MAX_M = 16

# ---- CPU ------------------------------------------------------------------------------------------------------
# Up to this many rows a quantized linear runs its native kernel (csrc/int4.h, int8.h), whose cost grows with the
# rows; from there on (prefill chunks) it expands its weight for a dense matmul, which reuses each weight across
# many more rows at once (benchmark/native_cpu.py, "expand+dense").
CPU_INT4_NATIVE_MAX_ROWS = 128
# Except with int8 activations in fp32 (--dtype auto on a CPU without native bf16): there the integer kernel beats
# expanding to an fp32 dense matmul at every size measured, up to a 2048-row prefill chunk (AVX2).
CPU_INT4_Q8_FP32_ALWAYS_NATIVE = True
CPU_INT8_NATIVE_MAX_ROWS = 16
# An int8 weight of at least this many elements (a vocabulary-sized head) costs more to expand than the native
# kernel's passes over it, up to CPU_INT8_LARGE_NATIVE_MAX_ROWS rows.
CPU_INT8_LARGE_WEIGHT = 1 << 24
CPU_INT8_LARGE_NATIVE_MAX_ROWS = 256
# A GGUF's tied LM head keeps an int8 copy for decode; with bf16 activations, from this many rows on it
# multiplies by the dense embedding instead (native bf16 dot products), which then beats even the int8 kernel on
# int8-rounded activations (--dtype auto; AVX-512 with AVX512-BF16). In fp32 the dense product reads twice the
# bytes of bf16 and is slower than the int8 kernels at every batch size, so the copy serves all of them.
CPU_DENSE_HEAD_MIN_ROWS = 10
# Top-k/top-p sampling on the CPU ranks this many most probable tokens of each row first (topk) and sorts the
# whole vocabulary only for rows whose kept set reaches past them (engine/sampling.py); a topk this size costs a
# small fraction of a full sort of a 49k vocabulary (benchmark/sampling_cpu.py).
CPU_SAMPLING_CANDIDATES = 256
