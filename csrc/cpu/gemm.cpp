// CPU fused dequant-GEMM driver: validates the layout, brings x into fp32 logical order once,
// splits the column blocks over OpenMP threads and picks the ISA path. The portable scalar
// kernel lives here too; it is the twin every SIMD path is tested against.
#include <cstring>
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

namespace {

// Per-call scratch (x in fp32, its group sums, int8 or bf16 pieces) carved from one buffer per
// calling thread, kept between calls up to kKeepBytes: the std::vectors it replaces were
// allocated and zero-filled on every call, part of the fixed per-call cost that keeps small
// GEMVs (a 1024x4096 k/v projection streams in ~35 us) off the memory bound. Larger calls (a
// long prefill: 2048 x 14336 fp32 x is 117 MB) free theirs afterwards, as before, instead of
// holding it for the life of the thread. OpenMP workers only read it.
class Scratch {
 public:
  template <class T>
  T* take(int64_t n) {   // n elements, 64-byte aligned, contents undefined
    const size_t off = used_;
    used_ += ((size_t)n * sizeof(T) + 63) & ~(size_t)63;
    return reinterpret_cast<T*>(base() + off);
  }
  // Call after every take(): grows the buffer if needed (invalidating earlier pointers, so the
  // driver takes everything, then calls ready(), then takes again from the start).
  bool ready() {
    if (used_ + 64 > buf_.size()) {
      buf_.assign(used_ + 64, 0);
      used_ = 0;
      return false;
    }
    used_ = 0;
    return true;
  }
  void trim() {   // after a call: give a large buffer back
    if (buf_.size() > kKeepBytes) std::vector<char>().swap(buf_);
  }
  static constexpr size_t kKeepBytes = 8u << 20;   // every GEMV (M = 1) of a K < 500k fits

 private:
  char* base() { return (char*)(((uintptr_t)buf_.data() + 63) & ~(uintptr_t)63); }
  std::vector<char> buf_;
  size_t used_ = 0;
};

thread_local Scratch t_scratch;

// The row-shared GEMV's range (2 <= M <= g_gemv_rows); -1: kGemvRowsDefault (below).
int g_gemv_rows = -1;
// The AVX2 GEMV's int8 path for 2/3/4-bit groups (gemm_avx2.cpp); -1: default (on).
int g_gemv_i8 = -1;
// int8 pieces of fp32 x in the int8 GEMVs (2 or 3); -1: default (kXPiecesDefault).
int g_x_pieces = -1;

}  // namespace

// Measured side by side on the AVX2-only EPYC (benchmarks/results/batched_cpu_avx2.md,
// bench_batched.py --gemv-rows 1 16): the row-shared GEMV is 2.2-2.4x faster at M = 2, 1.4-1.7x
// at M = 4, 10-20% at M = 8, a tie at 12 and up to 7% slower at 16 (both FMA-bound there).
static constexpr int kGemvRowsDefault = 8;

int tasa_cpu_gemv_rows(void) { return g_gemv_rows < 0 ? kGemvRowsDefault : g_gemv_rows; }

int tasa_cpu_gemv_i8(void) { return g_gemv_i8 < 0 ? 1 : g_gemv_i8; }

// fp32 x as 3 int8 pieces (error <= 254^-3 of a group's largest |x|, ~fp32's own) or 2 (254^-2,
// about bf16 x's precision, which the bf16 GEMV always uses): each piece is one vpmaddubsw per
// code vector, the bulk of the AVX2 int8 GEMV's instructions.
static constexpr int kXPiecesDefault = 3;

int tasa_cpu_x_pieces(void) { return g_x_pieces < 0 ? kXPiecesDefault : g_x_pieces; }

int tasa_cpu_set_x_pieces(int n) {
  if (n < 0) { g_x_pieces = -1; return TASA_OK; }
  if (n != 2 && n != 3) return TASA_ERR_SHAPE;
  g_x_pieces = n;
  return TASA_OK;
}

