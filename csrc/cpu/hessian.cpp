// GPTQ Hessian accumulation H_s <- H_s * n/(n+m) + 2/(n+m) * X_s^T X_s for several sources
// in one pass over X. fp32 throughout; X rows are converted to fp32 in chunks of kChunk rows
// that stay in L2 while a symmetric rank-k update walks the upper triangle in 4x24 register
// tiles (12 ymm accumulators), then the upper triangle is mirrored.
#include <omp.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "tasa/kernels.h"
#include "tasa/numeric.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
namespace {
constexpr int kTI = 4, kTJ = 24;

// acc[4][24] = sum_t xc[t, i0..i0+4) outer xc[t, j0..j0+24)
void tile_avx2(const float* xc, int64_t tc, int64_t Kp, int64_t i0, int64_t j0, float* out) {
  __m256 acc[kTI][3];
  for (auto& r : acc) r[0] = r[1] = r[2] = _mm256_setzero_ps();
  for (int64_t t = 0; t < tc; ++t) {
    const float* xr = xc + t * Kp;
    const __m256 w0 = _mm256_loadu_ps(xr + j0), w1 = _mm256_loadu_ps(xr + j0 + 8),
                 w2 = _mm256_loadu_ps(xr + j0 + 16);
    for (int i = 0; i < kTI; ++i) {
      const __m256 a = _mm256_broadcast_ss(xr + i0 + i);
      acc[i][0] = _mm256_fmadd_ps(a, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(a, w1, acc[i][1]);
      acc[i][2] = _mm256_fmadd_ps(a, w2, acc[i][2]);
    }
  }
  for (int i = 0; i < kTI; ++i)
    for (int v = 0; v < 3; ++v) _mm256_storeu_ps(out + i * kTJ + v * 8, acc[i][v]);
}
}  // namespace
#pragma GCC pop_options

namespace {

void tile_scalar(const float* xc, int64_t tc, int64_t Kp, int64_t i0, int64_t j0, float* out) {
  for (int i = 0; i < kTI * kTJ; ++i) out[i] = 0.f;
  for (int64_t t = 0; t < tc; ++t) {
    const float* xr = xc + t * Kp;
    for (int i = 0; i < kTI; ++i)
      for (int j = 0; j < kTJ; ++j) out[i * kTJ + j] += xr[i0 + i] * xr[j0 + j];
  }
}

constexpr int64_t kChunk = 256;

}  // namespace

int tasa_hessian_accumulate_cpu(float* H, int64_t S, const void* X, int xdt, int64_t T,
                                int64_t K, const int64_t* src, int64_t* count) {
  if (xdt != TASA_F32 && xdt != TASA_BF16 && xdt != TASA_F16) return TASA_ERR_SHAPE;
  if (src)
    for (int64_t t = 0; t < T; ++t)
      if (src[t] < 0 || src[t] >= S) return TASA_ERR_SHAPE;
  const bool simd = tasa_cpu_isa() >= TASA_ISA_AVX2;
  const int64_t Kp = (K + kTJ - 1) / kTJ * kTJ;
  std::vector<float> xc(kChunk * Kp, 0.f);
  std::vector<int64_t> rows;
  for (int64_t s = 0; s < S; ++s) {
    rows.clear();
    for (int64_t t = 0; t < T; ++t)
      if (src ? src[t] == s : s == 0) rows.push_back(t);
    const int64_t m = (int64_t)rows.size();
    if (m == 0) continue;
    const double n_old = (double)count[s], n_new = n_old + (double)m;
    const float decay = (float)(n_old / n_new), beta = (float)(2.0 / n_new);
    float* Hs = H + s * K * K;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = i; j < K; ++j) Hs[i * K + j] *= decay;
    for (int64_t c0 = 0; c0 < m; c0 += kChunk) {
      const int64_t tc = std::min(kChunk, m - c0);
      for (int64_t r = 0; r < tc; ++r) {
        const int64_t t = rows[c0 + r];
        float* dst = xc.data() + r * Kp;
        for (int64_t k = 0; k < K; ++k)
          dst[k] = xdt == TASA_F32    ? ((const float*)X)[t * K + k]
                   : xdt == TASA_BF16 ? tasa::bf16_to_float(((const uint16_t*)X)[t * K + k])
                                      : tasa::half_to_float(((const uint16_t*)X)[t * K + k]);
      }
      const int64_t n_i = (K + kTI - 1) / kTI;
#pragma omp parallel for schedule(dynamic, 4)
      for (int64_t ib = 0; ib < n_i; ++ib) {
        const int64_t i0 = ib * kTI;
        float out[kTI * kTJ];
        for (int64_t j0 = i0 / kTJ * kTJ; j0 < K; j0 += kTJ) {
          // rows i0.. may run past K: they read zero padding columns only when i0+i < Kp,
          // so clamp the tile start and skip rows >= K on write-back.
          const int64_t ii0 = std::min(i0, Kp - kTI);
          if (simd) tile_avx2(xc.data(), tc, Kp, ii0, j0, out);
          else tile_scalar(xc.data(), tc, Kp, ii0, j0, out);
          for (int i = 0; i < kTI; ++i) {
            const int64_t gi = ii0 + i;
            if (gi < i0 || gi >= K) continue;
            for (int j = 0; j < kTJ; ++j) {
              const int64_t gj = j0 + j;
              if (gj >= gi && gj < K) Hs[gi * K + gj] += beta * out[i * kTJ + j];
            }
          }
        }
      }
    }
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < i; ++j) Hs[i * K + j] = Hs[j * K + i];
    count[s] = count[s] + m;
  }
  return TASA_OK;
}
