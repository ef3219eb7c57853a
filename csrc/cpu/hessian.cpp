// GPTQ Hessian accumulation H_s <- H_s * n/(n+m) + 2/(n+m) * X_s^T X_s for several sources
// in one pass over X. fp32 throughout; X rows are converted to fp32 in chunks of kChunk rows,
// laid out in panels of kTJ = 24 columns ([K/24][kChunk][24]: a panel's rows are contiguous),
// and a symmetric rank-k update walks the upper triangle in 4x24 register tiles (12 ymm
// accumulators) reading two panels as sequential streams, then the upper triangle is mirrored.
// Why panels: with the chunk row-major ([kChunk][K]) every step of a tile's t loop touched new
// cache lines K floats apart, and for K = 4864 (Qwen2.5-0.5B's down_proj) the chunk (5 MB)
// left L2: a perf profile of a quality_per_byte GPTQ build showed this kernel at ~55% of the
// time, ahead of the forward passes' MKL sgemm (22%). Panels and register accumulators
// (tile_avx2) together, C harness side by side on the AVX2 EPYC, 2 threads, T = 2048, two runs:
// K = 4864 1340-1378 -> 574-637 ms, K = 896 53-68 -> 19-25 ms, K = 576 18 -> 9-11 ms (2.1-2.4x
// on the large K; panels alone gave 1.1-1.2x). torch's MKL X^T X took ~1020 ms for K = 4864 there
// (it computes both triangles).
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

// acc[4][24] = sum_t xi[t * 24 + 0..4) outer xj[t * 24 + 0..24): xi points at the 4 rows' columns
// in their panel, xj at the 24 columns' panel (panel row stride kTJ)
void tile_avx2(const float* xi, const float* xj, int64_t tc, float* out) {
  // Twelve named accumulators, not an array: with acc[4][3] GCC 12 kept the array on the stack
  // and stored all twelve every iteration (objdump), so the loop ran at the store port's pace,
  // ~half of MKL's sgemm rate on this core.
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00,
         c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;
  for (int64_t t = 0; t < tc; ++t) {
    const float* xr = xj + t * kTJ;
    const float* ar = xi + t * kTJ;
    const __m256 w0 = _mm256_loadu_ps(xr), w1 = _mm256_loadu_ps(xr + 8),
                 w2 = _mm256_loadu_ps(xr + 16);
    __m256 a = _mm256_broadcast_ss(ar);
    c00 = _mm256_fmadd_ps(a, w0, c00); c01 = _mm256_fmadd_ps(a, w1, c01); c02 = _mm256_fmadd_ps(a, w2, c02);
    a = _mm256_broadcast_ss(ar + 1);
    c10 = _mm256_fmadd_ps(a, w0, c10); c11 = _mm256_fmadd_ps(a, w1, c11); c12 = _mm256_fmadd_ps(a, w2, c12);
    a = _mm256_broadcast_ss(ar + 2);
    c20 = _mm256_fmadd_ps(a, w0, c20); c21 = _mm256_fmadd_ps(a, w1, c21); c22 = _mm256_fmadd_ps(a, w2, c22);
    a = _mm256_broadcast_ss(ar + 3);
    c30 = _mm256_fmadd_ps(a, w0, c30); c31 = _mm256_fmadd_ps(a, w1, c31); c32 = _mm256_fmadd_ps(a, w2, c32);
  }
  const __m256 c[kTI][3] = {{c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22}, {c30, c31, c32}};
  for (int i = 0; i < kTI; ++i)
    for (int v = 0; v < 3; ++v) _mm256_storeu_ps(out + i * kTJ + v * 8, c[i][v]);
}
}  // namespace
#pragma GCC pop_options

namespace {

void tile_scalar(const float* xi, const float* xj, int64_t tc, float* out) {
  for (int i = 0; i < kTI * kTJ; ++i) out[i] = 0.f;
  for (int64_t t = 0; t < tc; ++t)
    for (int i = 0; i < kTI; ++i)
      for (int j = 0; j < kTJ; ++j) out[i * kTJ + j] += xi[t * kTJ + i] * xj[t * kTJ + j];
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
  std::vector<float> xc(kChunk * Kp, 0.f);   // [Kp / kTJ][kChunk][kTJ]; padding columns stay 0
  const int64_t panel = kChunk * kTJ;
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
        for (int64_t k = 0; k < K; ++k)
          xc[(k / kTJ) * panel + r * kTJ + k % kTJ] =
              xdt == TASA_F32    ? ((const float*)X)[t * K + k]
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
          const float* xi = xc.data() + (ii0 / kTJ) * panel + ii0 % kTJ;   // 4 | 24: one panel
          const float* xj = xc.data() + (j0 / kTJ) * panel;
          if (simd) tile_avx2(xi, xj, tc, out);
          else tile_scalar(xi, xj, tc, out);
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
