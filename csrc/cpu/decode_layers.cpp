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

// y [N] = x [K] W^T (+ bias); a rotated matrix multiplies a rotated copy of x (in xr [K]).
int project(const tasa_packed_cpu_t& p, const float* x, float* xr, float* y, int xp) {
  const float* in = x;
  if (p.hadamard) {
    std::memcpy(xr, x, sizeof(float) * p.K);
    const int st = tasa_hadamard_cpu(xr, 1, p.K, p.group_size, 0);
    if (st != TASA_OK) return st;
    in = xr;
  }
  const int st = tasa_gemm_cpu_xp(in, TASA_F32, 1, p.qweight, p.scales, p.zeros, p.gtable,
                                  p.perm, p.N, p.K, p.group_size, p.R, y, xp);
  if (st != TASA_OK) return st;
  if (p.bias)
    for (int64_t n = 0; n < p.N; ++n) y[n] += p.bias[n];
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

// A slot's matrices, their outputs side by side in y.
int project_slot(const tasa_packed_cpu_t* p, int n, const float* x, float* xr, float* y,
                 int xp) {
  for (int i = 0; i < n; ++i) {
    const int st = project(p[i], x, xr, y, xp);
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
  // x [D], xr [max K], qkv, attention out [H hd], projection out [D], gate/up [2 I], act [I]
  return D + max3(D, H * hd, I) + (H + 2 * KV) * hd + H * hd + D + 3 * I;
}

int tasa_decode_layers_cpu(float* h, int64_t D, const tasa_decode_layer_cpu_t* layers,
                           int64_t n_layers, int64_t H, int64_t KV, int64_t hd, int64_t I,
                           int64_t max_len, int64_t pos, const float* cos, const float* sin,
                           float eps, float scale, float* scratch, int x_pieces) {
  if (x_pieces != 2 && x_pieces != 3) return TASA_ERR_SHAPE;
  if (D <= 0 || n_layers < 0 || H <= 0 || KV <= 0 || H % KV || hd <= 0 || I <= 0 ||
      max_len <= 0 || pos < 0 || pos >= max_len)
    return TASA_ERR_SHAPE;
  const int64_t QKV = (H + 2 * KV) * hd;
  for (int64_t l = 0; l < n_layers; ++l) {
    const tasa_decode_layer_cpu_t& L = layers[l];
    if ((L.n_qkv != 1 && L.n_qkv != 3) || (L.n_gate_up != 1 && L.n_gate_up != 2) ||
        slot_n(L.qkv, L.n_qkv, D) != QKV || L.o.K != H * hd || L.o.N != D ||
        slot_n(L.gate_up, L.n_gate_up, D) != 2 * I || L.down.K != I || L.down.N != D)
      return TASA_ERR_SHAPE;
  }
  float* x = scratch;
  float* xr = x + D;
  float* qkv = xr + max3(D, H * hd, I);
  float* att = qkv + QKV;
  float* t = att + H * hd;
  float* gu = t + D;
  float* act = gu + 2 * I;
  const float* c = cos + pos * hd;
  const float* s = sin + pos * hd;
  int st;
  for (int64_t l = 0; l < n_layers; ++l) {
    const tasa_decode_layer_cpu_t& L = layers[l];
    if ((st = tasa_rms_norm_cpu(h, L.norm1, 1, D, eps, x)) != TASA_OK) return st;
    if ((st = project_slot(L.qkv, L.n_qkv, x, xr, qkv, x_pieces)) != TASA_OK) return st;
    if ((st = tasa_decode_attention_cpu(qkv, c, s, L.k_cache, L.v_cache, H, KV, hd, max_len, pos,
                                        scale, att)) != TASA_OK)
      return st;
    if ((st = project(L.o, att, xr, t, x_pieces)) != TASA_OK) return st;
    for (int64_t d = 0; d < D; ++d) h[d] = h[d] + t[d];
    if ((st = tasa_rms_norm_cpu(h, L.norm2, 1, D, eps, x)) != TASA_OK) return st;
    if ((st = project_slot(L.gate_up, L.n_gate_up, x, xr, gu, x_pieces)) != TASA_OK) return st;
    for (int64_t i = 0; i < I; ++i) {
      const float g = gu[i];
      act[i] = (g / (1.0f + std::exp(-g))) * gu[I + i];   // torch's silu: x / (1 + exp(-x))
    }
    if ((st = project(L.down, act, xr, t, x_pieces)) != TASA_OK) return st;
    for (int64_t d = 0; d < D; ++d) h[d] = h[d] + t[d];
  }
  return TASA_OK;
}
