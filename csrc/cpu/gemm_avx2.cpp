// AVX2 + FMA + F16C column-block kernels of the fused dequant GEMM (see format.h for the layout).
//
// Lanes run over the 16 columns of a block (two ymm halves), so every code is one shift away
// from its lane; no shuffles across lanes. A code becomes a centred float (q - 2^(b-1)) by
// XORing its word with a constant that flips each field's top bit (field = two's complement of
// q - 2^(b-1)), shifting the field to the top of the lane, arithmetic-shifting it down and
// converting: slli + srai + cvtdq2ps, then the FMA.
// Centring keeps the partial sums small: no large q*x sums cancelling against z*sum(x), so the
// fp32 error stays at the level of a dense fp32 matmul. Asymmetric zeros enter once per group
// as (z - 2^(b-1)) * s * sum(x_group).
// M == 1 (GEMV) accumulates straight from the unpacked codes, four independent FMA chains per
// half so the FMA latency is hidden. M > 1 dequantizes one group of a block into an L1 buffer
// of fp32 weights (w = (q - z) * s, exactly the reference rounding) and runs a register-blocked
// micro-kernel over up to 6 rows of x at a time.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <utility>
#include <vector>

#include "gemm_internal.h"
#include "tasa/format.h"
#include "tasa/kernels.h"

namespace tasa {
namespace {

// XOR mask for word WI of a B-bit tile: flips the top bit of every field (global bit B*i+B-1 of
// the 32*B-bit tile), which turns field q into the two's complement of q - 2^(B-1).
template <int B>
constexpr uint32_t sign_mask(int wi) {
  uint32_t m = 0;
  for (int i = 0; i < 32; ++i) {
    const int bit = B * i + B - 1;
    if (bit >= 32 * wi && bit < 32 * wi + 32) m |= 1u << (bit - 32 * wi);
  }
  return m;
}

template <int B, int WI>
inline __attribute__((always_inline)) __m256i load_signed(const uint32_t* p) {
  return _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(p + WI * 16)),
                          _mm256_set1_epi32((int)sign_mask<B>(WI)));
}

// Centred code (q - 2^(B-1)) of tile row I for 8 columns as floats; p points at word 0 of the
// tile for this half-block (consecutive words are 16 uint32 apart). The field is shifted to the
// top of the lane and arithmetic-shifted down (sign extension), then converted: 3 uops. A 3-bit
// field straddling two words is first funnel-shifted together (codes 10 and 21 of 32).
// (A vpermps table lookup is one uop fewer on paper but measured 20% slower on Zen: one port.)
template <int B, int I>
inline __attribute__((always_inline)) __m256 code(const uint32_t* p) {
  constexpr int bit = B * I, wi = bit >> 5, sh = bit & 31, top = 32 - B;
  __m256i v = load_signed<B, wi>(p);
  if constexpr (sh + B > 32) {
    v = _mm256_or_si256(_mm256_srli_epi32(v, sh), _mm256_slli_epi32(load_signed<B, wi + 1>(p), 32 - sh));
    v = _mm256_slli_epi32(v, top);
  } else if constexpr (sh != top) {
    v = _mm256_slli_epi32(v, top - sh);
  }
  return _mm256_cvtepi32_ps(_mm256_srai_epi32(v, top));
}

// Loads 16 fp16 values of a block row (clipped to N, zero padded) as two fp32 halves and
// reports whether any was NaN/Inf.
inline int load_half16(const uint16_t* row, int64_t n0, int64_t N, __m256& lo, __m256& hi) {
  __m256i v;
  if (n0 + 16 <= N) {
    v = _mm256_loadu_si256((const __m256i*)(row + n0));
  } else {
    alignas(32) uint16_t tmp[16] = {0};
    for (int64_t c = 0; n0 + c < N; ++c) tmp[c] = row[n0 + c];
    v = _mm256_load_si256((const __m256i*)tmp);
  }
  const __m256i e = _mm256_set1_epi16(0x7C00);
  const int bad = _mm256_movemask_epi8(_mm256_cmpeq_epi16(_mm256_and_si256(v, e), e));
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1));
  return bad != 0;
}

// Group j's scales of column block cb and, asymmetric, its zeros less the code midpoint
// 2^(b-1) (zero when symmetric): every path's correction is y -= s * (z - 2^(b-1)) * sum(x_g).
// Reports a NaN/Inf in either, as load_half16.
inline int load_scale_zero(const GemmArgs& a, int64_t j, int64_t cb, int b, __m256& s0,
                           __m256& s1, __m256& zc0, __m256& zc1) {
  int bad = load_half16(a.scales + j * a.N, cb * 16, a.N, s0, s1);
  if (a.zeros) {
    bad |= load_half16(a.zeros + j * a.N, cb * 16, a.N, zc0, zc1);
    const __m256 c = _mm256_set1_ps((float)(1 << (b - 1)));
    zc0 = _mm256_sub_ps(zc0, c);
    zc1 = _mm256_sub_ps(zc1, c);
  } else {
    zc0 = zc1 = _mm256_setzero_ps();
  }
  return bad;
}