int tasa_cpu_set_gemv_i8(int on) {
  g_gemv_i8 = on < 0 ? -1 : on ? 1 : 0;
  return TASA_OK;
}

int tasa_cpu_set_gemv_rows(int rows) {
  if (rows < 0) { g_gemv_rows = -1; return TASA_OK; }
  if (rows < 1 || rows > TASA_GEMV_ROWS_MAX) return TASA_ERR_SHAPE;
  g_gemv_rows = rows;
  return TASA_OK;
}

int tasa_gemm_cpu(const void* x, int xdt, int64_t M, const uint32_t* qweight,
                  const uint16_t* scales, const uint16_t* zeros, const int32_t* gtable,
                  const int32_t* perm, int64_t N, int64_t K, int64_t group_size, int64_t R,
                  void* y) {
  return tasa_gemm_cpu_xp(x, xdt, M, qweight, scales, zeros, gtable, perm, N, K, group_size, R, y,
                          tasa_cpu_x_pieces());
}

int tasa_gemm_cpu_xp(const void* x, int xdt, int64_t M, const uint32_t* qweight,
                     const uint16_t* scales, const uint16_t* zeros, const int32_t* gtable,
                     const int32_t* perm, int64_t N, int64_t K, int64_t group_size, int64_t R,
                     void* y, int x_pieces) {
  if (x_pieces != 2 && x_pieces != 3) return TASA_ERR_SHAPE;
  int st = tasa_check_layout_cpu(gtable, perm, K, group_size, R);
  if (st != TASA_OK) return st;
  if (xdt != TASA_F32 && xdt != TASA_BF16 && xdt != TASA_F16) return TASA_ERR_SHAPE;
  const int64_t n_groups = K / group_size;
  const int isa = tasa_cpu_isa();
  // AVX-512 for the GEMV and for bf16 GEMMs; fp32/fp16 GEMMs (M > 1) stay on the AVX2 kernel:
  // with x split into 3 (2) bf16 pieces the vdpbf16ps GEMM does 3 (2) instructions per 32
  // multiply-adds and measured 2.5x slower than dequantize-once + ymm FMA at M = 16 in fp32.
  // AMX for every GEMM (1 < M) where present: a tile op does 16 rows x 16 columns x 32 of x's
  // bf16 pieces at once, so fp32 x's 3 pieces cost little (benchmarks/results/batched_cpu.md).
  const bool amx = M > 1 && isa >= TASA_ISA_AMX;
  const bool avx512 = isa >= TASA_ISA_AVX512 && (M == 1 || xdt == TASA_BF16 || amx);
  const int64_t Mpad = amx ? (M + 15) / 16 * 16 : M;   // the AMX tiles read 16 rows of x
  const bool gemv2 = M == 1 && isa == TASA_ISA_AVX2;
  // The AVX2 row-shared GEMV (2 <= M <= gemv_rows; fp32/fp16 x on AVX-512 CPUs without AMX too)
  const bool rows2 = M > 1 && isa >= TASA_ISA_AVX2 && !avx512 && !amx && M <= tasa_cpu_gemv_rows();
  const int widths[4] = {2, 3, 4, 8};
  // VNNI GEMV: x as int8 pieces (2 for bf16 x, 3 for fp16 and fp32: error <= 254^-nq of each
  // group's largest |x|, see gemm_avx512.cpp; fp16's 11 significant bits need the third piece
  // when a group spans decades: 2 pieces failed test_gemv_simd_matches_scalar_twin's fp16
  // cases with x over 1e-3..1e3, 6.5e-4 relative error against fp16 matmul's 9e-5).
  // Non-finite x keeps the bf16 GEMV, which carries NaN/Inf into exactly the outputs that
  // read them; the quantizer detects it (and an fp32 overflow of a group sum), so this path
  // skips the double-precision group sums the others need.
  bool vnni = M == 1 && isa >= TASA_ISA_AVX512_VNNI;
  const int nq = xdt == TASA_BF16 ? 2 : xdt == TASA_F32 ? x_pieces : 3;
  // ... and the row-shared GEMV's int8 pairs of rows, with 2 pieces only (3 measured slower than
  // its float path, gemm_avx2.cpp)
  const bool rows_i8 = rows2 && nq == 2;
  // AVX2 GEMV: the same int8 pieces for its 2-, 3- and 4-bit groups (vpmaddubsw), if it has any
  // (need: bit b - 2 for each width b < 8 present; only those orders of x are written)
  int need = 0, present = 0;   // present: bit b - 2 for widths 2-4, bit 3 for 8 (as widths[])
  if (gemv2 || rows_i8)
    for (int64_t j = 0; j < n_groups; ++j) present |= gtable[j * 3] == 8 ? 8 : 1 << (gtable[j * 3] - 2);
  if ((gemv2 || rows_i8) && tasa_cpu_gemv_i8()) need = present & 7;
  bool i8avx2 = need != 0;
  const bool pieces = vnni || i8avx2;
  // AVX-512 otherwise: x as bf16 pieces that sum exactly to it (bf16 x: 1, fp16: 2, fp32: 3),
  // [np][M][K].
  const int np = xdt == TASA_BF16 ? 1 : xdt == TASA_F16 ? 2 : 3;
  Scratch& sc = t_scratch;
  float *xl, *xsum, *xs, *xqd, *xqsum;
  int8_t* xq;
  int32_t* xqh;
  uint16_t* xp;
  do {   // every buffer any path may need, so a fallback needs no second allocation
    xl = sc.take<float>(Mpad * K);
    xsum = sc.take<float>(M * n_groups);
    xs = sc.take<float>(gemv2 ? 4 * K : 0);
    xq = sc.take<int8_t>(vnni ? nq * K : i8avx2 ? 3 * M * nq * K : 0);
    xqd = sc.take<float>(pieces ? M * nq * n_groups : 0);
    xqsum = sc.take<float>(pieces ? M * n_groups : 0);
    xqh = sc.take<int32_t>(pieces ? M * nq * n_groups : 0);
    xp = sc.take<uint16_t>(avx512 ? np * Mpad * K : 0);
  } while (!sc.ready());
  for (int64_t i = M * K; i < Mpad * K; ++i) xl[i] = 0.f;      // AMX padding rows
  for (int64_t m = 0; m < M; ++m) {
    float* dst = xl + m * K;
    const int64_t base = m * K;
    if (xdt == TASA_F32) {
      const float* src = (const float*)x + base;
      if (perm) for (int64_t r = 0; r < K; ++r) dst[r] = src[perm[r]];
      else std::memcpy(dst, src, sizeof(float) * K);
    } else if (xdt == TASA_BF16) {
      const uint16_t* src = (const uint16_t*)x + base;
      if (perm) for (int64_t r = 0; r < K; ++r) dst[r] = tasa::bf16_to_float(src[perm[r]]);
      else for (int64_t r = 0; r < K; ++r) dst[r] = tasa::bf16_to_float(src[r]);
    } else {
      const uint16_t* src = (const uint16_t*)x + base;
      if (perm) for (int64_t r = 0; r < K; ++r) dst[r] = tasa::half_to_float(src[perm[r]]);
      else for (int64_t r = 0; r < K; ++r) dst[r] = tasa::half_to_float(src[r]);
    }
  }
  if (vnni)
    vnni = tasa::quantize_x_i8_avx512(xl, K, group_size, nq, xq, xqd, xqh, xqsum) == 0;
  // [3][M][nq][K]: the three orders, row m's pieces at (m * nq + q) * K
  int8_t* const xqr[3] = {xq, xq + (i8avx2 ? M * nq * K : 0), xq + (i8avx2 ? 2 * M * nq * K : 0)};
  for (int64_t m = 0; m < (i8avx2 ? M : 0); ++m) {   // non-finite or tiny x: all on the float path
    int8_t* const xr[3] = {xqr[0] + m * nq * K, xqr[1] + m * nq * K, xqr[2] + m * nq * K};
    const int64_t o = m * nq * n_groups;
    if (tasa::quantize_x_i8_avx2(xl + m * K, K, group_size, nq, xr, need, xqd + o, xqh + o,
                                 xqsum + m * n_groups) != 0)
      i8avx2 = false;
  }
  // The AVX2 GEMV's groups on the float path: 8-bit ones, or every one where the int8 path is
  // off or fell back. Only they read xs and (with zeros) xsum: a GEMV whose groups all take the
  // int8 path skips both, and writes xs only for the widths that read it. (Why: writing xs for
  // all four widths was the driver's hottest loop in a perf profile of small GEMVs on the AVX2
  // EPYC, whose fixed costs dominate SmolLM2's decode. Timed side by side with a C harness
  // calling tasa_gemm_cpu_xp, -O3, one thread, 4-bit, 2 x pieces, 2026-12-07: 16 x 576 3.1-3.4
  // -> 1.7-2.7 us, 16 x 1536 4.1-4.7 -> 2.9-4.1 us, 576 x 1536 34-45 -> 33-48 us: ~1 us a call.)
  const int float_widths = i8avx2 ? present & 8 : present;
  const bool need_xsum = !vnni && !((gemv2 || rows_i8) && (float_widths == 0 || !zeros));
  if (need_xsum)   // (the VNNI GEMV uses xqsum, the pieces' own sums; so do the AVX2 int8 groups)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < n_groups; ++g) {
        // sum(x_group) in double: the asymmetric correction multiplies it by (z - 2^(b-1)) * s,
        // up to 128x the scale for 8-bit groups, so its rounding error must not dominate.
        const float* xg = xl + m * K + g * group_size;
        double s[4] = {0.0, 0.0, 0.0, 0.0};
        for (int64_t i = 0; i < group_size; i += 4)   // group_size is a multiple of 32
          for (int c = 0; c < 4; ++c) s[c] += xg[i + c];
        xsum[m * n_groups + g] = (float)((s[0] + s[1]) + (s[2] + s[3]));
      }
  // AVX2 GEMV pre-scaled activations: that kernel reads a b-bit code as (q - 2^(b-1)) * 2^(32-b)
  // (left-aligned in its lane), so x is scaled by 2^-(32-b) once per call (exact).
  if (gemv2)
    for (int wdx = 0; wdx < 4; ++wdx) {
      if (!(float_widths & (1 << wdx))) continue;
      const float f = 1.0f / (float)(1u << (32 - widths[wdx]));   // a power of two: exact
      for (int64_t k = 0; k < K; ++k) xs[wdx * K + k] = xl[k] * f;
    }
  const bool split = avx512 && !vnni;
  if (split) tasa::split_bf16_avx512(xl, Mpad * K, np, xp);
  const uint16_t* xpp = xp;
  const int64_t piece = split ? Mpad * K : 0;
  GemmArgs a{xl, xsum,
             {xs, xs + (gemv2 ? K : 0), xs + (gemv2 ? 2 * K : 0), xs + (gemv2 ? 3 * K : 0)},
             {xpp, xpp + (np > 1 ? piece : 0), xpp + (np > 2 ? 2 * piece : 0)}, np,
             xq, xqd, xqh, xqsum, vnni || i8avx2 ? nq : 0,
             M, N, K, group_size, R, n_groups, qweight, scales, zeros, gtable, y, xdt,
             {xqr[0], xqr[1], xqr[2]}};
  int (*fn)(const GemmArgs&, int64_t, int64_t) = tasa::gemm_cols_scalar;
  if (isa >= TASA_ISA_AVX2)
    fn = M == 1 ? tasa::gemv_cols_avx2 : rows2 ? tasa::gemv_rows_cols_avx2 : tasa::gemm_cols_avx2;
  if (avx512) fn = M == 1 ? tasa::gemv_cols_avx512 : tasa::gemm_cols_avx512;
  if (vnni) fn = tasa::gemv_cols_avx512_i8;
  if (amx) fn = tasa::gemm_cols_amx;
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
  sc.trim();
  return bad ? TASA_ERR_NONFINITE : TASA_OK;
}
