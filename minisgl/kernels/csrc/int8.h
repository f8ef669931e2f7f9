// Weight-only int8 matmul with a scale per group of input columns (GGUF's Q8_0: 32 columns; a whole row for
// per-channel scales), with AVX-512 or AVX2. w[r][k] = q[r][k] * scale[r][k / group]; q * scale is exact in fp32
// (8 x 11 significant bits at most for fp16 scales), so the sums see the file's dequantized values.
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

#include <vector>

#include "numerics.h"

namespace minisgl {

inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// dots[0][r] = x . w[r] for one row of x, at both levels in 8 lanes (measured faster than 16 at M = 1): the scales
// apply to each group's sums, not to every weight, and two interleaved sums per weight row make eight FMA chains.
inline void int8_rows4_one(const int8_t* w, int64_t k_len, const float* sc, int64_t groups, const float* x,
                           float dots[][4]) {
    const int64_t group = k_len / groups;
    __m256 acc[4];
    for (int r = 0; r < 4; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        __m256 sum[2][4];
        for (int r = 0; r < 4; ++r) sum[0][r] = sum[1][r] = _mm256_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
            if (k % 64 == 0)
                for (int r = 0; r < 4; ++r) prefetch_ahead(w + r * k_len + k, 64);
            for (int h = 0; h < 2; ++h) {
                const __m256 xv = _mm256_loadu_ps(x + k + 8 * h);
                for (int r = 0; r < 4; ++r) {
                    const __m128i q = _mm_loadl_epi64((const __m128i*)(w + r * k_len + k + 8 * h));
                    sum[h][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), xv, sum[h][r]);
                }
            }
        }
        for (int r = 0; r < 4; ++r)
            acc[r] = _mm256_fmadd_ps(_mm256_add_ps(sum[0][r], sum[1][r]), _mm256_set1_ps(sc[r * groups + g]), acc[r]);
    }
    for (int r = 0; r < 4; ++r) dots[0][r] = hsum256(acc[r]);
}

// dots[m][r] = x[m] . w[r] for M <= 2 rows of x and 4 weight rows, each weight widened and scaled (exactly) in a
// register as it is read: for a few rows of x, writing the dequantized quad to memory first (dot_rows4) costs
// more than it saves.
template <int M>
void int8_rows4_few(const int8_t* w, int64_t k_len, const float* sc, int64_t groups, const float* x,
                    float dots[][4]) {
    const int64_t group = k_len / groups;
    __m256 acc[M][4];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < 4; ++r) acc[m][r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        __m256 s[4];
        for (int r = 0; r < 4; ++r) s[r] = _mm256_set1_ps(sc[r * groups + g]);
        for (int64_t k = g * group; k < (g + 1) * group; k += 8) {
            if (k % 64 == 0)
                for (int r = 0; r < 4; ++r) prefetch_ahead(w + r * k_len + k, 64);
            __m256 xv[M];
            for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * k_len + k);
            for (int r = 0; r < 4; ++r) {
                const __m128i q = _mm_loadl_epi64((const __m128i*)(w + r * k_len + k));
                const __m256 wv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s[r]);
                for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(wv, xv[m], acc[m][r]);
            }
        }
    }
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < 4; ++r) dots[m][r] = hsum256(acc[m][r]);
}

// dots[m][r] = x[m] . wf[r] over k for M rows of x and 4 weight rows already dequantized to fp32 (wf[r] at
// r * k_len): with more than one row of x, each quad of weight rows is widened once and reused from L1 for all
// of them, so the inner loop is loads and FMAs only.
#if defined(__AVX512F__)
constexpr int64_t kInt8Rows = 4;  // rows of x per pass: 16 accumulators

template <int M>
void dot_rows4(const float* wf, int64_t k_len, const float* x, float dots[][4]) {
    __m512 acc[M][4];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_len; k += 16) {
        __m512 wr[4];
        for (int r = 0; r < 4; ++r) wr[r] = _mm512_loadu_ps(wf + r * k_len + k);
        for (int m = 0; m < M; ++m) {
            const __m512 xv = _mm512_loadu_ps(x + m * k_len + k);
            for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_fmadd_ps(wr[r], xv, acc[m][r]);
        }
    }
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < 4; ++r) dots[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}
#else
constexpr int64_t kInt8Rows = 3;  // 16 registers: 12 accumulators and 4 weights; the FMAs read x from L1

template <int M>
void dot_rows4(const float* wf, int64_t k_len, const float* x, float dots[][4]) {
    __m256 acc[M][4];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < 4; ++r) acc[m][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_len; k += 8) {
        __m256 wr[4];
        for (int r = 0; r < 4; ++r) wr[r] = _mm256_loadu_ps(wf + r * k_len + k);
        for (int m = 0; m < M; ++m) {
            const __m256 xv = _mm256_loadu_ps(x + m * k_len + k);
            for (int r = 0; r < 4; ++r) acc[m][r] = _mm256_fmadd_ps(wr[r], xv, acc[m][r]);
        }
    }
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < 4; ++r) dots[m][r] = hsum256(acc[m][r]);
}
#endif

constexpr int64_t kInt8FewRows = 3;  // up to this many rows of x, int8_rows4_few: no dequantized copy

