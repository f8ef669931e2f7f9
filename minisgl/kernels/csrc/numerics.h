// bf16 and fp16 <-> fp32 and the rounding helpers every CPU kernel shares, and a vectorisable exp.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace minisgl {

using bf16 = uint16_t;

// IEEE half, a storage type only (KV caches): a struct, so overloads tell it apart from bf16's bits. Both ISA
// levels have F16C, whose conversions round to nearest even as torch's .to(torch.float16) does.
struct f16 {
    uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
    uint32_t u = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float to_float(f16 x) { return _cvtsh_ss(x.bits); }

inline void from_float(float x, float* out) { *out = x; }
inline void from_float(float x, f16* out) { out->bits = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }
inline void from_float(float x, bf16* out) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN (quiet)
        *out = bf16((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    *out = bf16(u >> 16);
}

// A weight matmul at a few rows of x streams its weight from memory once per call. The hardware prefetchers
// alone kept a core's loads well short of what it can draw (docs/benchmarks.md, the vocabulary head), so the
// integer kernels ask for their weight's bytes kWeightAhead ahead of where they read, into L1.
constexpr int64_t kWeightAhead = 8192;

// Prefetch the cache lines of [p + kWeightAhead, p + kWeightAhead + bytes); past the weight's end it loads
// nothing (a prefetch never faults).
inline void prefetch_ahead(const void* p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char*)p + kWeightAhead + b, _MM_HINT_T0);
}

// x rounded to T's precision and back: where HF would store a T tensor between two ops.
template <typename T>
inline float round_as(float x) {
    T t;
    from_float(x, &t);
    return to_float(t);
}

// exp(x) to ~2 ulp for x in float range, written so the compiler vectorises it (std::exp is a scalar call).
inline float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = std::nearbyint(x * 1.44269504088896341f);  // x = n ln2 + r, |r| <= ln2 / 2
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    const float r2 = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    const int32_t bits = (int32_t(n) + 127) << 23;  // 2^n
    float scale;
    std::memcpy(&scale, &bits, 4);
    return p * scale;
}

}  // namespace minisgl
