// CPU fused dequant-GEMM driver: validates the layout, brings x into fp32 logical order once,
// splits the column blocks over OpenMP threads and picks the ISA path. The portable scalar
// kernel lives here too; it is the twin every SIMD path is tested against.
#include <omp.h>
#include <vector>

#include "gemm_internal.h"
#include "tasa/kernels.h"
#include "tasa/numeric.h"

namespace tasa {

void store_block(const GemmArgs& a, int64_t m, int64_t n0, const float* v16) {
  const int64_t cnt = a.N - n0 < 16 ? a.N - n0 : 16;
  if (a.ydt == TASA_F32) {
    float* y = (float*)a.y + m * a.N + n0;
    for (int64_t c = 0; c < cnt; ++c) y[c] = v16[c];
  } else if (a.ydt == TASA_BF16) {
    uint16_t* y = (uint16_t*)a.y + m * a.N + n0;
    for (int64_t c = 0; c < cnt; ++c) y[c] = float_to_bf16(v16[c]);
  } else {
    uint16_t* y = (uint16_t*)a.y + m * a.N + n0;
    for (int64_t c = 0; c < cnt; ++c) y[c] = float_to_half(v16[c]);
  }
}

int gemm_cols_scalar(const GemmArgs& a, int64_t cb0, int64_t cb1) {
  int bad = 0;
  const int64_t tiles = a.G / 32;
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    const uint32_t* blk = a.qweight + cb * a.R * 16;
    for (int64_t m = 0; m < a.M; ++m) {
      float out[16] = {0};
      const float* x = a.xl + m * a.K;
      for (int c = 0; c < 16 && cb * 16 + c < a.N; ++c) {
        const int64_t n = cb * 16 + c;
        float acc = 0.f;
        for (int64_t j = 0; j < a.n_groups; ++j) {
          const int b = a.gtable[j * 3], lg = a.gtable[j * 3 + 2];
          const int64_t off = a.gtable[j * 3 + 1];
          const uint16_t sh = a.scales[j * a.N + n], zh = a.zeros ? a.zeros[j * a.N + n] : 0;
          bad |= !half_is_finite(sh) || !half_is_finite(zh);
          const float s = half_to_float(sh);
          const float z = a.zeros ? half_to_float(zh) : (float)(1 << (b - 1));
          float g = 0.f;
          for (int64_t t = 0; t < tiles; ++t)
            for (int i = 0; i < 32; ++i) {
              const float q = (float)tasa_tile_code(blk + (off + t * b) * 16 + c, 16, b, i);
              g += (q - z) * x[lg * a.G + t * 32 + i];
            }
          acc += s * g;
        }
        out[c] = acc;
      }
      store_block(a, m, cb * 16, out);
    }
  }
  return bad;
}

}  // namespace tasa

using tasa::GemmArgs;

