// One token through a stack of pre-norm llama-family decoder layers (RMSNorm, q/k/v
// projection(s), rotary attention over the KV cache, o projection, RMSNorm, gate/up
// projection(s), SiLU gate, down projection, the two residual adds), in one call: the kernels tasa's lean decoder
// called one op at a time from Python (python/tasa/generation.py), composed here.
// Why: with those ops a SmolLM2-135M decode step (AVX2 EPYC, 2026-12-07) took 13.1 ms, of which
// the kernels ~9 ms (123 gemm calls 7.8 ms); the rest was Python and ~10 dispatches per layer
// (selects, views, adds, split, silu, mul) between them. Measured in bench_decode_step.py
// --flag LAYER_OP (benchmarks/results/decode_layer_op_<isa>.md).
// Every step is the op it replaces (tasa_rms_norm_cpu, tasa_hadamard_cpu + tasa_gemm_cpu with
// the bias added after, tasa_decode_attention_cpu, fp32 adds), so the values are those of the
// op-by-op path except SiLU (torch's vectorised exp and std::exp may differ in the last bit)
// and, with x_pieces = 2, the GEMVs' int8 pieces of x (tasa_gemm_cpu_xp: error <= 254^-2 of a
// group's largest |x| instead of 254^-3; the decoder's choice, python/tasa/generation.py).
#include <cmath>
#include <cstring>

#include "tasa/kernels.h"

namespace {

// y [B, ldy] = x [B, K] W^T (+ bias) into columns 0..N-1 of each row; a rotated matrix
// multiplies a rotated copy of x (in xr [B, K]). B rows are one gemm call: the weights are read
// once for all of them (the row-shared GEMV, gemm.cpp); ldy != N writes through a row buffer.
int project(const tasa_packed_cpu_t& p, int64_t B, const float* x, float* xr, float* y,
            int64_t ldy, float* ybuf, int xp) {
  const float* in = x;
  if (p.hadamard) {
    std::memcpy(xr, x, sizeof(float) * B * p.K);
    const int st = tasa_hadamard_cpu(xr, B, p.K, p.group_size, 0);
    if (st != TASA_OK) return st;
    in = xr;
  }
  float* out = B == 1 || ldy == p.N ? y : ybuf;
  const int st = tasa_gemm_cpu_xp(in, TASA_F32, B, p.qweight, p.scales, p.zeros, p.gtable,
                                  p.perm, p.N, p.K, p.group_size, p.R, out, xp);
  if (st != TASA_OK) return st;
  for (int64_t b = 0; b < B; ++b) {
    float* yr = y + b * ldy;
    if (out != y) std::memcpy(yr, out + b * p.N, sizeof(float) * p.N);
    if (p.bias)
      for (int64_t n = 0; n < p.N; ++n) yr[n] += p.bias[n];
  }
  return TASA_OK;
}

// The total N of one slot's matrices (q/k/v or gate/up: one fused or apart), or -1 where
// one's K is not K.
int64_t slot_n(const tasa_packed_cpu_t* p, int n, int64_t K) {
  int64_t N = 0;
  for (int i = 0; i < n; ++i) {
    if (p[i].K != K) return -1;
    N += p[i].N;
  }
  return N;
}

// A slot's matrices, their outputs side by side in each row of y [B, ldy].
int project_slot(const tasa_packed_cpu_t* p, int n, int64_t B, const float* x, float* xr,
                 float* y, int64_t ldy, float* ybuf, int xp) {
  for (int i = 0; i < n; ++i) {
    const int st = project(p[i], B, x, xr, y, ldy, ybuf, xp);
    if (st != TASA_OK) return st;
    y += p[i].N;
  }
  return TASA_OK;
}

inline int64_t max3(int64_t a, int64_t b, int64_t c) {
  const int64_t m = a > b ? a : b;
  return m > c ? m : c;
}

}  // namespace

int64_t tasa_decode_layers_scratch(int64_t D, int64_t H, int64_t KV, int64_t hd, int64_t I) {
  return tasa_decode_layers_batch_scratch(1, D, H, KV, hd, I);
}

int64_t tasa_decode_layers_batch_scratch(int64_t B, int64_t D, int64_t H, int64_t KV,
                                         int64_t hd, int64_t I) {
  // per row: x [D], xr [max K], qkv, attention out [H hd], projection out [D], gate/up [2 I],
  // act [I]; and one gemm output block [B, max N] for the slots whose rows are not contiguous
  const int64_t QKV = (H + 2 * KV) * hd;
  const int64_t row = D + max3(D, H * hd, I) + QKV + H * hd + D + 3 * I;
  return B * row + (B > 1 ? B * max3(QKV, 2 * I, D) : 0);
}

