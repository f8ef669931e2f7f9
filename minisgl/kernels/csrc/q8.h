// Activations rounded to int8 per group of 32 inputs, as llama.cpp quantizes them for its Q4/Q8 dot products
// (its Q8 blocks): the integer kernels (int4_q8.h, int8_q8.h) multiply by these.
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

#include <cmath>

#include "numerics.h"

namespace minisgl {

inline __m256 load8_float(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8_float(const bf16* x) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)x)), 16));
}

// x [k_len] -> qx (int8, round to nearest, ties to even), dx (the group's scale) and, unless sx is null, sx (dx *
// the group's sum of qx: the int4 kernel's min term). Vectorised: at batch 1 every integer matmul's input passes
// through here once.
template <typename T>
void quantize_q8_row(const T* x, int64_t k_len, int8_t* qx, float* dx, float* sx) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // packs interleave 128-bit lanes
    for (int64_t g = 0; g < k_len / 32; ++g) {
        __m256 v[4];
        for (int i = 0; i < 4; ++i) v[i] = load8_float(x + g * 32 + 8 * i);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m256i q[4];
        for (int i = 0; i < 4; ++i)
            q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i*)(qx + g * 32), _mm256_permutevar8x32_epi32(bytes, order));
        dx[g] = d;
        if (!sx) continue;
        const __m256i t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0x4e));
        u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0xb1));
        sx[g] = d * float(_mm_cvtsi128_si32(u));
    }
}

}  // namespace minisgl
#endif
