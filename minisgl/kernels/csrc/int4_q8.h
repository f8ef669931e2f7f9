// int4 weights (int4.h's layout) times activations quantized to int8 per group of 32 inputs: integer dot
// products, as llama.cpp multiplies its 4-bit blocks by Q8 activations. An 8-bit multiply-add takes 32 products
// per instruction where an fp32 FMA takes 8, and a nibble needs no conversion to float, so this runs about twice
// the rate of int4.h's kernels; the price is the activations' rounding to 8 bits (per group: a scale of
// max|x| / 127). Used only where the user did not ask for exact matmuls (quant/int4.py says when).
//
// Per group g of 32 inputs and row r: y[r] += scale[r] * dx * sum_k q[r][k] qx[k] + min[r] * dx * sum_k qx[k],
// i.e. the group's dot with the quantized activations qx * dx in both terms.
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

#include <vector>

#include "int4.h"
#include "q8.h"

namespace minisgl {

// acc (8 x int32) += for each lane, the dot of its 4 unsigned bytes of a with the 4 signed bytes of b.
inline __m256i dot4(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, a, b);
#else  // maddubs cannot saturate here: 2 * 15 * 127 < 2^15
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

// Four k's of a 64-row block (4 x 32 bytes; the bytes kWeightAhead on are prefetched) as eight vectors of 8 rows
// x 4 k's in nibbles, each byte a code. Vector c (c < 4), int32 lane i holds row 16 (i / 4) + 4c + i % 4 (low
// nibbles); vector 4 + c the same rows + 32.
inline void unpack4(const uint8_t* p, __m256i u[8]) {
    prefetch_ahead(p, 128);
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i b0 = _mm256_loadu_si256((const __m256i*)p), b1 = _mm256_loadu_si256((const __m256i*)(p + 32));
    const __m256i b2 = _mm256_loadu_si256((const __m256i*)(p + 64)), b3 = _mm256_loadu_si256((const __m256i*)(p + 96));
    const __m256i t0 = _mm256_unpacklo_epi8(b0, b1), t1 = _mm256_unpackhi_epi8(b0, b1);
    const __m256i t2 = _mm256_unpacklo_epi8(b2, b3), t3 = _mm256_unpackhi_epi8(b2, b3);
    const __m256i v[4] = {_mm256_unpacklo_epi16(t0, t2), _mm256_unpackhi_epi16(t0, t2), _mm256_unpacklo_epi16(t1, t3),
                          _mm256_unpackhi_epi16(t1, t3)};
    for (int c = 0; c < 4; ++c) {
        u[c] = _mm256_and_si256(v[c], low);
        u[4 + c] = _mm256_and_si256(_mm256_srli_epi16(v[c], 4), low);
    }
}

// y[0..63] += one group's integer sums (unpack4's lane order) scaled: acc * scale * dx + min * sx.
inline void q8_group_out(const __m256i acc[8], const uint16_t* smg, float dx, float sx, float* y) {
    const __m256 d = _mm256_set1_ps(dx), s = _mm256_set1_ps(sx);
    for (int h = 0; h < 2; ++h) {  // h = 1: the high nibbles, rows 32..63
        const __m256i* a = acc + 4 * h;
        // into row order: rows 0-7 are lanes 0-3 of a[0] and a[1], rows 8-15 those of a[2] and a[3], and so on
        const __m256i rows[4] = {_mm256_permute2x128_si256(a[0], a[1], 0x20), _mm256_permute2x128_si256(a[2], a[3], 0x20),
                                 _mm256_permute2x128_si256(a[0], a[1], 0x31), _mm256_permute2x128_si256(a[2], a[3], 0x31)};
        for (int i = 0; i < 4; ++i) {
            const int r = 32 * h + 8 * i;
            const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(smg + r)));
            const __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(smg + 64 + r)));
            const __m256 base = _mm256_fmadd_ps(mins, s, _mm256_loadu_ps(y + r));
            _mm256_storeu_ps(y + r, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(rows[i]), d), scale, base));
        }
    }
}

// acc[i] = the int32 sums over a group's 8 steps of 4 k's: codes w(s)[i] (unpack4's vectors) times the 4
// activations q[4s..4s+3], broadcast.
template <typename Codes>
inline void group_dots(Codes w, const int8_t* q, __m256i acc[8]) {
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_si256();
    for (int s = 0; s < 8; ++s) {
        const __m256i xb = _mm256_set1_epi32(*(const int32_t*)(q + 4 * s));
        const __m256i* ws = w(s);
        for (int i = 0; i < 8; ++i) acc[i] = dot4(acc[i], ws[i], xb);
    }
}

// y [M][64] = M rows of quantized x times one 64-row block. One row: each 4-k step is unpacked and used at once.
// Several: a group's codes are unpacked once into a 2 KB buffer that every row then reads from L1.
inline void int4_q8_block(const uint8_t* w, const uint16_t* sm, const int8_t* qx, const float* dx, const float* sx,
                          int64_t k_len, int64_t m_rows, float* y) {
    const int64_t groups = k_len / 32;
    for (int64_t i = 0; i < m_rows * 64; ++i) y[i] = 0.0f;
    alignas(32) __m256i staged[8][8];
    for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* wg = w + g * 32 * 32;
        __m256i acc[8];
        if (m_rows == 1) {
            __m256i u[8];
            group_dots([&](int s) { return unpack4(wg + s * 128, u), u; }, qx + g * 32, acc);
            q8_group_out(acc, sm + g * 128, dx[g], sx[g], y);
            continue;
        }
        for (int s = 0; s < 8; ++s) unpack4(wg + s * 128, staged[s]);
        for (int64_t m = 0; m < m_rows; ++m) {
            group_dots([&](int s) { return staged[s]; }, qx + m * k_len + g * 32, acc);
            q8_group_out(acc, sm + g * 128, dx[m * groups + g], sx[m * groups + g], y + m * 64);
        }
    }
}

// int4_gemm's contract (int4.h) with x quantized to int8 per group of 32 first.
template <typename T>
void int4_q8_gemm(const T* x, int64_t rows, int64_t k_len, const uint8_t* w, const uint16_t* sm, int64_t n, T* y) {
    const int64_t groups = k_len / 32;
    std::vector<int8_t> qx(rows * k_len);
    std::vector<float> dx(rows * groups), sx(rows * groups);
    for (int64_t m = 0; m < rows; ++m)
        quantize_q8_row(x + m * k_len, k_len, qx.data() + m * k_len, dx.data() + m * groups, sx.data() + m * groups);
    // 16 rows of x per pass: bounds the output buffer
    for_each_int4_block<16>(rows, k_len, w, sm, n, y, [&](auto wb, auto smb, int64_t m0, int64_t mc, float* out) {
        const int64_t g0 = m0 * groups;
        int4_q8_block(wb, smb, qx.data() + m0 * k_len, dx.data() + g0, sx.data() + g0, k_len, mc, out);
    });
}

}  // namespace minisgl
#endif
