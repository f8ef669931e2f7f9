// A Llama-family decoder layer's decode step as one call: the same kernels, in the same order and with the same
// bf16 rounding points, as the Python layer running them op by op (models/llama.py with the native kernels),
// minus the interpreter between them. For int4 weights in torch's packed CPU layout, bf16 activations, no
// biases and no q/k norm; models/native_decoder.py decides when a layer qualifies.
#pragma once

#if defined(__AVX512F__)
#include <vector>

#include "int4.h"
#include "ops.h"

namespace minisgl {

// Field order and types mirror native.py's ctypes structures: 8-byte fields only, so there is no padding.
struct Int4Weight {
    const uint8_t* packed;        // [padded_rows, k / 2]
    const uint32_t* scale_zero;   // [k / 32, padded_rows] (scale, zero) bf16 pairs
    int64_t rows, padded_rows, k;
};

struct DecoderWeights {
    const bf16* input_norm;
    const bf16* post_norm;
    Int4Weight qkv, o, gate_up, down;
    bf16* k_cache;  // [slots, kv_heads, head_dim]
    bf16* v_cache;
    int64_t hidden, q_heads, kv_heads, head_dim, inter, rotary_half;
    double eps, scale;
};

struct DecodeStep {
    const bf16* cos;  // [batch, rotary_half]
    const bf16* sin;
    const int64_t* out_loc;  // [batch]
    const int64_t* slots;    // [batch, max_len]
    const int64_t* lens;     // [batch]
    int64_t batch, max_len;
};

inline void int4_linear(const Int4Weight& w, const bf16* x, int64_t rows, bf16* y) {
    int4_gemm(x, rows, w.k, w.packed, w.scale_zero, w.rows, w.padded_rows, y);
}

// h [batch, hidden] holds the layer's input and receives its MLP output; residual [batch, hidden] is updated in
// place. first: the layer has no residual yet (residual is then only written: residual = h).
inline void decoder_layer(const DecoderWeights& L, const DecodeStep& S, bf16* h, bf16* residual, bool first) {
    const int64_t b = S.batch, hidden = L.hidden, d = L.head_dim;
    const float eps = float(L.eps);
    thread_local std::vector<bf16> qkv, attn, gate_up, act;
    qkv.resize(b * L.qkv.rows);
    attn.resize(b * L.q_heads * d);
    gate_up.resize(b * L.gate_up.rows);
    act.resize(b * L.inter);

    if (first) {
        std::memcpy(residual, h, b * hidden * sizeof(bf16));
        rmsnorm(residual, hidden, L.input_norm, h, hidden, b, hidden, eps);
    } else {
        add_rmsnorm(h, residual, L.input_norm, b, hidden, eps);
    }
    int4_linear(L.qkv, h, b, qkv.data());
    const int64_t row = L.qkv.rows;
    rotary(qkv.data(), row, L.q_heads + L.kv_heads, d, S.cos, S.sin, L.rotary_half, b);
    const bf16* k = qkv.data() + L.q_heads * d;
    const bf16* v = k + L.kv_heads * d;
    decode_attention_any(qkv.data(), row, d, k, row, d, v, row, d, S.out_loc, L.k_cache, L.v_cache, S.slots, S.lens,
                         attn.data(), b, S.max_len, L.q_heads, L.kv_heads, d, float(L.scale));
    int4_linear(L.o, attn.data(), b, h);
    add_rmsnorm(h, residual, L.post_norm, b, hidden, eps);
    int4_linear(L.gate_up, h, b, gate_up.data());
    silu_and_mul(gate_up.data(), act.data(), b, L.inter);
    int4_linear(L.down, act.data(), b, h);
}

}  // namespace minisgl
#endif
