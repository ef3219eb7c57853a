// One decode step's attention (a single new token) on fp32 KV caches: rotary embedding of q and
// k, the cache writes and grouped-query attention over positions 0..pos, in one call.
// Why: tasa's lean decoder (python/tasa/generation.py) spent ~15 aten ops per layer on this
// (slices, two multiplies, cat, neg and add for the rotation, two cache copies, transposes and
// scaled_dot_product_attention), each 2-5 us of dispatch on the 2-core AVX2 EPYC VM, ~37 us for
// the SDPA call alone: ~2 ms of SmolLM2's 13.3 ms step (benchmarks/results/gemm_cpu_3bit_avx2.md).
// Measured: 1.45x per SmolLM2 decode step with rms_norm below (decode_attention_avx2.md).
// The rotation rounds as transformers' apply_rotary_pos_emb does (x*cos and rotate_half(x)*sin
// each rounded, then added: no FMA contraction in rope), so the caches hold the same values;
// the softmax and the weighted sums differ from SDPA's blocked order only in fp32 rounding.
#include <omp.h>

#include <cmath>
#include <vector>

#include "tasa/kernels.h"

namespace {

// x * cos + rotate_half(x) * sin for one head; rotate_half(x) = (-x[h2:], x[:h2]). Each
// product rounded on its own, as torch does (no FMA contraction even where -march allows it).
__attribute__((optimize("fp-contract=off"))) inline void rope(float* x, const float* cos,
                                                              const float* sin, int64_t hd) {
  const int64_t h2 = hd / 2;
  for (int64_t i = 0; i < h2; ++i) {
    const float a = x[i], b = x[i + h2];
    const float lo_c = a * cos[i], lo_s = (-b) * sin[i];
    const float hi_c = b * cos[i + h2], hi_s = a * sin[i + h2];
    x[i] = lo_c + lo_s;
    x[i + h2] = hi_c + hi_s;
  }
}

// 8 independent partial sums: the compiler vectorises them without reassociation flags
inline float dot(const float* a, const float* b, int64_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) s[0] += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

}  // namespace

int tasa_decode_attention_cpu(float* qkv, const float* cos, const float* sin, float* k_cache,
                              float* v_cache, int64_t H, int64_t KV, int64_t hd, int64_t max_len,
                              int64_t pos, float scale, float* out) {
  if (H <= 0 || KV <= 0 || H % KV || hd <= 0 || hd % 2 || max_len <= 0 || pos < 0 ||
      pos >= max_len)
    return TASA_ERR_SHAPE;
  float* q = qkv;
  float* k = qkv + H * hd;
  const float* v = qkv + (H + KV) * hd;
  for (int64_t h = 0; h < H; ++h) rope(q + h * hd, cos, sin, hd);
  for (int64_t g = 0; g < KV; ++g) {
    rope(k + g * hd, cos, sin, hd);
    float* kd = k_cache + (g * max_len + pos) * hd;
    float* vd = v_cache + (g * max_len + pos) * hd;
    for (int64_t d = 0; d < hd; ++d) {
      kd[d] = k[g * hd + d];
      vd[d] = v[g * hd + d];
    }
  }
  const int64_t T = pos + 1, rep = H / KV;
  // threads only when the work outweighs waking them (~5-10 us on this VM): 2^16 multiply-adds
  const bool par = H * T * hd >= (1 << 16);
#pragma omp parallel for if (par) schedule(static)
  for (int64_t h = 0; h < H; ++h) {
    const float* qh = q + h * hd;
    const float* K = k_cache + (h / rep) * max_len * hd;
    const float* V = v_cache + (h / rep) * max_len * hd;
    std::vector<float> p(T);
    float mx = -INFINITY;
    for (int64_t t = 0; t < T; ++t) {
      p[t] = dot(qh, K + t * hd, hd) * scale;
      mx = p[t] > mx ? p[t] : mx;
    }
    float sum = 0.f;
    for (int64_t t = 0; t < T; ++t) {
      p[t] = std::exp(p[t] - mx);
      sum += p[t];
    }
    float* oh = out + h * hd;
    for (int64_t d = 0; d < hd; ++d) oh[d] = 0.f;
    for (int64_t t = 0; t < T; ++t) {
      const float w = p[t];
      const float* vt = V + t * hd;
      for (int64_t d = 0; d < hd; ++d) oh[d] += w * vt[d];
    }
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < hd; ++d) oh[d] *= inv;
  }
  return TASA_OK;
}

// RMSNorm of each row of x fp32 [M, D]: y = x / sqrt(mean(x^2) + eps) * w, the mean in double
// (one pass), then (x * r) rounded and times w rounded, as transformers' LlamaRMSNorm in fp32
// (hidden * rsqrt(var + eps), then weight * that). Why an op: torch's CPU rms_norm of one
// 576-wide row took 16.6 us as ~6 aten calls on the AVX2 EPYC; 61 of them per SmolLM2 step.
int tasa_rms_norm_cpu(const float* x, const float* w, int64_t M, int64_t D, float eps, float* y) {
  if (M < 0 || D <= 0) return TASA_ERR_SHAPE;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * D;
    double ss[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= D; i += 4)
      for (int j = 0; j < 4; ++j) ss[j] += (double)xr[i + j] * xr[i + j];
    for (; i < D; ++i) ss[0] += (double)xr[i] * xr[i];
    const float var = (float)(((ss[0] + ss[1]) + (ss[2] + ss[3])) / (double)D);
    const float r = 1.0f / std::sqrt(var + eps);
    float* yr = y + m * D;
    for (int64_t k = 0; k < D; ++k) yr[k] = w[k] * (xr[k] * r);
  }
  return TASA_OK;
}
