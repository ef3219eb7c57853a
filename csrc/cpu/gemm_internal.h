// Shared between the GEMM driver (gemm.cpp) and its ISA-specific column-block kernels.
#pragma once
#include <stdint.h>

namespace tasa {

struct GemmArgs {
  const float* xl;        // [M, K] fp32 activations in logical row order (perm applied)
  const float* xsum;      // [M, n_groups] sum of xl over each logical group
  const float* xs[4];     // M == 1, bits 2/3/4/8: xl * 2^-(32-b) (the GEMV reads codes left-aligned)
  int64_t M, N, K, G, R, n_groups;
  const uint32_t* qweight;
  const uint16_t* scales;
  const uint16_t* zeros;  // NULL: symmetric
  const int32_t* gtable;
  void* y;
  int ydt;
};

// Each computes the output columns of column blocks [cb0, cb1) for all M rows and returns
// nonzero if a scale or zero it read was NaN/Inf.
int gemm_cols_scalar(const GemmArgs& a, int64_t cb0, int64_t cb1);
int gemv_cols_avx2(const GemmArgs& a, int64_t cb0, int64_t cb1);
int gemm_cols_avx2(const GemmArgs& a, int64_t cb0, int64_t cb1);

// Writes 16 fp32 results of row m, columns [n0, n0+16) (clipped to N) into y of dtype ydt.
void store_block(const GemmArgs& a, int64_t m, int64_t n0, const float* v16);

}  // namespace tasa
