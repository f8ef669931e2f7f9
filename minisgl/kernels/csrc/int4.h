// Weight-only int4 matmul on minisgl's own CPU int4 layout (quant/int4.py writes it), for AVX-512 and for AVX2.
//
// The layout, per block of 64 output rows (the last block padded with zero rows):
//   packed [K][32] bytes: for input k, byte j holds row j in its low nibble and row 32 + j in its high one;
//   sm     [K/32][2][64] fp16: per group of 32 inputs, the 64 rows' scales, then their mins.
// w[r][k] = q * scale + min, q in [0, 15]: GGUF's Q4_1 form (Q4_0's min is -8 scale), with the file's fp16 values.
// Blocks follow each other: block b's bytes start at packed + b * K * 32, its scales at sm + b * K / 32 * 128.
//
// Per group: acc = sum_k x_k q_k (fp32 FMA), then y += scale * acc + min * sum_k x_k. A nibble becomes a float
// with an integer convert; x is widened to fp32 once per call.
#pragma once

#include <vector>

#include "numerics.h"

#if defined(__AVX2__)
#include <immintrin.h>

namespace minisgl {

constexpr int64_t kInt4Block = 64;

#if defined(__AVX512F__)
// y[M][64] (fp32) = x[M][K] (fp32) times one 64-row block. Each k's 32 bytes become four 16-lane vectors of
// rows, each used for all M rows of x.
// With one row of x (M = 1), even and odd k accumulate apart: 4 FMA chains alone would wait on FMA latency.
template <int M>
void int4_block(const uint8_t* w, const uint16_t* sm, const float* x, const float* xsum, int64_t k_len, float* y) {
    constexpr int P = M == 1 ? 2 : 1;  // accumulator sets per row of x
    const __m512i low = _mm512_set1_epi32(0x0f);
    const int64_t groups = k_len / 32;
    __m512 out[M][4];
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < 4; ++i) out[m][i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        __m512 acc[M][P][4];
        for (int m = 0; m < M; ++m)
            for (int p = 0; p < P; ++p)
                for (int i = 0; i < 4; ++i) acc[m][p][i] = _mm512_setzero_ps();
        const uint8_t* wg = w + g * 32 * 32;
        for (int kk = 0; kk < 32; ++kk) {
            const int p = kk % P;
            const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wg + kk * 32)));
            const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wg + kk * 32 + 16)));
            const __m512 w0 = _mm512_cvtepi32_ps(_mm512_and_si512(b0, low));  // rows 0..15
            const __m512 w1 = _mm512_cvtepi32_ps(_mm512_and_si512(b1, low));  // rows 16..31
            const __m512 w2 = _mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4));   // rows 32..47
            const __m512 w3 = _mm512_cvtepi32_ps(_mm512_srli_epi32(b1, 4));   // rows 48..63
            for (int m = 0; m < M; ++m) {
                const __m512 xb = _mm512_set1_ps(x[m * k_len + g * 32 + kk]);
                acc[m][p][0] = _mm512_fmadd_ps(w0, xb, acc[m][p][0]);
                acc[m][p][1] = _mm512_fmadd_ps(w1, xb, acc[m][p][1]);
                acc[m][p][2] = _mm512_fmadd_ps(w2, xb, acc[m][p][2]);
                acc[m][p][3] = _mm512_fmadd_ps(w3, xb, acc[m][p][3]);
            }
        }
        if constexpr (P == 2)
            for (int i = 0; i < 4; ++i) acc[0][0][i] = _mm512_add_ps(acc[0][0][i], acc[0][1][i]);
        const uint16_t* smg = sm + g * 128;
        for (int i = 0; i < 4; ++i) {
            const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(smg + 16 * i)));
            const __m512 mins = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(smg + 64 + 16 * i)));
            for (int m = 0; m < M; ++m)
                out[m][i] = _mm512_fmadd_ps(acc[m][0][i], scale,
                                            _mm512_fmadd_ps(mins, _mm512_set1_ps(xsum[m * groups + g]), out[m][i]));
        }
    }
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < 4; ++i) _mm512_storeu_ps(y + m * 64 + 16 * i, out[m][i]);
}
constexpr int kInt4Rows = 4;  // rows of x per pass over a block
#else
// AVX2, one row of x: the whole block at once (8 accumulators of 8 rows), so each k's 32 bytes are loaded and
// split into nibbles once: about two thirds of the instructions of the quarter-wise loop below at M = 1.
inline void int4_block_row(const uint8_t* w, const uint16_t* sm, const float* x, const float* xsum, int64_t k_len,
                           float* y) {
    const __m256i low = _mm256_set1_epi32(0x0f);
    const int64_t groups = k_len / 32;
    for (int i = 0; i < 64; ++i) y[i] = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* wg = w + g * 32 * 32;
        __m256 acc[8];  // acc[c]: rows 8c..8c+7 (low nibbles of bytes 8c..), acc[4 + c]: rows 32 + 8c.. (high)
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
        for (int kk = 0; kk < 32; ++kk) {
            const __m256 xb = _mm256_broadcast_ss(x + g * 32 + kk);
            for (int c = 0; c < 4; ++c) {
                const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(wg + kk * 32 + 8 * c)));
                acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, low)), xb, acc[c]);
                acc[4 + c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), xb, acc[4 + c]);
            }
        }
        const uint16_t* smg = sm + g * 128;
        const __m256 sx = _mm256_set1_ps(xsum[g]);
        for (int i = 0; i < 8; ++i) {
            const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(smg + 8 * i)));
            const __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(smg + 64 + 8 * i)));
            const __m256 base = _mm256_fmadd_ps(mins, sx, _mm256_loadu_ps(y + 8 * i));
            _mm256_storeu_ps(y + 8 * i, _mm256_fmadd_ps(acc[i], scale, base));
        }
    }
}