// GEMV decode: the centred code *left-aligned*, (q - 2^(B-1)) * 2^(32-B), exact as a float:
// shift the sign-flipped word so the field sits at the top of the lane, and mask off the lower
// fields (the field at bit 0 needs no mask, the one already at the top no shift). The constant
// 2^-(32-B) is folded into a pre-scaled copy of x (GemmArgs::xs). slli + and + cvt + FMA: one
// shift instead of the two of a sign-extension (Zen has two shift pipes; the and goes to any),
// and unlike accumulating raw q (measured 2.5x a dense fp32 matmul's error) the partial sums
// stay centred. The two 3-bit fields that straddle words are funnel-shifted together first.
template <int B, int I>
inline __attribute__((always_inline)) __m256 code_top(const uint32_t* p) {
  constexpr int bit = B * I, wi = bit >> 5, sh = bit & 31, top = 32 - B;
  const __m256i w = load_signed<B, wi>(p);
  __m256i v;
  if constexpr (sh + B > 32) {
    v = _mm256_or_si256(_mm256_srli_epi32(w, sh), _mm256_slli_epi32(load_signed<B, wi + 1>(p), 32 - sh));
    v = _mm256_slli_epi32(v, top);
  } else if constexpr (sh == 0) {
    v = _mm256_slli_epi32(w, top);
  } else {
    v = sh == top ? w : _mm256_slli_epi32(w, top - sh);
    v = _mm256_and_si256(v, _mm256_set1_epi32((int)(((1u << B) - 1u) << top)));
  }
  return _mm256_cvtepi32_ps(v);
}

// ---- M == 1 -------------------------------------------------------------------------------
// Accumulators are locals (4 chains per half hide the FMA latency) so they stay in registers.
// Sum over one group of (q - 2^(B-1)) * x for the 16 columns of a block -> g0 (cols 0-7), g1;
// xg is the group's slice of x pre-scaled by 2^-(32-B) (see code_top).
template <int B>
__attribute__((noinline)) void gemv_group(const uint32_t* wp, const float* xg, int64_t tiles,
                                          __m256& g0, __m256& g1) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  for (int64_t t = 0; t < tiles; ++t) {
    const uint32_t* tp = wp + t * B * 16;
    const float* xt = xg + t * 32;
    for (int r = 0; r < B; ++r) prefetch_ahead(tp + r * 16);
    static_for(std::make_integer_sequence<int, 32>{}, [&](auto I) {
      constexpr int i = decltype(I)::value;
      __m256& ra = (i & 3) == 0 ? a0 : (i & 3) == 1 ? a1 : (i & 3) == 2 ? a2 : a3;
      __m256& rb = (i & 3) == 0 ? b0 : (i & 3) == 1 ? b1 : (i & 3) == 2 ? b2 : b3;
      const __m256 xb = _mm256_broadcast_ss(xt + i);
      ra = _mm256_fmadd_ps(code_top<B, i>(tp), xb, ra);
      rb = _mm256_fmadd_ps(code_top<B, i>(tp + 8), xb, rb);
    });
  }
  g0 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  g1 = _mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3));
}

