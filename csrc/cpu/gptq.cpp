// GPTQ's inner loop (Frantar et al. 2022, Algorithm 1, lines "for j = i .. i+B-1") for a run of
// columns of one block: quantize column i of every row with its group's (scale, zero), keep the
// scaled error err = (w - q(w)) / U[i,i] and feed it to the block's later columns,
// W[n, j] -= err * U[i, j].  Rows are independent (they share only U), so the loop runs row by
// row (one row of the block and the row of U stay in L1) and rows are split among threads.
//
// Why a kernel: the same loop in torch runs ~10 tensor ops per column whatever the row count;
// gptq-mse on a 192 x 576 matrix took 393 ms against 505 ms at 576 x 576 (AMD EPYC, busy
// machine): launch overhead, not arithmetic. The arithmetic is the torch reference's,
// operation for operation (w / s, round half to even, clamp, (q - z) * s, (w - wq) / d, then
// W -= err * U as a rounded product and a rounded difference: no FMA contraction, this file is
// built without -mfma), so codes and errors equal tasa_ext.reference.gptq_cols_ bit for bit.
#include <math.h>
#include <omp.h>

#include "tasa/kernels.h"

int tasa_gptq_cols_cpu(float* W, int64_t N, int64_t B, const float* U, int64_t c0, int64_t c1,
                       const float* scale, const float* zero, int64_t maxq, uint8_t* codes,
                       float* err) {
  if (N < 0 || B < 0 || c0 < 0 || c1 < c0 || c1 > B || maxq < 1 || maxq > 255)
    return TASA_ERR_SHAPE;
  for (int64_t n = 0; n < N; ++n)
    if (!isfinite(scale[n]) || !(scale[n] > 0.f) || !isfinite(zero[n])) return TASA_ERR_NONFINITE;
  for (int64_t i = c0; i < c1; ++i)
    if (!(U[i * B + i] > 0.f) || !isfinite(U[i * B + i])) return TASA_ERR_NONFINITE;
  const float fmaxq = (float)maxq;
#pragma omp parallel for schedule(static) if (N * (c1 - c0) * (B - c0) > (1 << 16))
  for (int64_t n = 0; n < N; ++n) {
    float* w = W + n * B;
    float* e = err + n * B;
    uint8_t* q = codes + n * B;
    const float s = scale[n], z = zero[n];
    for (int64_t i = c0; i < c1; ++i) {
      // as torch: clamp(round(w / s) + z, 0, maxq); nearbyintf rounds half to even
      float c = nearbyintf(w[i] / s) + z;
      c = c < 0.f ? 0.f : (c > fmaxq ? fmaxq : c);
      const float wq = (c - z) * s;
      const float d = U[i * B + i];
      const float ei = (w[i] - wq) / d;
      q[i] = (uint8_t)c;
      e[i] = ei;
      const float* u = U + i * B;
      w[i] -= ei * u[i];
      for (int64_t j = i + 1; j < B; ++j) {
        const float t = ei * u[j];
        w[j] -= t;
      }
    }
  }
  return TASA_OK;
}
