// The incoherence rotation of format version 2 (format.h): per block of b columns,
// x <- H_b (s * x) / sqrt(b) (forward) or x <- s * (H_b x) / sqrt(b) (inverse), as an in-place
// fast Walsh-Hadamard transform: log2(b) butterfly passes of b/2 add/sub pairs.
//
// Why a separate pass over x and not inside the GEMV: it reads and writes K floats per row
// (b * log2 b adds per block: 4096 x 7 for a 4096-wide row) against the GEMV's N * K weights, so
// its cost is a rounding error of the matrix product at every M (benchmarks/bench_gemm.py
// --hadamard measures it side by side); every gemm path (fused, dense, AMX, CUDA) stays as it
// is. The butterflies are plain loops over contiguous halves; with -O3 the compiler vectorizes
// the passes with h >= 8 (the last 3 passes of a 128-block are scalar-ish: still far below the
// GEMV's cost).
#include <math.h>
#include <omp.h>

#include <vector>

#include "tasa/kernels.h"

// 8-point transform, the first three butterfly passes (h = 1, 2, 4) unrolled: the same adds in
// the same order as the generic loop, so the result is bit for bit that of the plain passes.
static inline void wht8(float* x) {
  const float a0 = x[0] + x[1], a1 = x[0] - x[1], a2 = x[2] + x[3], a3 = x[2] - x[3];
  const float a4 = x[4] + x[5], a5 = x[4] - x[5], a6 = x[6] + x[7], a7 = x[6] - x[7];
  const float b0 = a0 + a2, b2 = a0 - a2, b1 = a1 + a3, b3 = a1 - a3;
  const float b4 = a4 + a6, b6 = a4 - a6, b5 = a5 + a7, b7 = a5 - a7;
  x[0] = b0 + b4; x[4] = b0 - b4; x[1] = b1 + b5; x[5] = b1 - b5;
  x[2] = b2 + b6; x[6] = b2 - b6; x[3] = b3 + b7; x[7] = b3 - b7;
}

static void fwht_block(float* x, int64_t b) {
  int64_t h = 1;
  if (b >= 8) {
    for (int64_t i = 0; i < b; i += 8) wht8(x + i);
    h = 8;
  }
  for (; h < b; h *= 2)          // contiguous halves: vectorized
    for (int64_t i = 0; i < b; i += 2 * h) {
      float* lo = x + i;
      float* hi = x + i + h;
      for (int64_t j = 0; j < h; ++j) {
        const float a = lo[j], c = hi[j];
        lo[j] = a + c;
        hi[j] = a - c;
      }
    }
}

// s_k / sqrt(b) for the channels of one call. The signs of the first 2^16 channels are computed
// once (a first version computed K splitmix64 values on every call: ~20 us of a 4096-wide
// decode step's rotation); wider rows compute the rest.
static const float* sign_table() {
  static const std::vector<float> t = [] {
    std::vector<float> v(1 << 16);
    for (int64_t k = 0; k < (1 << 16); ++k) v[k] = tasa_hadamard_sign(k);
    return v;
  }();
  return t.data();
}

int tasa_hadamard_cpu(float* x, int64_t M, int64_t K, int64_t group_size, int inverse) {
  if (M < 0 || K < 0) return TASA_ERR_SHAPE;
  if (group_size <= 0 || K % group_size) return TASA_ERR_GROUP_SIZE;
  const int64_t b = tasa_hadamard_block(group_size);
  const float scale = 1.0f / sqrtf((float)b);
  // one multiply per element carries both the sign and 1 / sqrt(b) (H is linear: scaling
  // before or after the transform is the same up to rounding)
  std::vector<float> ss(K);
  const float* tab = sign_table();
  for (int64_t k = 0; k < K; ++k)
    ss[k] = (k < (1 << 16) ? tab[k] : tasa_hadamard_sign(k)) * scale;
  const float* s = ss.data();
#pragma omp parallel for schedule(static) if (M * K > (1 << 15))
  for (int64_t m = 0; m < M; ++m) {
    float* row = x + m * K;
    if (!inverse)
      for (int64_t k = 0; k < K; ++k) row[k] *= s[k];
    for (int64_t a = 0; a < K; a += b) fwht_block(row + a, b);
    if (inverse)
      for (int64_t k = 0; k < K; ++k) row[k] *= s[k];
  }
  return TASA_OK;
}