// ---- M == 1, 2- to 4-bit groups: int8 pieces of x times the codes as bytes (vpmaddubsw) ------
// Why: the float GEMV above spends shift + and + cvt + FMA on every code of every width, ~0.6
// instructions per code (objdump), and streamed 4-bit weights at only 59-71% of this EPYC's
// copy bandwidth (benchmarks/results/gemm_cpu_3bit_avx2.md): instruction-bound. Here x enters
// as the VNNI path's NQ exact int8 pieces per group (quantize_x_i8_avx2: the same pieces, the
// same error bound, <= 254^-NQ of the group's largest |x|) and the codes as unsigned bytes: one
// vpmaddubsw multiplies 4 codes of each of 8 columns by 4 int8s of x and adds pairs into int16.
// x's pieces are stored in the order each width's code vectors come out (code_bytes, xqr). A
// tile's 32 products per column fit an int16 pair lane (16 products of |q h| <= 15 * 127 = 1905
// per int16: 30480 < 32767), so the int16 sums widen once per tile (vpmaddwd with ones).
// 8-bit groups keep the float GEMV: their products overflow the int16 pair sums
// (255 * 127 * 2 > 32767). Tried (2026-12-07, this EPYC, ~30 GB/s copy bandwidth): an 8-bit
// kernel on the codes as they are (word w = codes 4w..4w+3 of 8 columns: no unpacking) with x
// in nq + 1 pieces of at most 64 (2 * 255 * 64 fits) and vpmaddwd after every vpmaddubsw, 3
// instructions per piece per 32 codes against ~18 for the float path. It passed the x-piece
// bound tests but measured 0.93-0.98x the float path with 2 pieces of x and 0.74-0.98x with 3
// (49152x576, 151936x896, 4096x4096): the float 8-bit GEMV is not instruction-bound here (the
// 151936x896 head streams at ~15 GB/s either way, ~2/3 of a torch sum's read rate measured
// beside it), so it was dropped.
// Code vector u (0..7) of a tile's half as unsigned bytes: 4 codes of each of 8 columns, the
// codes x bytes 4u .. 4u + 3 of the reordered piece pair with (see quantize_x_i8_avx2).
//   B = 4: word u / 2, nibbles u % 2 (codes 8w + 2k + u % 2);  B = 2: word u / 4, field u % 4
//   (codes 16w + 4k + u % 4);  B = 3: codes u, u + 8, u + 16, u + 24 (g: the gathered bytes).
// 3 bits: a column's 32 codes are 12 bytes (3 words) with code i at bit 3i, so codes i, i + 8,
// i + 16, i + 24 sit in bytes k, k + 3, k + 6, k + 9 (k = 3i / 8) at the same shift 3i % 8;
// g[k] gathers those 4 bytes of every column into its lane (3 vpshufb + 2 vpor), and a code
// set is one shift + and, or two of each + or for the two straddling sets (i = 2, 5):
// 36 instructions for the tile's 8 vectors against 12 for 4 bits, no format change.
// Tried (2026-12-08, this EPYC; llvm-mca -mcpu=znver3 on GCC's loops, then a C harness, 8
// interleaved rounds, 2 threads, weights from DRAM): g[k] by two vpblendvb each (its 4 bytes
// come from 4 different byte positions of the words; x stored in the resulting byte order, the
// straddling sets' upper byte rotated into place by one vpshufb) plus both halves in one pass
// (one x broadcast per two vpmaddubsw). Bit-identical outputs; llvm-mca 27.3 -> 21.6 cycles
// per half-tile (3-bit, 2 pieces), 18.0 -> 16.7 (4-bit), 18.9 -> 15.3 (2-bit), but measured
// 3-bit 0.89-1.17x (paired medians over four shapes; GCC spilled 37 vectors a tile), 4-bit
// 0.99-1.14x, 2-bit 1.07-1.13x: not kept (3-bit is what the plans use most).
template <int B, int U>
inline __attribute__((always_inline)) __m256i code_bytes(const __m256i* v, const __m256i* g) {
  if constexpr (B == 4 || B == 2) {
    constexpr int w = U * B / 8, s = U % (8 / B);
    const __m256i m = _mm256_set1_epi8(B == 4 ? 0x0F : 0x03);
    return _mm256_and_si256(s ? _mm256_srli_epi32(v[w], s * B) : v[w], m);
  } else {
    constexpr int sh = 3 * U % 8, k = 3 * U / 8;
    const __m256i m7 = _mm256_set1_epi8(7);
    if constexpr (sh <= 5) {
      return _mm256_and_si256(sh ? _mm256_srli_epi32(g[k], sh) : g[k], m7);
    } else {   // straddles into byte k + 1 (g[k + 1], the same lane position)
      const __m256i lo = _mm256_and_si256(_mm256_srli_epi32(g[k], sh),
                                          _mm256_set1_epi8((char)((1 << (8 - sh)) - 1)));
      const __m256i hi = _mm256_and_si256(_mm256_slli_epi32(g[k + 1], 8 - sh),
                                          _mm256_set1_epi8((char)(7 & ~((1 << (8 - sh)) - 1))));
      return _mm256_or_si256(lo, hi);
    }
  }
}

// vpshufb control (per 128-bit lane, repeated): output byte 4L + j of lane L takes byte
// src[j] of the same 32-bit lane, or zero (-1).
inline __m256i lane_bytes(int s0, int s1, int s2, int s3) {
  alignas(32) int8_t c[32];
  const int src[4] = {s0, s1, s2, s3};
  for (int l = 0; l < 8; ++l)
    for (int j = 0; j < 4; ++j) c[4 * l + j] = (int8_t)(src[j] < 0 ? -1 : (l % 4) * 4 + src[j]);
  return _mm256_load_si256((const __m256i*)c);
}

// One half-block (8 columns; hp = the tile's word 0 of that half) at a time, code vector by
// code vector, all NQ pieces of each before the next: a code vector is unpacked once and only
// NQ int16 sums are live. (Both halves in one loop: GCC scheduled all 48 vpmaddubsw of a tile
// first and spilled 38 of them; the pieces one after another re-did the unpack NQ times.) The
// empty asm statements stop GCC re-associating the int16 sums into a tree of all products at
// once (the same spills).
template <int B, int NQ, bool PF>
__attribute__((noinline)) void gemv_half_i8(const uint32_t* hp, const int8_t* xg, int64_t K,
                                            int64_t tiles, __m256i (&out)[NQ]) {
  static_assert(B == 2 || B == 3 || B == 4, "int8 GEMV: 2-, 3- and 4-bit codes");
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i sel[3][3];   // B = 3: the vpshufb controls of g[k] from word w
  if constexpr (B == 3) {
    sel[0][0] = lane_bytes(0, 3, -1, -1); sel[0][1] = lane_bytes(-1, -1, 2, -1); sel[0][2] = lane_bytes(-1, -1, -1, 1);
    sel[1][0] = lane_bytes(1, -1, -1, -1); sel[1][1] = lane_bytes(-1, 0, 3, -1); sel[1][2] = lane_bytes(-1, -1, -1, 2);
    sel[2][0] = lane_bytes(2, -1, -1, -1); sel[2][1] = lane_bytes(-1, 1, -1, -1); sel[2][2] = lane_bytes(-1, -1, 0, 3);
  }
  __m256i acc[NQ];
  for (int q = 0; q < NQ; ++q) acc[q] = _mm256_setzero_si256();
#pragma GCC unroll 1
  for (int64_t t = 0; t < tiles; ++t) {
    const uint32_t* tp = hp + t * B * 16;
    const int8_t* xt = xg + t * 32;
    if constexpr (PF)   // (the first half's call: both halves share the 64-byte rows)
      for (int r = 0; r < B; ++r) prefetch_ahead(tp + r * 16);
    __m256i v[B], g[3];
    for (int w = 0; w < B; ++w) v[w] = _mm256_loadu_si256((const __m256i*)(tp + w * 16));
    if constexpr (B == 3)
      for (int k = 0; k < 3; ++k)
        g[k] = _mm256_or_si256(_mm256_or_si256(_mm256_shuffle_epi8(v[0], sel[k][0]),
                                               _mm256_shuffle_epi8(v[1], sel[k][1])),
                               _mm256_shuffle_epi8(v[2], sel[k][2]));
    __m256i s16[NQ];
    for (int q = 0; q < NQ; ++q) s16[q] = _mm256_setzero_si256();
    static_for(std::make_integer_sequence<int, 8>{}, [&](auto Uc) {
      constexpr int u = decltype(Uc)::value;
      const __m256i c = code_bytes<B, u>(v, g);
      for (int q = 0; q < NQ; ++q) {
        int32_t xv;
        __builtin_memcpy(&xv, xt + q * K + 4 * u, 4);
        s16[q] = _mm256_add_epi16(s16[q], _mm256_maddubs_epi16(c, _mm256_set1_epi32(xv)));
        __asm__("" : "+x"(s16[q]));
      }
    });
    for (int q = 0; q < NQ; ++q) acc[q] = _mm256_add_epi32(acc[q], _mm256_madd_epi16(s16[q], ones));
  }
  for (int q = 0; q < NQ; ++q) out[q] = acc[q];
}

