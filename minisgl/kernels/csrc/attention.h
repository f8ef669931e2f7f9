// Paged decode attention with its KV store: one new token per sequence attends over that sequence's cached
// positions. The caches hold the activations' type T or fp16 (C); scores, softmax and sums are fp32 throughout.
//
// Each (sequence, kv head) splits its positions into chunks of kChunk, one work item each (flash-decoding's
// split): the `group` query heads that read the kv head get, per chunk, the unnormalised partials m (max score),
// l (sum of exp(s - m)) and acc (sum of exp(s - m) v), merged afterwards. The chunks are fixed by the sequence's
// length alone, so a sequence's result never depends on the batch it is in or on the number of threads, and one
// long sequence still spreads over every thread.
//
// Within a chunk, positions go 8 at a time: their k (or v) rows, widened to fp32 once into an L1 scratch block
// unless the cache is fp32, serve every query head of the group; a head's 8 dot products are reduced together
// (no horizontal sum per position).
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "numerics.h"

namespace minisgl {

constexpr int64_t kChunk = 256;  // positions per work item

// n cached values (the cache's type C) widened to fp32 in `out`.
template <typename C>
inline void widen(const C* x, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = to_float(x[i]);
}
inline void widen(const f16* x, float* out, int64_t n) {  // F16C, 8 at a time: the compiler does not vectorise it
    for (int64_t i = 0; i < n; i += 8)  // n is a multiple of 8 (attention_fits)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + i))));
}

// dst (C) = src (T) rounded to C: a copy when they are the same type.
template <typename T, typename C>
inline void store_row(const T* src, C* dst, int64_t n) {
    if constexpr (std::is_same_v<T, C>)
        std::memcpy(dst, src, n * sizeof(T));
    else
        for (int64_t i = 0; i < n; ++i) from_float(to_float(src[i]), dst + i);
}

// The sums of a[0..7], in that order, as one vector.
inline __m256 sum8x8(const __m256 a[8]) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // per 128-bit half: a0..a3, a4..a7
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Pointers to 8 rows of the cache for one kv head as fp32: slots[0..live) (read in place from an fp32 cache, else
// widened into `scratch` [8][dim]), then `zeros`.
template <typename C>
inline void block_rows(const C* cache, int64_t token, const int64_t* slots, int64_t live, int64_t dim,
                       float* scratch, const float* zeros, const float* rows[8]) {
    for (int64_t j = 0; j < 8; ++j) {
        if (j >= live) {
            rows[j] = zeros;
        } else if constexpr (std::is_same_v<C, float>) {
            rows[j] = cache + slots[j] * token;
        } else {
            widen(cache + slots[j] * token, scratch + j * dim, dim);
            rows[j] = scratch + j * dim;
        }
    }
}

// Asks for the 8 rows at slots[p..p + 8) (those below n) ahead of their use: a sequence's rows are runs of a
// page's tokens scattered over the pool, too short for the hardware's stride prefetcher to follow.
constexpr int64_t kAhead = 16;
template <typename C>
inline void prefetch_rows(const C* cache, int64_t token, const int64_t* slots, int64_t p, int64_t n, int64_t dim) {
    for (int64_t j = p; j < std::min(p + 8, n); ++j) {
        const char* row = (const char*)(cache + slots[j] * token);
        for (int64_t b = 0; b < dim * int64_t(sizeof(C)); b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
    }
}

// One chunk: q [group][dim] (fp32, scaled) over the n <= kChunk positions at `slots` of one kv head. Writes
// part[g] = {m, l, acc[dim]} for each query head g. Scratch: `scores` [group][kChunk], `block` [8][dim], `zeros`
// [dim] (all zero).
template <typename C, int kDim>
void attend_chunk(const float* q, int64_t group, int64_t dim_rt, const C* k_cache, const C* v_cache, int64_t token,
                  const int64_t* slots, int64_t n, float* part, float* scores, float* block, const float* zeros) {
    const int64_t dim = kDim > 0 ? kDim : dim_rt, nv = dim / 8, padded = (n + 7) / 8 * 8;
    const float* rows[8];
    for (int64_t p = 0; p < n; p += 8) {
        prefetch_rows(k_cache, token, slots, p + kAhead, n, dim);
        block_rows(k_cache, token, slots + p, std::min<int64_t>(8, n - p), dim, block, zeros, rows);
        for (int64_t g = 0; g < group; ++g) {
            __m256 a[8];
            for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
            for (int64_t c = 0; c < nv; ++c) {
                const __m256 qv = _mm256_loadu_ps(q + g * dim + 8 * c);
                for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[j] + 8 * c), qv, a[j]);
            }
            _mm256_storeu_ps(scores + g * kChunk + p, sum8x8(a));  // scratch has room up to `padded`
        }
    }
    for (int64_t g = 0; g < group; ++g) {
        float* sg = scores + g * kChunk;
        for (int64_t p = n; p < padded; ++p) sg[p] = -INFINITY;  // the last block's zero rows
        __m256 mv = _mm256_loadu_ps(sg);
        for (int64_t p = 8; p < padded; p += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sg + p));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        const float m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        float l = 0.0f;
        for (int64_t p = 0; p < n; ++p) {
            sg[p] = fast_exp(sg[p] - m);
            l += sg[p];
        }
        for (int64_t p = n; p < padded; ++p) sg[p] = 0.0f;  // ... weigh nothing
        float* pg = part + g * (dim + 2);
        pg[0] = m;
        pg[1] = l;
        std::fill(pg + 2, pg + 2 + dim, 0.0f);
    }
    prefetch_rows(v_cache, token, slots, 0, n, dim);
    for (int64_t p = 0; p < n; p += 8) {
        prefetch_rows(v_cache, token, slots, p + kAhead, n, dim);
        block_rows(v_cache, token, slots + p, std::min<int64_t>(8, n - p), dim, block, zeros, rows);
        for (int64_t g = 0; g < group; ++g) {
            __m256 w[8];
            for (int j = 0; j < 8; ++j) w[j] = _mm256_set1_ps(scores[g * kChunk + p + j]);
            float* acc = part + g * (dim + 2) + 2;
            for (int64_t c = 0; c < nv; ++c) {
                __m256 s = _mm256_loadu_ps(acc + 8 * c);
                for (int j = 0; j < 8; ++j) s = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(rows[j] + 8 * c), s);
                _mm256_storeu_ps(acc + 8 * c, s);
            }
        }
    }
}