int tasa_gemm_cpu(const void* x, int xdt, int64_t M, const uint32_t* qweight,
                  const uint16_t* scales, const uint16_t* zeros, const int32_t* gtable,
                  const int32_t* perm, int64_t N, int64_t K, int64_t group_size, int64_t R,
                  void* y) {
  int st = tasa_check_layout_cpu(gtable, perm, K, group_size, R);
  if (st != TASA_OK) return st;
  if (xdt != TASA_F32 && xdt != TASA_BF16 && xdt != TASA_F16) return TASA_ERR_SHAPE;
  const int64_t n_groups = K / group_size;
  std::vector<float> xl(M * K), xsum(M * n_groups);
  for (int64_t m = 0; m < M; ++m) {
    float* dst = xl.data() + m * K;
    for (int64_t r = 0; r < K; ++r) {
      const int64_t k = m * K + (perm ? perm[r] : r);
      dst[r] = xdt == TASA_F32    ? ((const float*)x)[k]
               : xdt == TASA_BF16 ? tasa::bf16_to_float(((const uint16_t*)x)[k])
                                  : tasa::half_to_float(((const uint16_t*)x)[k]);
    }
    // sum(x_group) in double: the asymmetric correction multiplies it by (z - 2^(b-1)) * s,
    // up to 128x the scale for 8-bit groups, so its rounding error must not dominate.
    for (int64_t g = 0; g < n_groups; ++g) {
      double s = 0.0;
      for (int64_t i = 0; i < group_size; ++i) s += dst[g * group_size + i];
      xsum[m * n_groups + g] = (float)s;
    }
  }
  const int isa = tasa_cpu_isa();
  // AVX-512 for the GEMV and for bf16 GEMMs; fp32/fp16 GEMMs (M > 1) stay on the AVX2 kernel:
  // with x split into 3 (2) bf16 pieces the vdpbf16ps GEMM does 3 (2) instructions per 32
  // multiply-adds and measured 2.5x slower than dequantize-once + ymm FMA at M = 16 in fp32.
  const bool avx512 = isa >= TASA_ISA_AVX512 && (M == 1 || xdt == TASA_BF16);
  const bool gemv2 = M == 1 && isa == TASA_ISA_AVX2;
  // AVX2 GEMV pre-scaled activations: that kernel reads a b-bit code as (q - 2^(b-1)) * 2^(32-b)
  // (left-aligned in its lane), so x is scaled by 2^-(32-b) once per call (exact).
  const int widths[4] = {2, 3, 4, 8};
  std::vector<float> xs(gemv2 ? 4 * K : 0);
  if (gemv2)
    for (int wdx = 0; wdx < 4; ++wdx) {
      const float f = 1.0f / (float)(1u << (32 - widths[wdx]));   // a power of two: exact
      for (int64_t k = 0; k < K; ++k) xs[wdx * K + k] = xl[k] * f;
    }
  // AVX-512: x as bf16 pieces that sum exactly to it (bf16 x: 1, fp16: 2, fp32: 3), [np][M][K].
  const int np = xdt == TASA_BF16 ? 1 : xdt == TASA_F16 ? 2 : 3;
  std::vector<uint16_t> xp(avx512 ? np * M * K : 0);
  if (avx512) tasa::split_bf16_avx512(xl.data(), M * K, np, xp.data());
  const uint16_t* xpp = xp.data();
  const int64_t piece = avx512 ? M * K : 0;
  GemmArgs a{xl.data(), xsum.data(),
             {xs.data(), xs.data() + (gemv2 ? K : 0), xs.data() + (gemv2 ? 2 * K : 0), xs.data() + (gemv2 ? 3 * K : 0)},
             {xpp, xpp + (np > 1 ? piece : 0), xpp + (np > 2 ? 2 * piece : 0)}, np,
             M, N, K, group_size, R, n_groups, qweight, scales, zeros, gtable, y, xdt};
  int (*fn)(const GemmArgs&, int64_t, int64_t) = tasa::gemm_cols_scalar;
  if (isa >= TASA_ISA_AVX2) fn = M == 1 ? tasa::gemv_cols_avx2 : tasa::gemm_cols_avx2;
  if (avx512) fn = M == 1 ? tasa::gemv_cols_avx512 : tasa::gemm_cols_avx512;
  const int64_t NB = tasa_num_col_blocks(N);
  int bad = 0;
#pragma omp parallel reduction(| : bad)
  {
    // Contiguous, even-sized chunks of column blocks: each thread streams its own part of
    // qweight front to back (the GEMV path pairs blocks, so chunks are kept even).
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t pairs = (NB + 1) / 2;
    const int64_t p0 = pairs * tid / nt, p1 = pairs * (tid + 1) / nt;
    const int64_t cb0 = 2 * p0, cb1 = 2 * p1 < NB ? 2 * p1 : NB;
    if (cb0 < cb1) bad |= fn(a, cb0, cb1);
  }
  return bad ? TASA_ERR_NONFINITE : TASA_OK;
}
