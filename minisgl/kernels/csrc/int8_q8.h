// int8 weights (int8.h's layout and scales) times activations rounded to int8 per group of 32 inputs (q8.h):
// integer dot products per 32 inputs, as llama.cpp multiplies its Q8_0 blocks (a GGUF's head) by Q8 activations.
// One 8-bit multiply-add does the work of four fp32 FMAs and their widening converts, so at a few rows of x,
// where int8.h's kernels convert every weight to float, this does about half their work; the price is the
// activations' rounding to 8 bits. Used only where the user did not ask for exact matmuls (quant/int8.py).
//
// y[m][r] = sum over chunks c of 32 inputs, in order, of (scale[r][c's group] * dx[m][c]) * dot_c, with dot_c
// the exact integer dot of the chunk's codes, accumulated in 8 fp32 lanes and summed once at the end. Every row
// of x goes through the same operations in the same order however many rows a call has, and the integer dots
// are the same at both ISA levels: a row's result does not depend on the batch, the thread count or the level.
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

#include <vector>

#include "int8.h"
#include "q8.h"

namespace minisgl {

// The 8 int32 lanes of a chunk's dot, lane l = sum over i < 4 of w[4l + i] * q[4l + i], from |w| (as unsigned
// bytes) and q with w's signs. Without VNNI maddubs cannot saturate: |w| <= 128, |q| <= 127, 2 * 128 * 127 < 2^15.
inline __m256i chunk_dot(__m256i w_abs, __m256i q_signed) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w_abs, q_signed);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs, q_signed), _mm256_set1_epi16(1));
#endif
}

// dots[m][r] for M rows of quantized x (qx [M][k], dx [M][k / 32]) and 4 weight rows; each chunk of weights is
// loaded once for all M rows.
template <int M>
void int8_q8_rows4(const int8_t* w, int64_t k_len, const float* sc, int64_t groups, const int8_t* qx,
                   const float* dx, float dots[][4]) {
    const int64_t chunks = k_len / 32, per_group = chunks / groups;
    __m256 acc[M][4];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < 4; ++r) acc[m][r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        float s[4];
        for (int r = 0; r < 4; ++r) s[r] = sc[r * groups + g];
        for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
            for (int r = 0; r < 4; ++r) {
                if (c % 2 == 0) prefetch_ahead(w + r * k_len + 32 * c, 64);
                const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + r * k_len + 32 * c));
                const __m256i wa = _mm256_abs_epi8(wv);
                for (int m = 0; m < M; ++m) {
                    const __m256i q = _mm256_loadu_si256((const __m256i*)(qx + m * k_len + 32 * c));
                    const __m256 d = _mm256_cvtepi32_ps(chunk_dot(wa, _mm256_sign_epi8(q, wv)));
                    acc[m][r] = _mm256_fmadd_ps(d, _mm256_set1_ps(s[r] * dx[m * chunks + c]), acc[m][r]);
                }
            }
        }
    }
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < 4; ++r) dots[m][r] = hsum256(acc[m][r]);
}

#if defined(__AVX512F__)
constexpr int64_t kInt8Q8Rows = 4;  // rows of x per pass: 16 accumulators of 32 registers
#else
constexpr int64_t kInt8Q8Rows = 2;  // 8 accumulators of 16 registers
#endif

// int8_gemm's contract (int8.h) with x rounded to int8 per group of 32 first; k and k / groups are multiples of 32.
template <typename T>
void int8_q8_gemm(const T* x, int64_t rows, int64_t k_len, const int8_t* w, const float* scale, int64_t groups,
                  int64_t n, T* y) {
    const int64_t chunks = k_len / 32;
    std::vector<int8_t> qx(rows * k_len);
    std::vector<float> dx(rows * chunks);
    for (int64_t m = 0; m < rows; ++m)
        quantize_q8_row(x + m * k_len, k_len, qx.data() + m * k_len, dx.data() + m * chunks, nullptr);
    for_each_int8_quad(rows, k_len, w, scale, groups, n, y, 0, [&](auto wq, auto sq, float* out, float*) {
        for (int64_t m0 = 0; m0 < rows; m0 += kInt8Q8Rows) {
            const int64_t mc = rows - m0 < kInt8Q8Rows ? rows - m0 : kInt8Q8Rows;
            const int8_t* q = qx.data() + m0 * k_len;
            const float* d = dx.data() + m0 * chunks;
            float dots[kInt8Q8Rows][4];
            switch (mc) {
                case 1: int8_q8_rows4<1>(wq, k_len, sq, groups, q, d, dots); break;
#if defined(__AVX512F__)
                case 2: int8_q8_rows4<2>(wq, k_len, sq, groups, q, d, dots); break;
                case 3: int8_q8_rows4<3>(wq, k_len, sq, groups, q, d, dots); break;
                default: int8_q8_rows4<4>(wq, k_len, sq, groups, q, d, dots); break;
#else
                default: int8_q8_rows4<2>(wq, k_len, sq, groups, q, d, dots); break;
#endif
            }
            for (int64_t m = 0; m < mc; ++m)
                for (int64_t r = 0; r < 4; ++r) out[(m0 + m) * kInt8Tile + r] = dots[m][r];
        }
    });
}

}  // namespace minisgl
#endif