// The group's centred sums sum((q - 2^(B-1)) * x_hat) for the 16 columns of a block (g0, g1),
// x_hat = sum_q d_q h_q: each piece's exact integer sum minus 2^(B-1) times the piece's own
// group sum, scaled by its step in fp32.
template <int B, int NQ>
inline void group_i8(const GemmArgs& a, const uint32_t* wp, int64_t lg, int64_t tiles,
                     __m256& g0, __m256& g1) {
  __m256i acc0[NQ], acc1[NQ];
  const int8_t* xg = a.xqr[B - 2] + lg * a.G;
  gemv_half_i8<B, NQ, true>(wp, xg, a.K, tiles, acc0);
  gemv_half_i8<B, NQ, false>(wp + 8, xg, a.K, tiles, acc1);
  g0 = g1 = _mm256_setzero_ps();
  for (int q = 0; q < NQ; ++q) {
    const __m256i c = _mm256_set1_epi32(a.xqh[q * a.n_groups + lg] * (1 << (B - 1)));
    const __m256 d = _mm256_set1_ps(a.xqd[q * a.n_groups + lg]);
    g0 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(acc0[q], c)), g0);
    g1 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(acc1[q], c)), g1);
  }
}

// ---- 2 <= M <= tasa_cpu_gemv_rows(): the GEMV decode shared by up to 4 rows -------------------------
// Each code vector is decoded once (code_top: slli + and + cvt) and feeds MR rows' FMAs, so a
// batched decode step reads and decodes the weights once, as the GEMV does, instead of the
// dequantize-to-L1 GEMM's sub + mul + store + reload per code. Chains: MR rows x 2 halves x C
// (8 independent FMA chains for MR = 2 and 4, 6 for MR = 3: the FMA latency hidden); x is NOT
// pre-scaled here (that would need 4 x M x K floats): the 2^-(32-B) of code_top is folded into
// the group's scale instead (a power of two: the same products, exactly).
// (x in 2 int8 pieces: the int8 pairs of rows above take the 2- to 4-bit groups.)
template <int B, int MR>
__attribute__((noinline)) void gemv_group_rows(const uint32_t* wp, const float* x, int64_t K,
                                               int64_t tiles, __m256 (&g)[MR][2]) {
  constexpr int C = MR == 2 ? 2 : 1;
  __m256 acc[MR][2][C];
  static_for(std::make_integer_sequence<int, MR>{}, [&](auto M) {
    static_for(std::make_integer_sequence<int, C>{}, [&](auto Ci) {
      acc[decltype(M)::value][0][decltype(Ci)::value] = _mm256_setzero_ps();
      acc[decltype(M)::value][1][decltype(Ci)::value] = _mm256_setzero_ps();
    });
  });
  for (int64_t t = 0; t < tiles; ++t) {
    const uint32_t* tp = wp + t * B * 16;
    const float* xt = x + t * 32;
    static_for(std::make_integer_sequence<int, 32>{}, [&](auto I) {
      constexpr int i = decltype(I)::value, c = i % C;
      const __m256 w0 = code_top<B, i>(tp), w1 = code_top<B, i>(tp + 8);
      static_for(std::make_integer_sequence<int, MR>{}, [&](auto M) {
        constexpr int m = decltype(M)::value;
        const __m256 xb = _mm256_broadcast_ss(xt + m * K + i);
        acc[m][0][c] = _mm256_fmadd_ps(w0, xb, acc[m][0][c]);
        acc[m][1][c] = _mm256_fmadd_ps(w1, xb, acc[m][1][c]);
      });
    });
  }
  static_for(std::make_integer_sequence<int, MR>{}, [&](auto M) {
    constexpr int m = decltype(M)::value;
    for (int h = 0; h < 2; ++h) {
      g[m][h] = acc[m][h][0];
      if constexpr (C == 2) g[m][h] = _mm256_add_ps(g[m][h], acc[m][h][1]);
    }
  });
}

