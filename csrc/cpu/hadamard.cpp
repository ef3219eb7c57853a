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

static void fwht_block(float* x, int64_t b) {
  for (int64_t h = 1; h < b; h *= 2)
    for (int64_t i = 0; i < b; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = x[j], c = x[j + h];
        x[j] = a + c;
        x[j + h] = a - c;
      }
}

int tasa_hadamard_cpu(float* x, int64_t M, int64_t K, int64_t group_size, int inverse) {
  if (M < 0 || K < 0) return TASA_ERR_SHAPE;
  if (group_size <= 0 || K % group_size) return TASA_ERR_GROUP_SIZE;
  const int64_t b = tasa_hadamard_block(group_size);
  const float scale = 1.0f / sqrtf((float)b);
  std::vector<float> sgn(K);
  for (int64_t k = 0; k < K; ++k) sgn[k] = tasa_hadamard_sign(k);
  const float* s = sgn.data();
#pragma omp parallel for schedule(static) if (M * K > (1 << 15))
  for (int64_t m = 0; m < M; ++m) {
    float* row = x + m * K;
    if (!inverse)
      for (int64_t k = 0; k < K; ++k) row[k] *= s[k];
    for (int64_t a = 0; a < K; a += b) fwht_block(row + a, b);
    if (inverse)
      for (int64_t k = 0; k < K; ++k) row[k] *= s[k] * scale;
    else
      for (int64_t k = 0; k < K; ++k) row[k] *= scale;
  }
  return TASA_OK;
}