// AVX2: 16 registers of 8 lanes, so a block is done a quarter (16 rows, two vectors) at a time; each quarter's
// nibbles are converted once per k and used for all M rows of x (up to 4: 8 accumulators, 4 broadcasts).
template <int M>
void int4_block(const uint8_t* w, const uint16_t* sm, const float* x, const float* xsum, int64_t k_len, float* y) {
    if constexpr (M == 1) {
        int4_block_row(w, sm, x, xsum, k_len, y);
        return;
    }
    const __m256i low = _mm256_set1_epi32(0x0f);
    const int64_t groups = k_len / 32;
    for (int m = 0; m < M; ++m)
        for (int i = 0; i < 64; ++i) y[m * 64 + i] = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* wg = w + g * 32 * 32;
        const uint16_t* smg = sm + g * 128;
        for (int quarter = 0; quarter < 4; ++quarter) {
            const int byte0 = (quarter & 1) * 16, shift = (quarter >> 1) * 4, row0 = quarter * 16;
            __m256 acc[M][2];
            for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
            for (int kk = 0; kk < 32; ++kk) {
                const uint8_t* p = wg + kk * 32 + byte0;
                __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
                __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)));
                b0 = _mm256_and_si256(_mm256_srli_epi32(b0, shift), low);
                b1 = _mm256_and_si256(_mm256_srli_epi32(b1, shift), low);
                const __m256 w0 = _mm256_cvtepi32_ps(b0), w1 = _mm256_cvtepi32_ps(b1);
                for (int m = 0; m < M; ++m) {
                    const __m256 xb = _mm256_broadcast_ss(x + m * k_len + g * 32 + kk);
                    acc[m][0] = _mm256_fmadd_ps(w0, xb, acc[m][0]);
                    acc[m][1] = _mm256_fmadd_ps(w1, xb, acc[m][1]);
                }
            }
            for (int i = 0; i < 2; ++i) {
                const int r = row0 + 8 * i;
                const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(smg + r)));
                const __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(smg + 64 + r)));
                for (int m = 0; m < M; ++m) {
                    float* ym = y + m * 64 + r;
                    const __m256 base = _mm256_fmadd_ps(mins, _mm256_set1_ps(xsum[m * groups + g]), _mm256_loadu_ps(ym));
                    _mm256_storeu_ps(ym, _mm256_fmadd_ps(acc[m][i], scale, base));
                }
            }
        }
    }
}
constexpr int kInt4Rows = 4;
#endif

// The shape of both int4 matmuls (this one and int4_q8.h's): y [rows][n] (T) from x [rows][k] and the int4
// weight in the layout above. Blocks of 64 output rows are split over the OpenMP threads; within a block, rows
// of x go kPerPass at a time, so each weight byte is fetched from memory once per call and reused from cache for
// every row of x. block(wb, smb, m0, mc, out) writes out [mc][64], the block's products with rows m0..m0+mc-1.
template <int64_t kPerPass, typename T, typename Block>
void for_each_int4_block(int64_t rows, int64_t k_len, const uint8_t* w, const uint16_t* sm, int64_t n, T* y,
                         Block block) {
    const int64_t groups = k_len / 32, blocks = (n + kInt4Block - 1) / kInt4Block;
#pragma omp parallel for schedule(static) if (blocks >= 4)
    for (int64_t b = 0; b < blocks; ++b) {
        float out[kPerPass * 64];
        const int64_t live = n - b * 64 < 64 ? n - b * 64 : 64;  // padding rows are not stored
        for (int64_t m0 = 0; m0 < rows; m0 += kPerPass) {
            const int64_t mc = rows - m0 < kPerPass ? rows - m0 : kPerPass;
            block(w + b * k_len * 32, sm + b * groups * 128, m0, mc, out);
            for (int64_t m = 0; m < mc; ++m)
                for (int64_t r = 0; r < live; ++r) from_float(out[m * 64 + r], y + (m0 + m) * n + b * 64 + r);
        }
    }
}

// y = x (T, fp32 or bf16) times the int4 weight, in fp32; k is a multiple of 32.
template <typename T>
void int4_gemm(const T* x, int64_t rows, int64_t k_len, const uint8_t* w, const uint16_t* sm, int64_t n, T* y) {
    const int64_t groups = k_len / 32;
    std::vector<float> xf(rows * k_len), xsum(rows * groups, 0.0f);
    for (int64_t m = 0; m < rows; ++m)
        for (int64_t k = 0; k < k_len; ++k) {
            xf[m * k_len + k] = to_float(x[m * k_len + k]);
            xsum[m * groups + k / 32] += xf[m * k_len + k];
        }
    for_each_int4_block<kInt4Rows>(rows, k_len, w, sm, n, y, [&](auto wb, auto smb, int64_t m0, int64_t mc, float* out) {
        const float* xm = xf.data() + m0 * k_len;
        const float* sx = xsum.data() + m0 * groups;
        switch (mc) {
            case 1: int4_block<1>(wb, smb, xm, sx, k_len, out); break;
            case 2: int4_block<2>(wb, smb, xm, sx, k_len, out); break;
            case 3: int4_block<3>(wb, smb, xm, sx, k_len, out); break;
            default: int4_block<4>(wb, smb, xm, sx, k_len, out); break;
        }
    });
}

}  // namespace minisgl
#endif