// The group's centred sums for rows m0 .. m0 + MR of x (logical order, row stride K) into
// tot[(m0 + m) * 2 + h], each times the (folded) scale sc.
template <int B, int MR>
inline void rows_group(const uint32_t* wp, const float* x, int64_t K, int64_t tiles, __m256 sc0,
                       __m256 sc1, __m256* tot) {
  __m256 g[MR][2];
  gemv_group_rows<B, MR>(wp, x, K, tiles, g);
  for (int m = 0; m < MR; ++m) {
    tot[m * 2] = _mm256_fmadd_ps(sc0, g[m][0], tot[m * 2]);
    tot[m * 2 + 1] = _mm256_fmadd_ps(sc1, g[m][1], tot[m * 2 + 1]);
  }
}

template <int B>
inline void rows_group_n(int mr, const uint32_t* wp, const float* x, int64_t K, int64_t tiles,
                         __m256 sc0, __m256 sc1, __m256* tot) {
  switch (mr) {
    case 1: rows_group<B, 1>(wp, x, K, tiles, sc0, sc1, tot); break;
    case 2: rows_group<B, 2>(wp, x, K, tiles, sc0, sc1, tot); break;
    case 3: rows_group<B, 3>(wp, x, K, tiles, sc0, sc1, tot); break;
    default: rows_group<B, 4>(wp, x, K, tiles, sc0, sc1, tot); break;
  }
}

// ---- 2 <= M <= tasa_cpu_gemv_rows(), 2- to 4-bit groups, x in 2 int8 pieces -------------------
// The M = 1 int8 GEMV (gemv_half_i8) with a pair of rows' 2 x 2 pieces as its 4 "pieces" (row
// m's piece q at index 2 m + q, stride K: the driver lays x out so): a code vector is unpacked
// once for both rows. Per row the arithmetic after the integer sums is group_i8's in the same
// order, so every row is bit-equal to that row's own int8 GEMV (test_ops): a batched decode
// step's 2- to 4-bit groups give each stream exactly its one-stream values.
// Measured (2026-12-08, AVX2 EPYC, C harness, 14336x4096, 2 threads, 9 interleaved rounds)
// against the float path below: 1.1-1.4x faster at M = 2, 1.1-1.2x at M = 4-16 with 2 pieces;
// with 3 pieces (fp32 x's default in the gemm op) 1.3-1.6x SLOWER, and chunks of 4 rows (8
// int16 sums + 8 int32 sums) spilled and were slower than pairs: so pairs, 2 pieces only.
template <int B, int MR>
inline void rows_group_i8(const GemmArgs& a, const uint32_t* wp, int64_t lg, int64_t tiles,
                          int64_t m0, bool pf, __m256 s0, __m256 s1, __m256* tot) {
  constexpr int NQ = 2, P = NQ * MR;
  __m256i acc0[P], acc1[P];
  const int8_t* xg = a.xqr[B - 2] + m0 * NQ * a.K + lg * a.G;
  if (pf) gemv_half_i8<B, P, true>(wp, xg, a.K, tiles, acc0);
  else gemv_half_i8<B, P, false>(wp, xg, a.K, tiles, acc0);
  gemv_half_i8<B, P, false>(wp + 8, xg, a.K, tiles, acc1);
  for (int m = 0; m < MR; ++m) {
    __m256 g0 = _mm256_setzero_ps(), g1 = _mm256_setzero_ps();
    for (int q = 0; q < NQ; ++q) {
      const int64_t i = ((m0 + m) * NQ + q) * a.n_groups + lg;
      const __m256i c = _mm256_set1_epi32(a.xqh[i] * (1 << (B - 1)));
      const __m256 d = _mm256_set1_ps(a.xqd[i]);
      g0 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(acc0[m * NQ + q], c)), g0);
      g1 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(acc1[m * NQ + q], c)), g1);
    }
    tot[2 * m] = _mm256_fmadd_ps(s0, g0, tot[2 * m]);
    tot[2 * m + 1] = _mm256_fmadd_ps(s1, g1, tot[2 * m + 1]);
  }
}

template <int B>
inline void rows_group_i8_n(const GemmArgs& a, int mr, const uint32_t* wp, int64_t lg,
                            int64_t tiles, int64_t m0, bool pf, __m256 s0, __m256 s1,
                            __m256* tot) {
  if (mr == 1) rows_group_i8<B, 1>(a, wp, lg, tiles, m0, pf, s0, s1, tot);
  else rows_group_i8<B, 2>(a, wp, lg, tiles, m0, pf, s0, s1, tot);
}

// ---- M > 1: dequantize one group of one block into buf [G][16] fp32 ------------------------
template <int B>
inline void dequant_group(const uint32_t* wp, int64_t tiles, __m256 s_lo, __m256 s_hi,
                          __m256 zc_lo, __m256 zc_hi, float* buf) {
  for (int64_t t = 0; t < tiles; ++t) {
    const uint32_t* tp = wp + t * B * 16;
    float* bt = buf + t * 32 * 16;
    static_for(std::make_integer_sequence<int, 32>{}, [&](auto I) {
      constexpr int i = decltype(I)::value;
      _mm256_storeu_ps(bt + i * 16, _mm256_mul_ps(_mm256_sub_ps(code<B, i>(tp), zc_lo), s_lo));
      _mm256_storeu_ps(bt + i * 16 + 8,
                       _mm256_mul_ps(_mm256_sub_ps(code<B, i>(tp + 8), zc_hi), s_hi));
    });
  }
}

