// Weight-only int4 matmul on torch's packed CPU layout, with AVX-512 (compiled only for CPUs that have it).
#pragma once

#include <vector>

#include "numerics.h"

#if defined(__AVX512F__)
#include <immintrin.h>

namespace minisgl {

// y[M][64] (fp32) = x[M][K] times the 64-row block `w` of torch's packed CPU int4 layout: for each k, 32 bytes,
// byte j holding row j in its low nibble and row 32 + j in its high one. w = (q - 8) * scale + zero per group of
// 32 k; `sz` holds the block's (scale, zero) bf16 pairs of group g at sz[g * padded_rows], one dword per row.
// Per group: acc = sum_k x_k (q_k - 8), then y += scale * acc + zero * sum_k x_k. A nibble becomes its float
// (q - 8) through one vpermps on a 16-entry table, which reads only the low 4 bits of each index.
template <int M>
void int4_block(const uint8_t* w, const uint32_t* sz, int64_t padded_rows, const float* x, const float* xsum,
                int64_t k_len, float* y) {
    const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i high_half = _mm512_set1_epi32(int32_t(0xffff0000u));
    const int64_t groups = k_len / 32;
    __m512 out[M][4];
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < 4; ++i) out[m][i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        __m512 acc[M][4];
        for (int m = 0; m < M; ++m)
            for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_setzero_ps();
        const uint8_t* wg = w + g * 32 * 32;
        for (int kk = 0; kk < 32; ++kk) {
            const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wg + kk * 32)));
            const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wg + kk * 32 + 16)));
            const __m512 w0 = _mm512_permutexvar_ps(b0, table);                         // rows 0..15
            const __m512 w1 = _mm512_permutexvar_ps(b1, table);                         // rows 16..31
            const __m512 w2 = _mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), table);  // rows 32..47
            const __m512 w3 = _mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), table);  // rows 48..63
            for (int m = 0; m < M; ++m) {
                const __m512 xb = _mm512_set1_ps(x[m * k_len + g * 32 + kk]);
                acc[m][0] = _mm512_fmadd_ps(w0, xb, acc[m][0]);
                acc[m][1] = _mm512_fmadd_ps(w1, xb, acc[m][1]);
                acc[m][2] = _mm512_fmadd_ps(w2, xb, acc[m][2]);
                acc[m][3] = _mm512_fmadd_ps(w3, xb, acc[m][3]);
            }
        }
        for (int i = 0; i < 4; ++i) {
            const __m512i pair = _mm512_loadu_si512((const void*)(sz + g * padded_rows + 16 * i));
            const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
            const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pair, high_half));
            for (int m = 0; m < M; ++m)
                out[m][i] = _mm512_fmadd_ps(acc[m][i], scale,
                                            _mm512_fmadd_ps(zero, _mm512_set1_ps(xsum[m * groups + g]), out[m][i]));
        }
    }
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < 4; ++i) _mm512_storeu_ps(y + m * 64 + 16 * i, out[m][i]);
}

// y [rows][n] (bf16) = x [rows][k] (bf16) times the int4 weight in torch's packed CPU layout (see int4_block),
// the same product as aten._weight_int4pack_mm_for_cpu. Row blocks are split over torch's OpenMP threads.
void int4_gemm(const bf16* x, int64_t rows, int64_t k_len, const uint8_t* w, const uint32_t* sz, int64_t n,
               int64_t padded_rows, bf16* y) {
    const int64_t groups = k_len / 32;
    std::vector<float> xf(rows * k_len), xsum(rows * groups, 0.0f);
    for (int64_t m = 0; m < rows; ++m)
        for (int64_t k = 0; k < k_len; ++k) {
            xf[m * k_len + k] = to_float(x[m * k_len + k]);
            xsum[m * groups + k / 32] += xf[m * k_len + k];
        }
    const int64_t blocks = padded_rows / 64;
#pragma omp parallel for schedule(static) if (blocks >= 4)
    for (int64_t b = 0; b < blocks; ++b) {
        float out[4 * 64];
        const uint8_t* wb = w + b * k_len * 32;
        const uint32_t* szb = sz + b * 64;
        for (int64_t m0 = 0; m0 < rows; m0 += 4) {
            const int64_t mc = rows - m0 < 4 ? rows - m0 : 4;
            const float* xm = xf.data() + m0 * k_len;
            const float* sm = xsum.data() + m0 * groups;
            switch (mc) {
                case 1: int4_block<1>(wb, szb, padded_rows, xm, sm, k_len, out); break;
                case 2: int4_block<2>(wb, szb, padded_rows, xm, sm, k_len, out); break;
                case 3: int4_block<3>(wb, szb, padded_rows, xm, sm, k_len, out); break;
                default: int4_block<4>(wb, szb, padded_rows, xm, sm, k_len, out); break;
            }
            const int64_t live = n - b * 64 < 64 ? n - b * 64 : 64;  // padding rows are not stored
            for (int64_t m = 0; m < mc; ++m)
                for (int64_t r = 0; r < live; ++r) from_float(out[m * 64 + r], y + (m0 + m) * n + b * 64 + r);
        }
    }
}
}  // namespace minisgl
#endif
