// CPU fused dequant-GEMM driver: validates the layout, brings x into fp32 logical order once,
// splits the column blocks over OpenMP threads and picks the ISA path. The portable scalar
// kernel lives here too; it is the twin every SIMD path is tested against.
#include <omp.h>

#include <cmath>
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
  // (Per-call work in front of the kernel: one branch per dtype, four chains of double adds
  // instead of one serial chain; with the VNNI driver changes a 16x4096 3-bit call went
  // 6.4 -> 5.8 us.)
  for (int64_t m = 0; m < M; ++m) {
    float* dst = xl.data() + m * K;
    const int64_t base = m * K;
    if (xdt == TASA_F32) {
      const float* xs = (const float*)x + base;
      if (perm) for (int64_t r = 0; r < K; ++r) dst[r] = xs[perm[r]];
      else for (int64_t r = 0; r < K; ++r) dst[r] = xs[r];
    } else if (xdt == TASA_BF16) {
      const uint16_t* xs = (const uint16_t*)x + base;
      if (perm) for (int64_t r = 0; r < K; ++r) dst[r] = tasa::bf16_to_float(xs[perm[r]]);
      else for (int64_t r = 0; r < K; ++r) dst[r] = tasa::bf16_to_float(xs[r]);
    } else {
      const uint16_t* xs = (const uint16_t*)x + base;
      if (perm) for (int64_t r = 0; r < K; ++r) dst[r] = tasa::half_to_float(xs[perm[r]]);
      else for (int64_t r = 0; r < K; ++r) dst[r] = tasa::half_to_float(xs[r]);
    }
    // sum(x_group) in double: the asymmetric correction multiplies it by (z - 2^(b-1)) * s,
    // up to 128x the scale for 8-bit groups, so its rounding error must not dominate.
    for (int64_t g = 0; g < n_groups; ++g) {
      const float* xg = dst + g * group_size;
      double s[4] = {0.0, 0.0, 0.0, 0.0};
      for (int64_t i = 0; i < group_size; i += 4)   // group_size is a multiple of 32
        for (int c = 0; c < 4; ++c) s[c] += xg[i + c];
      xsum[m * n_groups + g] = (float)((s[0] + s[1]) + (s[2] + s[3]));
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
  // VNNI GEMV: x as int8 pieces (2 for bf16 x, 3 for fp16 and fp32: error <= 254^-nq of each
  // group's largest |x|, see gemm_avx512.cpp; fp16's 11 significant bits need the third piece
  // when a group spans decades: 2 pieces failed test_gemv_simd_matches_scalar_twin's fp16
  // cases with x over 1e-3..1e3, 6.5e-4 relative error against fp16 matmul's 9e-5).
  // Non-finite x keeps the bf16 GEMV, which carries NaN/Inf into exactly the outputs that
  // read them (xsum, summed in double, is non-finite iff the group holds a NaN/Inf, or its
  // finite sum overflows fp32: then the fallback is merely slower).
  bool vnni = M == 1 && isa >= TASA_ISA_AVX512_VNNI;
  for (int64_t g = 0; vnni && g < n_groups; ++g) vnni = std::isfinite(xsum[g]);
  const int nq = xdt == TASA_BF16 ? 2 : 3;
  std::vector<int8_t> xq(vnni ? nq * K : 0);
  std::vector<float> xqd(vnni ? nq * n_groups : 0), xqsum(vnni ? n_groups : 0);
  std::vector<int32_t> xqh(vnni ? nq * n_groups : 0);
  if (vnni)
    vnni = tasa::quantize_x_i8_avx512(xl.data(), K, group_size, nq, xq.data(), xqd.data(),
                                      xqh.data(), xqsum.data()) == 0;
  // AVX-512 otherwise: x as bf16 pieces that sum exactly to it (bf16 x: 1, fp16: 2, fp32: 3),
  // [np][M][K].
  const int np = xdt == TASA_BF16 ? 1 : xdt == TASA_F16 ? 2 : 3;
  const bool split = avx512 && !vnni;
  std::vector<uint16_t> xp(split ? np * M * K : 0);
  if (split) tasa::split_bf16_avx512(xl.data(), M * K, np, xp.data());
  const uint16_t* xpp = xp.data();
  const int64_t piece = split ? M * K : 0;
  GemmArgs a{xl.data(), xsum.data(),
             {xs.data(), xs.data() + (gemv2 ? K : 0), xs.data() + (gemv2 ? 2 * K : 0), xs.data() + (gemv2 ? 3 * K : 0)},
             {xpp, xpp + (np > 1 ? piece : 0), xpp + (np > 2 ? 2 * piece : 0)}, np,
             xq.data(), xqd.data(), xqh.data(), xqsum.data(), vnni ? nq : 0,
             M, N, K, group_size, R, n_groups, qweight, scales, zeros, gtable, y, xdt};
  int (*fn)(const GemmArgs&, int64_t, int64_t) = tasa::gemm_cols_scalar;
  if (isa >= TASA_ISA_AVX2) fn = M == 1 ? tasa::gemv_cols_avx2 : tasa::gemm_cols_avx2;
  if (avx512) fn = M == 1 ? tasa::gemv_cols_avx512 : tasa::gemm_cols_avx512;
  if (vnni) fn = tasa::gemv_cols_avx512_i8;
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