// yacc[m] += sum_k buf[k] * x[m, k] for MC rows; yacc [M][16] holds the running block result.
// The group's sum starts from zero and is added at the end: chains of G terms, not K.
template <int MC>
inline void micro(const float* buf, int64_t G, const float* x, int64_t K, float* yacc) {
  __m256 acc[MC][2];
  for (int m = 0; m < MC; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < G; ++k) {
    const __m256 w0 = _mm256_loadu_ps(buf + k * 16), w1 = _mm256_loadu_ps(buf + k * 16 + 8);
    for (int m = 0; m < MC; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * K + k);
      acc[m][0] = _mm256_fmadd_ps(w0, xb, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(w1, xb, acc[m][1]);
    }
  }
  for (int m = 0; m < MC; ++m) {
    _mm256_storeu_ps(yacc + m * 16, _mm256_add_ps(_mm256_loadu_ps(yacc + m * 16), acc[m][0]));
    _mm256_storeu_ps(yacc + m * 16 + 8, _mm256_add_ps(_mm256_loadu_ps(yacc + m * 16 + 8), acc[m][1]));
  }
}

void micro_n(int mc, const float* buf, int64_t G, const float* x, int64_t K, float* yacc) {
  switch (mc) {
    case 1: micro<1>(buf, G, x, K, yacc); break;
    case 2: micro<2>(buf, G, x, K, yacc); break;
    case 3: micro<3>(buf, G, x, K, yacc); break;
    case 4: micro<4>(buf, G, x, K, yacc); break;
    case 5: micro<5>(buf, G, x, K, yacc); break;
    default: micro<6>(buf, G, x, K, yacc); break;
  }
}

}  // namespace

int gemv_cols_avx2(const GemmArgs& a, int64_t cb0, int64_t cb1) {
  int bad = 0;
  const int64_t tiles = a.G / 32;
  prefetch_stream_start(a, cb0, cb1);
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    const uint32_t* blk = a.qweight + cb * a.R * 16;
    prefetch_scales(a, cb, cb1);
    __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
    for (int64_t j = 0; j < a.n_groups; ++j) {
      const int b = a.gtable[j * 3];
      const int64_t off = a.gtable[j * 3 + 1], lg = a.gtable[j * 3 + 2];
      const uint32_t* wp = blk + off * 16;
      __m256 g0, g1;
      const bool i8 = a.nq > 0 && b != 8;
      if (i8 && a.nq == 2) {
        if (b == 2) group_i8<2, 2>(a, wp, lg, tiles, g0, g1);
        else if (b == 3) group_i8<3, 2>(a, wp, lg, tiles, g0, g1);
        else group_i8<4, 2>(a, wp, lg, tiles, g0, g1);
      } else if (i8) {
        if (b == 2) group_i8<2, 3>(a, wp, lg, tiles, g0, g1);
        else if (b == 3) group_i8<3, 3>(a, wp, lg, tiles, g0, g1);
        else group_i8<4, 3>(a, wp, lg, tiles, g0, g1);
      } else {
        switch (b) {
          case 2: gemv_group<2>(wp, a.xs[0] + lg * a.G, tiles, g0, g1); break;
          case 3: gemv_group<3>(wp, a.xs[1] + lg * a.G, tiles, g0, g1); break;
          case 4: gemv_group<4>(wp, a.xs[2] + lg * a.G, tiles, g0, g1); break;
          default: gemv_group<8>(wp, a.xs[3] + lg * a.G, tiles, g0, g1); break;
        }
      }
      __m256 s0, s1, zc0, zc1;
      bad |= load_scale_zero(a, j, cb, b, s0, s1, zc0, zc1);
      tot0 = _mm256_fmadd_ps(s0, g0, tot0);
      tot1 = _mm256_fmadd_ps(s1, g1, tot1);
      if (a.zeros) {
        // the int8 groups' sums are of x_hat: their correction uses x_hat's sum too
        const __m256 xs = _mm256_set1_ps(i8 ? a.xqsum[lg] : a.xsum[lg]);
        tot0 = _mm256_fnmadd_ps(_mm256_mul_ps(zc0, s0), xs, tot0);
        tot1 = _mm256_fnmadd_ps(_mm256_mul_ps(zc1, s1), xs, tot1);
      }
    }
    alignas(32) float out[16];
    _mm256_store_ps(out, tot0);
    _mm256_store_ps(out + 8, tot1);
    store_block(a, 0, cb * 16, out);
  }
  return bad;
}

