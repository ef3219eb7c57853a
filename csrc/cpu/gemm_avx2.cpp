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

template <class F, int... I>
inline __attribute__((always_inline)) void static_for(std::integer_sequence<int, I...>, F&& f) {
  (f(std::integral_constant<int, I>{}), ...);
}

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

// ---- 2 <= M <= tasa_cpu_gemv_rows(): the GEMV decode shared by up to 4 rows -------------------------
// Each code vector is decoded once (code_top: slli + and + cvt) and feeds MR rows' FMAs, so a
// batched decode step reads and decodes the weights once, as the GEMV does, instead of the
// dequantize-to-L1 GEMM's sub + mul + store + reload per code. Chains: MR rows x 2 halves x C
// (8 independent FMA chains for MR = 2 and 4, 6 for MR = 3: the FMA latency hidden); x is NOT
// pre-scaled here (that would need 4 x M x K floats): the 2^-(32-B) of code_top is folded into
// the group's scale instead (a power of two: the same products, exactly).
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
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    const uint32_t* blk = a.qweight + cb * a.R * 16;
    __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
    for (int64_t j = 0; j < a.n_groups; ++j) {
      const int b = a.gtable[j * 3];
      const int64_t off = a.gtable[j * 3 + 1], lg = a.gtable[j * 3 + 2];
      const uint32_t* wp = blk + off * 16;
      __m256 g0, g1;
      switch (b) {
        case 2: gemv_group<2>(wp, a.xs[0] + lg * a.G, tiles, g0, g1); break;
        case 3: gemv_group<3>(wp, a.xs[1] + lg * a.G, tiles, g0, g1); break;
        case 4: gemv_group<4>(wp, a.xs[2] + lg * a.G, tiles, g0, g1); break;
        default: gemv_group<8>(wp, a.xs[3] + lg * a.G, tiles, g0, g1); break;
      }
      __m256 s0, s1;
      bad |= load_half16(a.scales + j * a.N, cb * 16, a.N, s0, s1);
      tot0 = _mm256_fmadd_ps(s0, g0, tot0);
      tot1 = _mm256_fmadd_ps(s1, g1, tot1);
      if (a.zeros) {   // asymmetric: y -= s * (z - 2^(b-1)) * sum(x_group)
        __m256 z0, z1;
        bad |= load_half16(a.zeros + j * a.N, cb * 16, a.N, z0, z1);
        const __m256 c = _mm256_set1_ps((float)(1 << (b - 1)));
        const __m256 xs = _mm256_set1_ps(a.xsum[lg]);
        tot0 = _mm256_fnmadd_ps(_mm256_mul_ps(_mm256_sub_ps(z0, c), s0), xs, tot0);
        tot1 = _mm256_fnmadd_ps(_mm256_mul_ps(_mm256_sub_ps(z1, c), s1), xs, tot1);
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
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    const uint32_t* blk = a.qweight + cb * a.R * 16;
    for (int64_t i = 0; i < 2 * M; ++i) tot[i] = _mm256_setzero_ps();
    // group-outer, rows-inner: the group's codes (<= 1 KB) stay in L1 for every chunk
    for (int64_t j = 0; j < a.n_groups; ++j) {
      const int b = a.gtable[j * 3];
      const int64_t off = a.gtable[j * 3 + 1], lg = a.gtable[j * 3 + 2];
      const uint32_t* wp = blk + off * 16;
      __m256 s0, s1;
      bad |= load_half16(a.scales + j * a.N, cb * 16, a.N, s0, s1);
      const __m256 f = _mm256_set1_ps(1.0f / (float)(1u << (32 - b)));   // exact power of two
      const __m256 sc0 = _mm256_mul_ps(s0, f), sc1 = _mm256_mul_ps(s1, f);
      for (int64_t ch = 0; ch < nchunks; ++ch) {
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
      if (a.zeros) {   // asymmetric: y -= s * (z - 2^(b-1)) * sum(x_group), per row
        __m256 z0, z1;
        bad |= load_half16(a.zeros + j * a.N, cb * 16, a.N, z0, z1);
        const __m256 c = _mm256_set1_ps((float)(1 << (b - 1)));
        const __m256 zs0 = _mm256_mul_ps(_mm256_sub_ps(z0, c), s0);
        const __m256 zs1 = _mm256_mul_ps(_mm256_sub_ps(z1, c), s1);
        for (int64_t m = 0; m < M; ++m) {
          const __m256 xs = _mm256_set1_ps(a.xsum[m * a.n_groups + lg]);
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
      bad |= load_half16(a.scales + j * a.N, cb * 16, a.N, s0, s1);
      const __m256 c = _mm256_set1_ps((float)(1 << (b - 1)));
      if (a.zeros) {
        bad |= load_half16(a.zeros + j * a.N, cb * 16, a.N, zc0, zc1);
        zc0 = _mm256_sub_ps(zc0, c);
        zc1 = _mm256_sub_ps(zc1, c);
      } else {
        zc0 = zc1 = _mm256_setzero_ps();
      }
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

}  // namespace tasa
#pragma GCC pop_options
