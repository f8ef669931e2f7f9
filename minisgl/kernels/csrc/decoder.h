// A Llama-family decoder layer's decode step as one call: the same kernels, in the same order and with the same
// rounding points, as the Python layer running them op by op (models/llama.py with the native kernels), minus
// the interpreter between them. For int4 weights in minisgl's CPU layout (int4.h), fp32 or bf16 activations,
// no biases and no q/k norm; engine/cpu_runner.py decides when a layer qualifies.
#pragma once

#if defined(__AVX2__)
#include <vector>

#include "attention.h"
#include "int4.h"
#include "int4_q8.h"
#include "ops.h"

namespace minisgl {

// Field order and types mirror native.py's ctypes structures (8-byte fields only, so there is no padding);
// minisgl_sizeof lets Python check that they agree.
struct Int4Weight {
    const uint8_t* packed;  // int4.h's layout: [padded_rows / 64][k][32]
    const uint16_t* sm;     // [padded_rows / 64][k / 32][2][64] fp16 scales and mins
    int64_t rows, k;
    int64_t act_q8;  // 1: activations quantized to int8 (int4_q8.h), 0: multiplied in fp32 (int4.h)
};

struct DecoderWeights {
    const void* input_norm;  // [hidden], the activations' dtype
    const void* post_norm;
    Int4Weight qkv, o, gate_up, down;
    void* k_cache;  // [slots, kv_heads, head_dim]
    void* v_cache;
    int64_t hidden, q_heads, kv_heads, head_dim, inter, rotary_half;
    int64_t is_bf16;  // the element type of the norms, cos/sin and activations: 1 bf16, 0 fp32
    int64_t kv_f16;   // the caches' element type: 1 fp16, 0 the activations'
    double eps, scale;
};

struct DecodeStep {
    const void* cos;  // [batch, rotary_half]
    const void* sin;
    const int64_t* out_loc;  // [batch]
    const int64_t* slots;    // [batch, max_len]
    const int64_t* lens;     // [batch]
    int64_t batch, max_len;
};

template <typename T>
void int4_linear(const Int4Weight& w, const T* x, int64_t rows, T* y) {
    (w.act_q8 ? int4_q8_gemm<T> : int4_gemm<T>)(x, rows, w.k, w.packed, w.sm, w.rows, y);
}

// h [batch, hidden] holds the layer's input and receives its MLP output; residual [batch, hidden] is updated in
// place. first: the layer has no residual yet (residual is then only written: residual = h).
template <typename T>
void decoder_layer(const DecoderWeights& L, const DecodeStep& S, T* h, T* residual, bool first) {
    const int64_t b = S.batch, hidden = L.hidden, d = L.head_dim;
    const float eps = float(L.eps);
    const T* in_norm = (const T*)L.input_norm;
    const T* post_norm = (const T*)L.post_norm;
    thread_local std::vector<T> qkv, attn, gate_up, act;
    qkv.resize(b * L.qkv.rows);
    attn.resize(b * L.q_heads * d);
    gate_up.resize(b * L.gate_up.rows);
    act.resize(b * L.inter);

    if (first) {
        std::memcpy(residual, h, b * hidden * sizeof(T));
        rmsnorm(residual, hidden, in_norm, h, hidden, b, hidden, eps);
    } else {
        add_rmsnorm(h, residual, in_norm, b, hidden, eps);
    }
    int4_linear(L.qkv, h, b, qkv.data());
    const int64_t row = L.qkv.rows;
    rotary(qkv.data(), row, L.q_heads + L.kv_heads, d, (const T*)S.cos, (const T*)S.sin, L.rotary_half, b);
    const T* k = qkv.data() + L.q_heads * d;
    const T* v = k + L.kv_heads * d;
    auto attend = [&](auto* k_cache, auto* v_cache) {
        decode_attention_any(qkv.data(), row, d, k, row, d, v, row, d, S.out_loc, k_cache, v_cache, S.slots, S.lens,
                             attn.data(), b, S.max_len, L.q_heads, L.kv_heads, d, float(L.scale));
    };
    if (L.kv_f16)
        attend((f16*)L.k_cache, (f16*)L.v_cache);
    else
        attend((T*)L.k_cache, (T*)L.v_cache);
    int4_linear(L.o, attn.data(), b, h);
    add_rmsnorm(h, residual, post_norm, b, hidden, eps);
    int4_linear(L.gate_up, h, b, gate_up.data());
    silu_and_mul(gate_up.data(), act.data(), b, L.inter);
    int4_linear(L.down, act.data(), b, h);
}

}  // namespace minisgl
#endif
