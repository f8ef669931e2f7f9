// Seeded Gumbel-max sampling, engine/draws.py's draw: per row, the first index of the largest
// fl32(x[t] + fl32(g)), g = -log(-log(u)) in double, u = ((bits >> 11) + 0.5) 2^-53, bits = splitmix64 of
// (seed, step, t) as random_bits computes them.
//
// torch computes the noise of every token (two double logs each) before its argmax. Here the noise is computed
// only for tokens that can still win: a table holds, for each 1/4096 of u's range, an upper bound of fl32(g),
// so a token's hash alone bounds its score, and a token whose bound cannot beat the best score so far is
// skipped. Skipping is exact (rounding is monotone, so a score never exceeds its bound); only the top slice of
// u, whose noise is unbounded, always costs the logs.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include <omp.h>

namespace minisgl {

inline uint64_t splitmix_mix(uint64_t x) {
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;  // splitmix64's stream increment

inline float gumbel_noise_of(uint64_t bits) {
    const double u = (double(bits >> 11) + 0.5) * 0x1p-53;
    return float(-std::log(-std::log(u)));
}

// bound[b] >= fl32(g) for every u whose top 12 bits are b: g at the slice's upper end, one float step up to
// cover the logs' last-bit error.
struct GumbelBounds {
    float bound[4096];
    GumbelBounds() {
        for (int b = 0; b < 4095; ++b)
            bound[b] = std::nextafter(float(-std::log(-std::log((b + 1) / 4096.0))), INFINITY);
        bound[4095] = INFINITY;
    }
};

struct Best {
    float score = -INFINITY;
    int64_t index = -1;
};

// The best of tokens [t0, t1) of one row (key: the row's stream key), scanning upward so that a tie keeps the
// first index, as torch's argmax does.
inline Best gumbel_scan(const float* x, int64_t t0, int64_t t1, uint64_t key, const float* bound) {
    Best best;
    for (int64_t t = t0; t < t1; ++t) {
        if (std::isnan(x[t])) return {x[t], t};  // NaN ranks first, as in torch's argmax
        const uint64_t bits = splitmix_mix(key + uint64_t(t + 1) * kGolden);
        if (best.index >= 0 && x[t] + bound[bits >> 52] <= best.score) continue;
        const float s = x[t] + gumbel_noise_of(bits);
        if (best.index < 0 || s > best.score) best = {s, t};
    }
    return best;
}

// out[r] = the sampled token of row r of x [rows][stride] (vocab live columns). Rows go over the OpenMP threads;
// with fewer rows than threads each row's vocabulary is split between them.
inline void gumbel_argmax(const float* x, int64_t rows, int64_t vocab, int64_t stride, const int64_t* seeds,
                          const int64_t* steps, int64_t* out) {
    static const GumbelBounds table;
    const int threads = omp_get_max_threads();
    const int64_t parts = rows >= threads ? 1 : (threads + rows - 1) / rows;
    const int64_t chunk = (vocab + parts - 1) / parts;
    std::vector<Best> found(rows * parts);
#pragma omp parallel for schedule(static) if (rows * parts > 1)
    for (int64_t i = 0; i < rows * parts; ++i) {
        const int64_t r = i / parts, t0 = (i % parts) * chunk, t1 = t0 + chunk < vocab ? t0 + chunk : vocab;
        const uint64_t key = splitmix_mix(splitmix_mix(uint64_t(seeds[r])) + (uint64_t(steps[r]) + 1) * kGolden);
        found[i] = t0 < t1 ? gumbel_scan(x + r * stride, t0, t1, key, table.bound) : Best{};
    }
    for (int64_t r = 0; r < rows; ++r) {
        Best best = found[r * parts];
        for (int64_t p = 1; p < parts && !std::isnan(best.score); ++p) {
            const Best& b = found[r * parts + p];  // later tokens: only a strictly larger score (or a NaN) wins
            if (b.index >= 0 && (best.index < 0 || b.score > best.score || std::isnan(b.score))) best = b;
        }
        out[r] = best.index < 0 ? 0 : best.index;
    }
}

}  // namespace minisgl