// Writes each sequence's new k/v at out_loc[b] (rounded to the caches' type C), then attends: query head h of
// sequence b reads kv head h / (q_heads / kv_heads) at slots[b * max_len + p] for p < lens[b] (>= 1). Only the
// output is rounded (to T). q/k/v rows are `*_stride` apart, their heads `*_hstride` apart. head_dim is a
// multiple of 8; kDim > 0 fixes it at compile time, so the inner loops unroll.
template <typename T, typename C, int kDim>
void decode_attention(const T* q, int64_t q_stride, int64_t q_hstride, const T* k, int64_t k_stride,
                      int64_t k_hstride, const T* v, int64_t v_stride, int64_t v_hstride, const int64_t* out_loc,
                      C* k_cache, C* v_cache, const int64_t* slots, const int64_t* lens, T* out, int64_t batch,
                      int64_t max_len, int64_t q_heads, int64_t kv_heads, int64_t head_dim, float scale) {
    const int64_t token = kv_heads * head_dim;  // elements of one slot
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t h = 0; h < kv_heads; ++h) {
            store_row(k + b * k_stride + h * k_hstride, k_cache + out_loc[b] * token + h * head_dim, head_dim);
            store_row(v + b * v_stride + h * v_hstride, v_cache + out_loc[b] * token + h * head_dim, head_dim);
        }
    const int64_t group = q_heads / kv_heads, part_len = group * (head_dim + 2);
    auto chunks_of = [&](int64_t b) { return (lens[b] + kChunk - 1) / kChunk; };
    // Work items (b, h, chunk) in that order: first[b] is sequence b's first item at kv head 0.
    std::vector<int64_t> first(batch + 1, 0);
    for (int64_t b = 0; b < batch; ++b) first[b + 1] = first[b] + kv_heads * chunks_of(b);
    const int64_t work = first[batch];
    std::vector<float> parts(work * part_len);