// The shape of both int8 matmuls (this one and int8_q8.h's): y [rows][n] (T) from w [n][k] (int8) with fp32
// scales [n][groups], in quads of 4 weight rows. Tiles of 64 output rows go over the OpenMP threads; each quad is
// read from memory once and reused from cache for every row of x. quad(wq, sq, out, scratch) writes the quad's
// dots with every row m of x to out[m * kTile + 0..3] (the last quad of w comes padded to 4 rows with zeros);
// scratch is the thread's own buffer of `scratch_len` floats. Results gather in a per-tile buffer and are stored
// as contiguous runs: storing 4 values at a time into many rows of y far apart (a vocabulary-sized head) ran
// several times slower.
constexpr int64_t kInt8Tile = 64;

template <typename T, typename Quad>
void for_each_int8_quad(int64_t rows, int64_t k_len, const int8_t* w, const float* scale, int64_t groups, int64_t n,
                        T* y, int64_t scratch_len, Quad quad) {
    const int64_t tiles = (n + kInt8Tile - 1) / kInt8Tile;
#pragma omp parallel if (tiles >= 16)
    {
        std::vector<float> out(rows * kInt8Tile), scratch(scratch_len);
        std::vector<int8_t> tail;  // the last rows, padded to 4 with zeros
        std::vector<float> tail_scale;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
            const int64_t t0 = t * kInt8Tile, t_rows = n - t0 < kInt8Tile ? n - t0 : kInt8Tile;
            for (int64_t r0 = t0; r0 < t0 + t_rows; r0 += 4) {
                const int64_t live = n - r0 < 4 ? n - r0 : 4;
                const int8_t* wq = w + r0 * k_len;
                const float* sq = scale + r0 * groups;
                if (live < 4) {
                    tail.assign(4 * k_len, 0);
                    tail_scale.assign(4 * groups, 0.0f);
                    std::memcpy(tail.data(), wq, live * k_len);
                    std::memcpy(tail_scale.data(), sq, live * groups * sizeof(float));
                    wq = tail.data();
                    sq = tail_scale.data();
                }
                quad(wq, sq, out.data() + (r0 - t0), scratch.data());
            }
            for (int64_t m = 0; m < rows; ++m)
                for (int64_t r = 0; r < t_rows; ++r) from_float(out[m * kInt8Tile + r], y + m * n + t0 + r);
        }
    }
}

// y [rows][n] (T: fp32 or bf16) = x [rows][k] (T) times w [n][k] (int8) with fp32 scales [n][groups] (each for
// k / groups consecutive columns, a multiple of 16), in fp32, rounded once.
template <typename T>
void int8_gemm(const T* x, int64_t rows, int64_t k_len, const int8_t* w, const float* scale, int64_t groups,
               int64_t n, T* y) {
    const int64_t group = k_len / groups;
    std::vector<float> xf(rows * k_len);
    for (int64_t i = 0; i < rows * k_len; ++i) xf[i] = to_float(x[i]);
    const int64_t wf_len = rows > kInt8FewRows ? 4 * k_len : 0;
    for_each_int8_quad(rows, k_len, w, scale, groups, n, y, wf_len, [&](auto wq, auto sq, float* out, float* wf) {
        if (rows == 1) {
            float dots[1][4];
            int8_rows4_one(wq, k_len, sq, groups, xf.data(), dots);
            for (int64_t r = 0; r < 4; ++r) out[r] = dots[0][r];
            return;
        }
        if (rows <= kInt8FewRows) {
            for (int64_t m0 = 0; m0 < rows; m0 += 2) {
                float dots[2][4];
                if (rows - m0 >= 2)
                    int8_rows4_few<2>(wq, k_len, sq, groups, xf.data() + m0 * k_len, dots);
                else
                    int8_rows4_few<1>(wq, k_len, sq, groups, xf.data() + m0 * k_len, dots);
                for (int64_t m = m0; m < rows && m < m0 + 2; ++m)
                    for (int64_t r = 0; r < 4; ++r) out[m * kInt8Tile + r] = dots[m - m0][r];
            }
            return;
        }
        for (int64_t r = 0; r < 4; ++r)  // q * scale is exact in fp32
            for (int64_t g = 0; g < groups; ++g)
                for (int64_t k = g * group; k < (g + 1) * group; ++k)
                    wf[r * k_len + k] = float(wq[r * k_len + k]) * sq[r * groups + g];
        for (int64_t m0 = 0, mc; m0 < rows; m0 += mc) {
            mc = rows - m0 < kInt8Rows ? rows - m0 : kInt8Rows;
            if (kInt8Rows == 3 && rows - m0 == 4) mc = 2;  // 2 + 2 rows, not 3 + 1
            float dots[kInt8Rows][4];
            const float* xm = xf.data() + m0 * k_len;
            switch (mc) {
                case 1: dot_rows4<1>(wf, k_len, xm, dots); break;
#if defined(__AVX512F__)
                case 2: dot_rows4<2>(wf, k_len, xm, dots); break;
                case 3: dot_rows4<3>(wf, k_len, xm, dots); break;
                default: dot_rows4<4>(wf, k_len, xm, dots); break;
#else
                case 2: dot_rows4<2>(wf, k_len, xm, dots); break;
                default: dot_rows4<3>(wf, k_len, xm, dots); break;
#endif
            }
            for (int64_t m = 0; m < mc; ++m)
                for (int64_t r = 0; r < 4; ++r) out[(m0 + m) * kInt8Tile + r] = dots[m][r];
        }
    });
}

}  // namespace minisgl
#endif