int gemv_rows_cols_avx2(const GemmArgs& a, int64_t cb0, int64_t cb1) {
  int bad = 0;
  const int64_t tiles = a.G / 32, M = a.M;
  const int64_t nchunks = (M + 3) / 4;   // even split into chunks of at most 4 rows
  __m256 tot[2 * TASA_GEMV_ROWS_MAX];
  if (a.nq > 0) prefetch_stream_start(a, cb0, cb1);
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    const uint32_t* blk = a.qweight + cb * a.R * 16;
    for (int64_t i = 0; i < 2 * M; ++i) tot[i] = _mm256_setzero_ps();
    if (a.nq > 0) prefetch_scales(a, cb, cb1);
    // group-outer, rows-inner: the group's codes (<= 1 KB) stay in L1 for every chunk
    for (int64_t j = 0; j < a.n_groups; ++j) {
      const int b = a.gtable[j * 3];
      const int64_t off = a.gtable[j * 3 + 1], lg = a.gtable[j * 3 + 2];
      const uint32_t* wp = blk + off * 16;
      __m256 s0, s1, zc0, zc1;
      bad |= load_scale_zero(a, j, cb, b, s0, s1, zc0, zc1);
      const bool i8 = a.nq == 2 && b != 8;   // the driver sets nq only for 2 pieces (see above)
      if (i8) {   // pairs of rows, evenly split
        const int64_t nch = (M + 1) / 2;
        for (int64_t ch = 0; ch < nch; ++ch) {
          const int64_t m0 = M * ch / nch, m1 = M * (ch + 1) / nch;
          const int mr = (int)(m1 - m0);
          __m256* t = tot + 2 * m0;
          if (b == 2) rows_group_i8_n<2>(a, mr, wp, lg, tiles, m0, ch == 0, s0, s1, t);
          else if (b == 3) rows_group_i8_n<3>(a, mr, wp, lg, tiles, m0, ch == 0, s0, s1, t);
          else rows_group_i8_n<4>(a, mr, wp, lg, tiles, m0, ch == 0, s0, s1, t);
        }
      }
      const __m256 f = _mm256_set1_ps(1.0f / (float)(1u << (32 - b)));   // exact power of two
      const __m256 sc0 = _mm256_mul_ps(s0, f), sc1 = _mm256_mul_ps(s1, f);
      for (int64_t ch = 0; ch < (i8 ? 0 : nchunks); ++ch) {
        const int64_t m0 = M * ch / nchunks, m1 = M * (ch + 1) / nchunks;
        const float* xg = a.xl + m0 * a.K + lg * a.G;
        __m256* t = tot + 2 * m0;
        const int mr = (int)(m1 - m0);
        switch (b) {
          case 2: rows_group_n<2>(mr, wp, xg, a.K, tiles, sc0, sc1, t); break;
          case 3: rows_group_n<3>(mr, wp, xg, a.K, tiles, sc0, sc1, t); break;
          case 4: rows_group_n<4>(mr, wp, xg, a.K, tiles, sc0, sc1, t); break;
          default: rows_group_n<8>(mr, wp, xg, a.K, tiles, sc0, sc1, t); break;
        }
      }
      if (a.zeros) {   // the zero correction, per row
        const __m256 zs0 = _mm256_mul_ps(zc0, s0);
        const __m256 zs1 = _mm256_mul_ps(zc1, s1);
        for (int64_t m = 0; m < M; ++m) {   // (the int8 groups' sums are of x_hat: its sums)
          const __m256 xs = _mm256_set1_ps(i8 ? a.xqsum[m * a.n_groups + lg]
                                              : a.xsum[m * a.n_groups + lg]);
          tot[2 * m] = _mm256_fnmadd_ps(zs0, xs, tot[2 * m]);
          tot[2 * m + 1] = _mm256_fnmadd_ps(zs1, xs, tot[2 * m + 1]);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      alignas(32) float out[16];
      _mm256_store_ps(out, tot[2 * m]);
      _mm256_store_ps(out + 8, tot[2 * m + 1]);
      store_block(a, m, cb * 16, out);
    }
  }
  return bad;
}

int gemm_cols_avx2(const GemmArgs& a, int64_t cb0, int64_t cb1) {
  int bad = 0;
  const int64_t tiles = a.G / 32, M = a.M;
  std::vector<float> buf(a.G * 16), yacc(M * 16);
  const int64_t nchunks = (M + 5) / 6;
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    const uint32_t* blk = a.qweight + cb * a.R * 16;
    std::fill(yacc.begin(), yacc.end(), 0.f);
    for (int64_t j = 0; j < a.n_groups; ++j) {
      const int b = a.gtable[j * 3];
      const int64_t off = a.gtable[j * 3 + 1], lg = a.gtable[j * 3 + 2];
      __m256 s0, s1, zc0, zc1;
      bad |= load_scale_zero(a, j, cb, b, s0, s1, zc0, zc1);
      const uint32_t* wp = blk + off * 16;
      switch (b) {
        case 2: dequant_group<2>(wp, tiles, s0, s1, zc0, zc1, buf.data()); break;
        case 3: dequant_group<3>(wp, tiles, s0, s1, zc0, zc1, buf.data()); break;
        case 4: dequant_group<4>(wp, tiles, s0, s1, zc0, zc1, buf.data()); break;
        default: dequant_group<8>(wp, tiles, s0, s1, zc0, zc1, buf.data()); break;
      }
      // Even split of the M rows into chunks of at most 6 (6 rows x 2 halves = 12 accumulators).
      for (int64_t ch = 0; ch < nchunks; ++ch) {
        const int64_t m0 = M * ch / nchunks, m1 = M * (ch + 1) / nchunks;
        micro_n((int)(m1 - m0), buf.data(), a.G, a.xl + m0 * a.K + lg * a.G, a.K,
                yacc.data() + m0 * 16);
      }
    }
    for (int64_t m = 0; m < M; ++m) store_block(a, m, cb * 16, yacc.data() + m * 16);
  }
  return bad;
}

