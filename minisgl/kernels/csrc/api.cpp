// The C entry points of the native CPU kernels, loaded by minisgl/kernels/native.py with ctypes.
//
// Why native code: at batch 1 a decode step's small ops touch a few KB each, so torch's per-op cost (dispatch,
// dtype casts, temporaries) was most of their time; a decode step ran ~25 of them per layer. Here each is one
// call. Parallel loops run on torch's own OpenMP threads (this library resolves libgomp to the copy torch has
// loaded), so no second thread pool spins beside torch's.
//
// Plain C ABI, no torch headers: one build serves every torch version. Compiled once per ISA level at package
// build time (setup.py, kernels/build.py).

#include <type_traits>

#include "attention.h"
#include "decoder.h"
#include "gumbel.h"
#include "int4.h"
#include "int4_q8.h"
#include "int8.h"
#include "int8_q8.h"
#include "ops.h"

using namespace minisgl;

// C entry points: `is_bf16` selects the element type (0: float32, 1: bfloat16) of every floating tensor argument.
extern "C" {

void minisgl_rmsnorm(int is_bf16, const void* x, int64_t x_stride, const void* w, void* out, int64_t out_stride,
                     int64_t rows, int64_t dim, float eps) {
    if (is_bf16)
        rmsnorm((const bf16*)x, x_stride, (const bf16*)w, (bf16*)out, out_stride, rows, dim, eps);
    else
        rmsnorm((const float*)x, x_stride, (const float*)w, (float*)out, out_stride, rows, dim, eps);
}

void minisgl_add_rmsnorm(int is_bf16, void* x, void* residual, const void* w, int64_t rows, int64_t dim, float eps) {
    if (is_bf16)
        add_rmsnorm((bf16*)x, (bf16*)residual, (const bf16*)w, rows, dim, eps);
    else
        add_rmsnorm((float*)x, (float*)residual, (const float*)w, rows, dim, eps);
}

void minisgl_rotary(int is_bf16, void* x, int64_t x_stride, int64_t heads, int64_t head_dim, const void* cos,
                    const void* sin, int64_t half, int64_t rows) {
    if (is_bf16)
        rotary((bf16*)x, x_stride, heads, head_dim, (const bf16*)cos, (const bf16*)sin, half, rows);
    else
        rotary((float*)x, x_stride, heads, head_dim, (const float*)cos, (const float*)sin, half, rows);
}

void minisgl_silu_and_mul(int is_bf16, const void* x, void* out, int64_t rows, int64_t inter) {
    if (is_bf16)
        silu_and_mul((const bf16*)x, (bf16*)out, rows, inter);
    else
        silu_and_mul((const float*)x, (float*)out, rows, inter);
}

// kv_f16: the caches hold fp16 (1) or the activations' type (0).
void minisgl_decode_attention(int is_bf16, int kv_f16, const void* q, int64_t q_stride, int64_t q_hstride,
                              const void* k, int64_t k_stride, int64_t k_hstride, const void* v, int64_t v_stride,
                              int64_t v_hstride, const int64_t* out_loc, void* k_cache, void* v_cache,
                              const int64_t* slots, const int64_t* lens, void* out, int64_t batch, int64_t max_len,
                              int64_t q_heads, int64_t kv_heads, int64_t head_dim, float scale) {
    auto run = [&](auto* act, auto* cache) {
        using T = std::remove_pointer_t<decltype(act)>;
        using C = std::remove_pointer_t<decltype(cache)>;
        decode_attention_any((const T*)q, q_stride, q_hstride, (const T*)k, k_stride, k_hstride, (const T*)v,
                             v_stride, v_hstride, out_loc, (C*)k_cache, (C*)v_cache, slots, lens, (T*)out, batch,
                             max_len, q_heads, kv_heads, head_dim, scale);
    };
    if (is_bf16)
        kv_f16 ? run((bf16*)nullptr, (f16*)nullptr) : run((bf16*)nullptr, (bf16*)nullptr);
    else
        kv_f16 ? run((float*)nullptr, (f16*)nullptr) : run((float*)nullptr, (float*)nullptr);
}

// The ISA level this library was compiled for: 2 AVX-512 (x86-64-v4 with BF16 and VNNI), 1 AVX2 (x86-64-v3).
// native.py loads one library per level and checks that it reports the level its file name says.
int minisgl_isa() {
#if defined(__AVX512F__)
    return 2;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    return 1;
#else
#error "the native CPU kernels need at least x86-64-v3 (AVX2, FMA, F16C)"
#endif
}

// sizeof the structures native.py mirrors with ctypes (0: Int4Weight, 1: DecoderWeights, 2: DecodeStep), so a
// layout that drifted on either side is caught at load instead of read as garbage.
int64_t minisgl_sizeof(int which) {
    switch (which) {
        case 0: return sizeof(Int4Weight);
        case 1: return sizeof(DecoderWeights);
        case 2: return sizeof(DecodeStep);
        default: return -1;
    }
}

// act_q8: quantize x to int8 per group of 32 and multiply in integers (int4_q8.h) instead of in fp32 (int4.h).
void minisgl_int4_gemm(int is_bf16, const void* x, int64_t rows, int64_t k_len, const uint8_t* w, const uint16_t* sm,
                       int64_t n, void* y, int act_q8) {
    if (is_bf16)
        (act_q8 ? int4_q8_gemm<bf16> : int4_gemm<bf16>)((const bf16*)x, rows, k_len, w, sm, n, (bf16*)y);
    else
        (act_q8 ? int4_q8_gemm<float> : int4_gemm<float>)((const float*)x, rows, k_len, w, sm, n, (float*)y);
}

// act_q8: quantize x to int8 per group of 32 and multiply in integers (int8_q8.h; k / groups a multiple of 32).
void minisgl_int8_gemm(int is_bf16, const void* x, int64_t rows, int64_t k_len, const int8_t* w, const float* scale,
                       int64_t groups, int64_t n, void* y, int act_q8) {
    if (is_bf16)
        (act_q8 ? int8_q8_gemm<bf16> : int8_gemm<bf16>)((const bf16*)x, rows, k_len, w, scale, groups, n, (bf16*)y);
    else
        (act_q8 ? int8_q8_gemm<float> : int8_gemm<float>)((const float*)x, rows, k_len, w, scale, groups, n, (float*)y);
}

// x: fp32 [rows][stride], temperature-scaled and filtered logits (-inf: excluded); seeds, steps, out: [rows].
void minisgl_gumbel_argmax(const float* x, int64_t rows, int64_t vocab, int64_t stride, const int64_t* seeds,
                           const int64_t* steps, int64_t* out) {
    gumbel_argmax(x, rows, vocab, stride, seeds, steps, out);
}

void minisgl_decoder_layer(const void* weights, const void* step, void* h, void* residual, int first) {
    const DecoderWeights& L = *(const DecoderWeights*)weights;
    const DecodeStep& S = *(const DecodeStep*)step;
    if (L.is_bf16)
        decoder_layer(L, S, (bf16*)h, (bf16*)residual, first != 0);
    else
        decoder_layer(L, S, (float*)h, (float*)residual, first != 0);
}

}  // extern "C"