int tasa_decode_layers_cpu(float* h, int64_t D, const tasa_decode_layer_cpu_t* layers,
                           int64_t n_layers, int64_t H, int64_t KV, int64_t hd, int64_t I,
                           int64_t max_len, int64_t pos, const float* cos, const float* sin,
                           float eps, float scale, float* scratch, int x_pieces) {
  return tasa_decode_layers_batch_cpu(h, 1, D, layers, n_layers, H, KV, hd, I, max_len, &pos,
                                      cos, sin, eps, scale, scratch, x_pieces);
}

int tasa_decode_layers_batch_cpu(float* h, int64_t B, int64_t D,
                                 const tasa_decode_layer_cpu_t* layers, int64_t n_layers,
                                 int64_t H, int64_t KV, int64_t hd, int64_t I, int64_t max_len,
                                 const int64_t* pos, const float* cos, const float* sin,
                                 float eps, float scale, float* scratch, int x_pieces) {
  if (x_pieces != 2 && x_pieces != 3) return TASA_ERR_SHAPE;
  if (B <= 0 || D <= 0 || n_layers < 0 || H <= 0 || KV <= 0 || H % KV || hd <= 0 || I <= 0 ||
      max_len <= 0)
    return TASA_ERR_SHAPE;
  for (int64_t b = 0; b < B; ++b)
    if (pos[b] < 0 || pos[b] >= max_len) return TASA_ERR_SHAPE;
  const int64_t QKV = (H + 2 * KV) * hd;
  for (int64_t l = 0; l < n_layers; ++l) {
    const tasa_decode_layer_cpu_t& L = layers[l];
    if ((L.n_qkv != 1 && L.n_qkv != 3) || (L.n_gate_up != 1 && L.n_gate_up != 2) ||
        slot_n(L.qkv, L.n_qkv, D) != QKV || L.o.K != H * hd || L.o.N != D ||
        slot_n(L.gate_up, L.n_gate_up, D) != 2 * I || L.down.K != I || L.down.N != D)
      return TASA_ERR_SHAPE;
  }
  // row-major [B, width] blocks, so each projection is one gemm over the B rows
  const int64_t XR = max3(D, H * hd, I);
  float* x = scratch;
  float* xr = x + B * D;
  float* qkv = xr + B * XR;
  float* att = qkv + B * QKV;
  float* t = att + B * H * hd;
  float* gu = t + B * D;
  float* act = gu + B * 2 * I;
  float* ybuf = act + B * I;
  const int64_t cache = KV * max_len * hd;    // one stream's cache within a layer's [B, ...]
  int st;
  for (int64_t l = 0; l < n_layers; ++l) {
    const tasa_decode_layer_cpu_t& L = layers[l];
    if ((st = tasa_rms_norm_cpu(h, L.norm1, B, D, eps, x)) != TASA_OK) return st;
    if ((st = project_slot(L.qkv, L.n_qkv, B, x, xr, qkv, QKV, ybuf, x_pieces)) != TASA_OK)
      return st;
    for (int64_t b = 0; b < B; ++b)
      if ((st = tasa_decode_attention_cpu(qkv + b * QKV, cos + pos[b] * hd, sin + pos[b] * hd,
                                          L.k_cache + b * cache, L.v_cache + b * cache, H, KV,
                                          hd, max_len, pos[b], scale, att + b * H * hd)) != TASA_OK)
        return st;
    if ((st = project(L.o, B, att, xr, t, D, ybuf, x_pieces)) != TASA_OK) return st;
    for (int64_t d = 0; d < B * D; ++d) h[d] = h[d] + t[d];
    if ((st = tasa_rms_norm_cpu(h, L.norm2, B, D, eps, x)) != TASA_OK) return st;
    if ((st = project_slot(L.gate_up, L.n_gate_up, B, x, xr, gu, 2 * I, ybuf, x_pieces)) !=
        TASA_OK)
      return st;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < I; ++i) {
        const float g = gu[b * 2 * I + i];
        act[b * I + i] = (g / (1.0f + std::exp(-g))) * gu[b * 2 * I + I + i];   // torch's silu
      }
    if ((st = project(L.down, B, act, xr, t, D, ybuf, x_pieces)) != TASA_OK) return st;
    for (int64_t d = 0; d < B * D; ++d) h[d] = h[d] + t[d];
  }
  return TASA_OK;
}