// x [K] in logical order -> nq int8 pieces per group of G, the AVX2 twin of
// quantize_x_i8_avx512 (the same pieces: the same max, steps, products and round-to-nearest),
// written straight into the three orders the int8 GEMV reads (code_bytes): xqr[0] for 2-bit
// groups (within every 16 values: 0 4 8 12 1 5 9 13 2 6 10 14 3 7 11 15, the fields of a 2-bit
// word by shift), xqr[1] for 3-bit groups (within every 32: s, s + 8, s + 16, s + 24 for s =
// 0..7), xqr[2] for 4-bit groups (within every 8: 0 2 4 6 1 3 5 7, low then high nibbles), each
// [nq][K], only those whose bit (1 << (b - 2)) is set in need; steps d, piece sums h [nq][K/G],
// xsum [K/G] the sum of x_hat. Returns 0; 1 when a
// group's largest |x| is nonzero but below 2^-96, 2 on a NaN/Inf in x or an fp32 overflow of a
// group's sum (the caller then keeps the float GEMV).
int quantize_x_i8_avx2(const float* x, int64_t K, int64_t G, int nq, int8_t* const* xqr,
                       int need, float* d, int32_t* h, float* xsum) {
  const int64_t ng = K / G;
  const __m128i ord2 = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m128i ord4 = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t g = 0; g < ng; ++g) {
    const float* xg = x + g * G;
    __m256 mx = _mm256_setzero_ps();
    int nonfinite = 0;
    for (int64_t k = 0; k < G; k += 8) {
      const __m256 v = _mm256_and_ps(_mm256_loadu_ps(xg + k), absmask);
      nonfinite |= _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(__builtin_inff()), _CMP_NLT_UQ));
      mx = _mm256_max_ps(mx, v);
    }
    if (nonfinite) return 2;
    alignas(32) float mv[8];
    _mm256_store_ps(mv, mx);
    float m = 0.f;
    for (int i = 0; i < 8; ++i) m = mv[i] > m ? mv[i] : m;
    if (m != 0.f && m < 0x1p-96f) return 1;
    float dq[3], inv[3];
    for (int q = 0; q < nq; ++q) {
      dq[q] = q == 0 ? m / 127.f : dq[q - 1] / 254.f;
      inv[q] = m == 0.f ? 0.f : 1.f / dq[q];
    }
    __m256i hs[3] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int64_t k = 0; k < G; k += 16) {
      __m256 r[2] = {_mm256_loadu_ps(xg + k), _mm256_loadu_ps(xg + k + 8)};
      for (int q = 0; q < nq; ++q) {
        __m256i hq[2];
        for (int u = 0; u < 2; ++u) {
          hq[u] = _mm256_cvtps_epi32(_mm256_mul_ps(r[u], _mm256_set1_ps(inv[q])));
          hq[u] = _mm256_max_epi32(_mm256_min_epi32(hq[u], _mm256_set1_epi32(127)),
                                   _mm256_set1_epi32(-127));
          hs[q] = _mm256_add_epi32(hs[q], hq[u]);
          r[u] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(hq[u]), _mm256_set1_ps(dq[q]), r[u]);
        }
        // 16 int32 -> 16 int8 in order (the packs interleave 128-bit lanes: permute back)
        const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(hq[0], hq[1]), 0xD8);
        const __m128i b8 = _mm_packs_epi16(_mm256_castsi256_si128(w16),
                                           _mm256_extracti128_si256(w16, 1));
        if (need & 1) _mm_storeu_si128((__m128i*)(xqr[0] + q * K + g * G + k), _mm_shuffle_epi8(b8, ord2));
        if (need & 2) _mm_storeu_si128((__m128i*)(xqr[1] + q * K + g * G + k), b8);   // reordered below
        if (need & 4) _mm_storeu_si128((__m128i*)(xqr[2] + q * K + g * G + k), _mm_shuffle_epi8(b8, ord4));
      }
    }
    // 3-bit order, per 32 values: out[4s + j] = in[s + 8j] (code set s of code_bytes<3>): pair
    // in[s], in[s + 8] and in[s + 16], in[s + 24] as 16-bit units, then interleave the units
    for (int q = 0; q < (need & 2 ? nq : 0); ++q)
      for (int64_t k = 0; k < G; k += 32) {
        int8_t* o = xqr[1] + q * K + g * G + k;
        const __m128i pairs = _mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
        const __m128i a = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)o), pairs);
        const __m128i b = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)(o + 16)), pairs);
        _mm_storeu_si128((__m128i*)o, _mm_unpacklo_epi16(a, b));
        _mm_storeu_si128((__m128i*)(o + 16), _mm_unpackhi_epi16(a, b));
      }
    double sum = 0.0;
    for (int q = 0; q < nq; ++q) {
      alignas(32) int32_t hv[8];
      _mm256_store_si256((__m256i*)hv, hs[q]);
      int32_t t = 0;
      for (int i = 0; i < 8; ++i) t += hv[i];
      h[q * ng + g] = t;
      d[q * ng + g] = dq[q];
      sum += (double)dq[q] * (double)t;
    }
    xsum[g] = (float)sum;
    if (!(xsum[g] - xsum[g] == 0.f)) return 2;   // the sum overflowed fp32
  }
  return 0;
}

}  // namespace tasa
#pragma GCC pop_options