#pragma omp parallel if (work > 1)
    {
        std::vector<float> qf(group * head_dim), scores(group * kChunk), block(8 * head_dim), zeros(head_dim),
            acc(head_dim);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < work; ++i) {
            const int64_t b = std::upper_bound(first.begin(), first.end(), i) - first.begin() - 1;
            const int64_t chunks = chunks_of(b), h = (i - first[b]) / chunks;
            const int64_t c = (i - first[b]) % chunks, p0 = c * kChunk, n = std::min(kChunk, lens[b] - p0);
            for (int64_t g = 0; g < group; ++g)
                for (int64_t d = 0; d < head_dim; ++d)
                    qf[g * head_dim + d] = to_float(q[b * q_stride + (h * group + g) * q_hstride + d]) * scale;
            attend_chunk<C, kDim>(qf.data(), group, head_dim, k_cache + h * head_dim, v_cache + h * head_dim, token,
                                  slots + b * max_len + p0, n, parts.data() + i * part_len, scores.data(),
                                  block.data(), zeros.data());
        }
        // Merge each (sequence, kv head)'s chunks: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c.
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < batch * kv_heads; ++bh) {
            const int64_t b = bh / kv_heads, h = bh % kv_heads, chunks = chunks_of(b);
            const float* pb = parts.data() + (first[b] + h * chunks) * part_len;
            for (int64_t g = 0; g < group; ++g) {
                float big = pb[g * (head_dim + 2)];
                for (int64_t c = 1; c < chunks; ++c) big = std::max(big, pb[c * part_len + g * (head_dim + 2)]);
                std::fill(acc.begin(), acc.end(), 0.0f);
                float l = 0.0f;
                for (int64_t c = 0; c < chunks; ++c) {
                    const float* pg = pb + c * part_len + g * (head_dim + 2);
                    const float w = chunks == 1 ? 1.0f : fast_exp(pg[0] - big);
                    l += w * pg[1];
                    for (int64_t d = 0; d < head_dim; ++d) acc[d] += w * pg[2 + d];
                }
                const float inv = 1.0f / l;
                T* o = out + (b * q_heads + h * group + g) * head_dim;
                for (int64_t d = 0; d < head_dim; ++d) from_float(acc[d] * inv, o + d);
            }
        }
    }
}

template <typename T, typename C>
void decode_attention_any(const T* q, int64_t q_stride, int64_t q_hstride, const T* k, int64_t k_stride,
                          int64_t k_hstride, const T* v, int64_t v_stride, int64_t v_hstride, const int64_t* out_loc,
                          C* k_cache, C* v_cache, const int64_t* slots, const int64_t* lens, T* out, int64_t batch,
                          int64_t max_len, int64_t q_heads, int64_t kv_heads, int64_t head_dim, float scale) {
    auto run = [&](auto fn) {
        fn(q, q_stride, q_hstride, k, k_stride, k_hstride, v, v_stride, v_hstride, out_loc, k_cache, v_cache, slots,
           lens, out, batch, max_len, q_heads, kv_heads, head_dim, scale);
    };
    if (head_dim == 64)
        run(decode_attention<T, C, 64>);
    else if (head_dim == 128)
        run(decode_attention<T, C, 128>);
    else
        run(decode_attention<T, C, 0>);
}

}  // namespace minisgl
#endif
