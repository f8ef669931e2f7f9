// The small ops of a decode step: RMSNorm (plain and fused with the residual add), rotary embedding,
// SiLU-and-mul, and paged decode attention with its KV store.
//
// Numerics follow HF's eager modules for bf16: every intermediate HF materialises as a bf16 tensor is rounded
// to bf16 here too (round to nearest even), sums and dot products accumulate in fp32. For fp32 the rounding
// is the identity. `*_stride` arguments are row strides in elements; the last dim is always contiguous.
#pragma once

#include <algorithm>
#include <vector>

#include "numerics.h"

namespace minisgl {

template <typename T>
float inv_rms(const T* x, int64_t dim, float eps) {
    float ss = 0.0f;
    for (int64_t i = 0; i < dim; ++i) {
        const float v = to_float(x[i]);
        ss += v * v;
    }
    return 1.0f / std::sqrt(ss / float(dim) + eps);
}

// HF: weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)
template <typename T>
void rmsnorm_row(const T* x, const T* w, T* out, int64_t dim, float eps) {
    const float r = inv_rms(x, dim, eps);
    for (int64_t i = 0; i < dim; ++i) from_float(to_float(w[i]) * round_as<T>(to_float(x[i]) * r), out + i);
}

template <typename T>
void rmsnorm(const T* x, int64_t x_stride, const T* w, T* out, int64_t out_stride, int64_t rows, int64_t dim,
             float eps) {
    for (int64_t t = 0; t < rows; ++t) rmsnorm_row(x + t * x_stride, w, out + t * out_stride, dim, eps);
}

// residual <- x + residual; x <- rmsnorm(residual), both in place.
template <typename T>
void add_rmsnorm(T* x, T* residual, const T* w, int64_t rows, int64_t dim, float eps) {
    for (int64_t t = 0; t < rows; ++t) {
        T* xr = x + t * dim;
        T* rr = residual + t * dim;
        for (int64_t i = 0; i < dim; ++i) from_float(to_float(xr[i]) + to_float(rr[i]), rr + i);
        rmsnorm_row(rr, w, xr, dim, eps);
    }
}

// In place; HF: x * cos + rotate_half(x) * sin, each product rounded. Pairs (i, i + half) of every head.
template <typename T>
void rotary(T* x, int64_t x_stride, int64_t heads, int64_t head_dim, const T* cos, const T* sin, int64_t half,
            int64_t rows) {
    for (int64_t t = 0; t < rows; ++t) {
        const T* c = cos + t * half;
        const T* s = sin + t * half;
        for (int64_t h = 0; h < heads; ++h) {
            T* x1 = x + t * x_stride + h * head_dim;
            T* x2 = x1 + half;
            for (int64_t i = 0; i < half; ++i) {
                const float a = to_float(x1[i]), b = to_float(x2[i]);
                const float ci = to_float(c[i]), si = to_float(s[i]);
                const float o1 = round_as<T>(a * ci) - round_as<T>(b * si);
                const float o2 = round_as<T>(b * ci) + round_as<T>(a * si);
                from_float(o1, x1 + i);
                from_float(o2, x2 + i);
            }
        }
    }
}

// x = [gate | up] per row; out = silu(gate) * up, HF rounding the activation before the product.
template <typename T>
void silu_and_mul(const T* x, T* out, int64_t rows, int64_t inter) {
    std::vector<float> act(inter);
    for (int64_t t = 0; t < rows; ++t) {
        const T* g = x + t * 2 * inter;
        const T* u = g + inter;
        for (int64_t i = 0; i < inter; ++i) {
            const float v = to_float(g[i]);
            act[i] = round_as<T>(v / (1.0f + fast_exp(-v)));
        }
        for (int64_t i = 0; i < inter; ++i) from_float(act[i] * to_float(u[i]), out + t * inter + i);
    }
}

// One (sequence, kv head) of decode attention: the `group` query heads q [group][dim] (fp32, scaled) that read
// this kv head attend over the n slots `seq_slots` of the caches; rows of out are `out_stride` apart. `scores`
// [group][n], `acc` [group][dim] and `row` [dim] are scratch. kDim > 0
// fixes the head size at compile time, so the inner loops unroll; kDim == 0 reads it from `dim`.
template <typename T, int kDim>
void attend_head(const float* q, int64_t group, int64_t dim, const T* k_cache, const T* v_cache, int64_t token,
                 const int64_t* seq_slots, int64_t n, T* out, int64_t out_stride, float* scores, float* acc,
                 float* row) {
    const int64_t d_len = kDim > 0 ? kDim : dim;
    for (int64_t p = 0; p < n; ++p) {
        const T* kr = k_cache + seq_slots[p] * token;
        for (int64_t d = 0; d < d_len; ++d) row[d] = to_float(kr[d]);
        for (int64_t g = 0; g < group; ++g) {
            const float* qg = q + g * d_len;
            float s = 0.0f;
            for (int64_t d = 0; d < d_len; ++d) s += qg[d] * row[d];
            scores[g * n + p] = s;
        }
    }
    for (int64_t g = 0; g < group; ++g) {
        float* sg = scores + g * n;
        float m = sg[0];
        for (int64_t p = 1; p < n; ++p) m = sg[p] > m ? sg[p] : m;
        float sum = 0.0f;
        for (int64_t p = 0; p < n; ++p) {
            sg[p] = fast_exp(sg[p] - m);
            sum += sg[p];
        }
        const float inv = 1.0f / sum;
        for (int64_t p = 0; p < n; ++p) sg[p] *= inv;
    }
    std::fill(acc, acc + group * d_len, 0.0f);
    for (int64_t p = 0; p < n; ++p) {
        const T* vr = v_cache + seq_slots[p] * token;
        for (int64_t d = 0; d < d_len; ++d) row[d] = to_float(vr[d]);
        for (int64_t g = 0; g < group; ++g) {
            const float w = scores[g * n + p];
            float* ag = acc + g * d_len;
            for (int64_t d = 0; d < d_len; ++d) ag[d] += w * row[d];
        }
    }
    for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < d_len; ++d) from_float(acc[g * d_len + d], out + g * out_stride + d);
}

