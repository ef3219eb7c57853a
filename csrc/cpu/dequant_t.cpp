// Dequantize column blocks of a packed matrix into W^T tiles for the prefill path: Wt [K, nc]
// (leading dimension ldw), logical row order, fp32 or bf16, so that y = x_logical @ Wt runs as
// a dense matmul (tasa_ext's shim hands it to torch: oneDNN's AMX bf16 kernels on a CPU that
// has them, MKL/oneDNN sgemm otherwise). Why this exists: on the 2-core Intel Xeon (AMX) a
// 512-row bf16 prefill through the fused dequant-GEMM took 5.1 ms for a 1536x576 matrix, while
// torch's bf16 matmul on the dequantized matrix took 0.34 ms (fp32 sgemm 2.3 ms): above some
// number of rows the dequantize-once cost is small beside the matmul it unlocks.
//
// Values: fp32 = (q - z) * s rounded once, bit-identical to tasa_dequant_cpu (the AVX-512 path
// computes fma(q, s, -(z * s)): z * s and q * s are exact in fp32, 11 x 11 and 8 x 11 bits, so
// the fma rounds the exact value once); bf16 = that fp32 value rounded to nearest even.
#include <omp.h>

#include <algorithm>

#include "gemm_internal.h"
#include "tasa/kernels.h"
#include "tasa/numeric.h"

namespace tasa {

int dequant_t_scalar(const uint32_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                     const int32_t* gtable, int64_t N, int64_t group_size, int64_t R, int64_t j,
                     int64_t cb0, int64_t cb1, void* out, int64_t ldw, int odt) {
  const int b = gtable[j * 3 + 0];
  const int64_t off = gtable[j * 3 + 1], lg = gtable[j * 3 + 2];
  const int64_t tiles = group_size / 32;
  int bad = 0;
  for (int64_t cb = cb0; cb < cb1; ++cb)
    for (int c = 0; c < 16 && cb * 16 + c < N; ++c) {
      const int64_t n = cb * 16 + c, col = (cb - cb0) * 16 + c;
      const uint16_t sh = scales[j * N + n], zh = zeros ? zeros[j * N + n] : 0;
      if (!half_is_finite(sh) || !half_is_finite(zh)) { bad = 1; continue; }
      const double s = half_to_float(sh);
      const double z = zeros ? half_to_float(zh) : (double)(1 << (b - 1));
      const uint32_t* blk = qweight + cb * R * 16 + c;
      for (int64_t t = 0; t < tiles; ++t)
        for (int i = 0; i < 32; ++i) {
          const int64_t r = lg * group_size + t * 32 + i;
          const float v = (float)(((double)tasa_tile_code(blk + (off + t * b) * 16, 16, b, i) - z) * s);
          if (odt == TASA_F32)
            ((float*)out)[r * ldw + col] = v;
          else
            ((uint16_t*)out)[r * ldw + col] = float_to_bf16(v);
        }
    }
  return bad;
}

}  // namespace tasa

int tasa_dequant_t_cpu(const uint32_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                       const int32_t* gtable, int64_t N, int64_t K, int64_t group_size, int64_t R,
                       int64_t cb0, int64_t cb1, void* out, int64_t ldw, int odt) {
  int st = tasa_check_layout_cpu(gtable, nullptr, K, group_size, R);
  if (st != TASA_OK) return st;
  if (odt != TASA_F32 && odt != TASA_BF16) return TASA_ERR_SHAPE;
  if (cb0 < 0 || cb1 < cb0 || cb1 > tasa_num_col_blocks(N)) return TASA_ERR_SHAPE;
  const int64_t ncols = (cb1 * 16 < N ? cb1 * 16 : N) - cb0 * 16;
  if (ncols > ldw) return TASA_ERR_SHAPE;
  const int64_t n_groups = K / group_size, nb = cb1 - cb0;
  const bool simd = tasa_cpu_isa() >= TASA_ISA_AVX512;
  int bad = 0;
  // Threads take disjoint ranges of column blocks, each every group: an even split of the
  // work whatever the group count (one group per thread left 9 groups as 5 + 4 on 2 threads
  // and measured no faster than 1 thread), and ranges of whole block pairs so that no two
  // threads write the same 64-byte line of a bf16 row.
#pragma omp parallel reduction(| : bad) if (n_groups * nb >= 64)
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t pairs = (nb + 1) / 2;
    const int64_t a = cb0 + 2 * (pairs * tid / nt), b = std::min(cb1, cb0 + 2 * (pairs * (tid + 1) / nt));
    for (int64_t j = 0; j < n_groups && a < b; ++j)
      bad |= simd ? tasa::dequant_t_avx512(qweight, scales, zeros, gtable, N, group_size, R, j,
                                           a, b, (char*)out + (a - cb0) * 16 * (odt == TASA_F32 ? 4 : 2),
                                           ldw, odt)
                  : tasa::dequant_t_scalar(qweight, scales, zeros, gtable, N, group_size, R, j,
                                           a, b, (char*)out + (a - cb0) * 16 * (odt == TASA_F32 ? 4 : 2),
                                           ldw, odt);
  }
  return bad ? TASA_ERR_NONFINITE : TASA_OK;
}
