// The small ops of a decode step: RMSNorm (plain and fused with the residual add), rotary embedding and
// SiLU-and-mul (decode attention is attention.h).
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

}  // namespace minisgl