// Writes each sequence's new k/v at out_loc[b], then attends: query head h of sequence b reads kv head
// h / (q_heads / kv_heads) at slots[b * max_len + p] for p < lens[b]. Scores, softmax and the weighted sum of
// values all stay in fp32; only the output is rounded. q/k/v rows are `*_stride` apart, their heads
// `*_hstride` apart. Large batches split (sequence, kv head) pairs over torch's OpenMP threads.
template <typename T, int kDim>
void decode_attention(const T* q, int64_t q_stride, int64_t q_hstride, const T* k, int64_t k_stride,
                      int64_t k_hstride, const T* v, int64_t v_stride, int64_t v_hstride, const int64_t* out_loc,
                      T* k_cache, T* v_cache, const int64_t* slots, const int64_t* lens, T* out, int64_t batch,
                      int64_t max_len, int64_t q_heads, int64_t kv_heads, int64_t head_dim, float scale) {
    const int64_t token = kv_heads * head_dim;  // elements of one slot
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t h = 0; h < kv_heads; ++h) {
            std::memcpy(k_cache + out_loc[b] * token + h * head_dim, k + b * k_stride + h * k_hstride,
                        head_dim * sizeof(T));
            std::memcpy(v_cache + out_loc[b] * token + h * head_dim, v + b * v_stride + h * v_hstride,
                        head_dim * sizeof(T));
        }
    const int64_t group = q_heads / kv_heads;
    const int64_t work = batch * kv_heads;
#pragma omp parallel if (work > 1)
    {
        std::vector<float> qf(group * head_dim), acc(group * head_dim), scores(group * max_len), row(head_dim);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < work; ++i) {
            const int64_t b = i / kv_heads, hk = i % kv_heads;
            for (int64_t g = 0; g < group; ++g)
                for (int64_t d = 0; d < head_dim; ++d)
                    qf[g * head_dim + d] = to_float(q[b * q_stride + (hk * group + g) * q_hstride + d]) * scale;
            attend_head<T, kDim>(qf.data(), group, head_dim, k_cache + hk * head_dim, v_cache + hk * head_dim, token,
                                 slots + b * max_len, lens[b], out + (b * q_heads + hk * group) * head_dim, head_dim,
                                 scores.data(), acc.data(), row.data());
        }
    }
}

template <typename T>
void decode_attention_any(const T* q, int64_t q_stride, int64_t q_hstride, const T* k, int64_t k_stride,
                          int64_t k_hstride, const T* v, int64_t v_stride, int64_t v_hstride, const int64_t* out_loc,
                          T* k_cache, T* v_cache, const int64_t* slots, const int64_t* lens, T* out, int64_t batch,
                          int64_t max_len, int64_t q_heads, int64_t kv_heads, int64_t head_dim, float scale) {
    auto run = [&](auto fn) {
        fn(q, q_stride, q_hstride, k, k_stride, k_hstride, v, v_stride, v_hstride, out_loc, k_cache, v_cache, slots,
           lens, out, batch, max_len, q_heads, kv_heads, head_dim, scale);
    };
    if (head_dim == 64)
        run(decode_attention<T, 64>);
    else if (head_dim == 128)
        run(decode_attention<T, 128>);
    else
        run(decode_attention<T, 0>);
}

}  // namespace minisgl
