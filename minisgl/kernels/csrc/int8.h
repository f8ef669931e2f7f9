// Weight-only int8 matmul (per-row scales), with AVX-512 or AVX2, on the layout aten._weight_int8pack_mm takes.
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

#include <vector>

#include "numerics.h"

namespace minisgl {

#if defined(__AVX512F__)
constexpr int64_t kInt8Rows = 4;
#else
constexpr int64_t kInt8Rows = 3;
#endif

#if defined(__AVX512F__)
// dots[m][r] = x[m] . w[r] over k for 4 consecutive weight rows: 4 x M independent accumulators, so the FMA
// latency is hidden even at M = 1. k_len is a multiple of 16.
template <int M>
void int8_rows4(const int8_t* w, int64_t k_len, const float* x, float dots[][4]) {
    __m512 acc[M][4];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_len; k += 16) {
        __m512 wr[4];
        for (int r = 0; r < 4; ++r)
            wr[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + r * k_len + k))));
        for (int m = 0; m < M; ++m) {
            const __m512 xv = _mm512_loadu_ps(x + m * k_len + k);
            for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_fmadd_ps(wr[r], xv, acc[m][r]);
        }
    }
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < 4; ++r) dots[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}
#else
inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// AVX2: as above with 8 lanes (k_len a multiple of 8); 4 x M accumulators, M <= 3 to stay in 16 registers.
template <int M>
void int8_rows4(const int8_t* w, int64_t k_len, const float* x, float dots[][4]) {
    __m256 acc[M][4];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < 4; ++r) acc[m][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_len; k += 8) {
        __m256 wr[4];
        for (int r = 0; r < 4; ++r)
            wr[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + r * k_len + k))));
        for (int m = 0; m < M; ++m) {
            const __m256 xv = _mm256_loadu_ps(x + m * k_len + k);
            for (int r = 0; r < 4; ++r) acc[m][r] = _mm256_fmadd_ps(wr[r], xv, acc[m][r]);
        }
    }
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < 4; ++r) dots[m][r] = hsum256(acc[m][r]);
}
#endif

// y [rows][n] (T) = x [rows][k] (T: fp32 or bf16) times w [n][k] (int8) scaled per output row (T), rounded
// once: the product aten._weight_int8pack_mm computes. Output rows are split over the OpenMP threads.
template <typename T>
void int8_gemm(const T* x, int64_t rows, int64_t k_len, const int8_t* w, const T* scale, int64_t n, T* y) {
    std::vector<float> xf(rows * k_len);
    for (int64_t i = 0; i < rows * k_len; ++i) xf[i] = to_float(x[i]);
    const int64_t quads = n / 4;
#pragma omp parallel for schedule(static) if (quads >= 64)
    for (int64_t q = 0; q < quads + (n % 4 != 0); ++q) {
        const int64_t r0 = q * 4, live = n - r0 < 4 ? n - r0 : 4;
        int8_t tail[4 * 4096];  // the last rows, padded to 4 with zeros (k_len <= 4096 checked by the caller)
        const int8_t* wq = w + r0 * k_len;
        if (live < 4) {
            std::memset(tail, 0, 4 * k_len);
            std::memcpy(tail, wq, live * k_len);
            wq = tail;
        }
        for (int64_t m0 = 0; m0 < rows; m0 += kInt8Rows) {
            const int64_t mc = rows - m0 < kInt8Rows ? rows - m0 : kInt8Rows;
            float dots[4][4];
            const float* xm = xf.data() + m0 * k_len;
            switch (mc) {
                case 1: int8_rows4<1>(wq, k_len, xm, dots); break;
                case 2: int8_rows4<2>(wq, k_len, xm, dots); break;
#if defined(__AVX512F__)
                case 3: int8_rows4<3>(wq, k_len, xm, dots); break;
                default: int8_rows4<4>(wq, k_len, xm, dots); break;
#else
                default: int8_rows4<3>(wq, k_len, xm, dots); break;
#endif
            }
            for (int64_t m = 0; m < mc; ++m)
                for (int64_t r = 0; r < live; ++r)
                    from_float(dots[m][r] * to_float(scale[r0 + r]), y + (m0 + m) * n + r0 + r);
        }
    }
}

}  // namespace minisgl
#endif
