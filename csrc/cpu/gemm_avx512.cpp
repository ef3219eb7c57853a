// AVX-512 (F/BW/VL/DQ + VBMI + BF16) kernels of the fused dequant GEMV/GEMM (format.h layout).
// Chosen at run time (cpu_features.cpp) on CPUs that have all of these (Zen 4/5, Sapphire
// Rapids and later); only this translation unit is compiled for them (#pragma GCC target), so
// the library still loads on an AVX2-only CPU.
//
// Why not the AVX2 recipe in wider registers: that GEMV spends shift + mask + int->float
// convert + one fp32 FMA per code and lane (4 vector ops per 16 codes); on 2 Zen cores it tops
// out at ~17 G codes/s, so 3-bit (fewer bytes, same op count, extra funnel shifts) was *slower*
// than 4-bit: compute-bound, not bandwidth-bound. Here one zmm register holds one packed row of
// a 16-column block, and every op handles two codes of each of the 16 columns:
//
//   1. vpmultishiftqb picks, for every column (dword lane), an 8-bit window starting at code
//      2p into byte 0 and one starting at code 2p+1 into byte 2 (any bit offsets; no masks).
//      The two 3-bit pairs whose codes straddle two words (codes 10/11 and 20/21) are first
//      funnel-shifted together (2 shifts + or, twice per 32-row tile).
//   2. vpermw looks both codes up in a 32-entry table of bf16 values: it uses only the low 5
//      bits of each 16-bit index, so the table repeats the centred values q - 2^(b-1) with
//      period 2^b and the neighbouring code's bits above the field need no mask. Small
//      integers are exact in bf16.
//   3. vdpbf16ps adds code(2p) * x[2p] + code(2p+1) * x[2p+1] into an fp32 accumulator per
//      column; the x pair is one dword broadcast from memory.
//
// Exactness: a bf16 x bf16 product has at most 16 significant bits, so it is exact in fp32;
// only the fp32 accumulation rounds, as in an fp32 FMA loop. x itself must be a sum of bf16
// values: bf16 activations are (1 piece), fp16 ones are hi + lo (2 pieces, 8 + 3 significant
// bits), fp32 ones hi + mid + lo (3 pieces, 8 + 8 + 8 bits, exact by construction: each piece
// is the bf16 truncation of the remainder, and the remainders are exact fp32 subtractions).
// Each piece is one more vdpbf16ps per code pair, so fp32 activations cost 5 ops per 32
// multiply-adds against the AVX2 path's ~8; bf16 activations 3. (The only inexactness left is
// the instruction's denormal flushing, i.e. |x| < ~1e-31 pieces read as 0.)
//
// 8-bit codes do not fit a vpermw table: with nibbles q = 16 hi + lo, two table look-ups
// (16 (hi - 8) and lo - 8, both exact in bf16) accumulate into the same sums, which are then
// centred at 136 instead of 128 (16 (hi - 8) + (lo - 8) = q - 136); the zero-point correction
// below uses that centre. Partial sums stay centred, so no large q*x sum cancels against
// z*sum(x): the fp32 error stays at the level of a dense fp32 matmul. Per group the sums are
// reduced once and scaled once: y += s * g - s * (z - centre) * sum(x_group) (asymmetric z).
#pragma GCC push_options
// (amx-tile/amx-bf16: only the tile intrinsics of gemm_cols_amx use them; the compiler never
// emits tile instructions on its own, so the other kernels run on CPUs without AMX)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vbmi2,avx512bf16,avx512vnni,avx2,fma,f16c,amx-tile,amx-bf16")
// GCC 12's unmasked shift intrinsics start from _mm512_undefined_*: a -Wmaybe-uninitialized
// false positive in every inlined use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "gemm_internal.h"
#include "tasa/format.h"

namespace tasa {
namespace {


// bf16 bit pattern of a small integer v (|v| <= 128: at most 8 significant bits, exact).
constexpr uint16_t bf16_int(int v) {
  if (v == 0) return 0;
  const uint16_t sign = v < 0 ? 0x8000 : 0;
  const int m = v < 0 ? -v : v;
  int e = 0;
  while ((m >> (e + 1)) != 0) ++e;
  return (uint16_t)(sign | (uint16_t)((127 + e) << 7) | (uint16_t)((m << (7 - e)) & 0x7F));
}

// vpermw table for fields of U bits: entry i = bf16(MUL * ((i mod 2^U) - 2^(U-1))).
template <int U, int MUL>
struct Lut {
  alignas(64) uint16_t t[32];
  constexpr Lut() : t() {
    for (int i = 0; i < 32; ++i) t[i] = bf16_int(MUL * ((i & ((1 << U) - 1)) - (1 << (U - 1))));
  }
};
template <int U, int MUL>
constexpr Lut<U, MUL> kLut{};

template <int U, int MUL>
inline __m512i lut() { return _mm512_load_si512((const void*)kLut<U, MUL>.t); }

// Index register for one vpermw: byte 0 of every column's dword = bits [LO, LO+8) of the
// tile, byte 2 = bits [HI, HI+8) (tile bit positions; the two fields must be U bits wide).
// w: the tile's B words (zmm rows).
template <int U, int LO, int HI>
inline __attribute__((always_inline)) __m512i pair_index(const __m512i* w) {
  constexpr int wi = LO >> 5;
  constexpr bool straddle = HI + U > 32 * (wi + 1);
  constexpr int lo = straddle ? 0 : LO - 32 * wi, hi = straddle ? HI - LO : HI - 32 * wi;
  __m512i v = w[wi];
  if constexpr (straddle) {   // funnel: the tile's bits from LO on, across the word boundary
    constexpr int s = LO & 31;
    v = _mm512_or_si512(_mm512_srli_epi32(w[wi], s), _mm512_slli_epi32(w[wi + 1], 32 - s));
  }
  if constexpr (lo == 0 && hi == 16) return v;
  // vpmultishiftqb works per qword = two columns: bytes 0-3 from the low dword, 4-7 from the
  // high one (bytes 1 and 3 are ignored by vpermw beyond bit 4 of each word; fill them anyway).
  constexpr uint64_t c = (uint64_t)lo | (uint64_t)lo << 8 | (uint64_t)hi << 16 | (uint64_t)hi << 24 |
                         (uint64_t)(lo + 32) << 32 | (uint64_t)(lo + 32) << 40 |
                         (uint64_t)(hi + 32) << 48 | (uint64_t)(hi + 32) << 56;
  // (maskz form: the unmasked intrinsic trips a GCC 12 -Wmaybe-uninitialized false positive)
  return _mm512_maskz_multishift_epi64_epi8(~(__mmask64)0, _mm512_set1_epi64((long long)c), v);
}

inline __attribute__((always_inline)) __m512 dp(__m512 acc, __m512i codes, const uint16_t* xpair) {
  int32_t xv;
  __builtin_memcpy(&xv, xpair, 4);
  return _mm512_dpbf16_ps(acc, (__m512bh)codes, (__m512bh)_mm512_set1_epi32(xv));
}

// ---- Software prefetch: gemm_internal.h (shared with the AVX2 kernels) ---------------------

constexpr int NACC = 8;   // independent accumulation chains: hide vdpbf16ps latency

// Loads the B packed rows of tile t of a group (wp: the group's first row in this block) and
// prefetches the rows further on in the same stream (prefetch_ahead).
template <int B>
inline __attribute__((always_inline)) void load_tile(const uint32_t* wp, int64_t t, __m512i* w) {
  for (int i = 0; i < B; ++i) w[i] = _mm512_loadu_si512((const void*)(wp + (t * B + i) * 16));
  for (int i = 0; i < B; ++i) prefetch_ahead(wp + (t * B + i) * 16);
}

// Code pair p (codes 2p, 2p+1) of a loaded tile as centred bf16 values for all 16 columns:
// v[0] (B < 8), or the low-nibble units v[0] and the high-nibble units v[1] (B = 8).
template <int B, int p>
inline __attribute__((always_inline)) void decode_pair(const __m512i* w, __m512i tab, __m512i tab_hi,
                                                       __m512i* v) {
  if constexpr (B == 8) {
    v[0] = _mm512_permutexvar_epi16(pair_index<4, 16 * p, 16 * p + 8>(w), tab);
    v[1] = _mm512_permutexvar_epi16(pair_index<4, 16 * p + 4, 16 * p + 12>(w), tab_hi);
  } else {
    v[0] = _mm512_permutexvar_epi16(pair_index<B, 2 * p * B, (2 * p + 1) * B>(w), tab);
  }
}

// Sum over one group of (q - centre) * x for the 16 columns of a block. wp: the group's first
// packed row in this block; xg[q]: the group's slice of bf16 piece q of x.
template <int B, int NP>
inline __attribute__((always_inline)) __m512 group_sum(const uint32_t* wp, const uint16_t* const* xg,
                                                       int64_t tiles, __m512i tab, __m512i tab_hi) {
  __m512 acc[NACC];
  for (int i = 0; i < NACC; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t t = 0; t < tiles; ++t) {
    __m512i w[B];
    load_tile<B>(wp, t, w);
    static_for(std::make_integer_sequence<int, 16>{}, [&](auto P) {
      constexpr int p = decltype(P)::value;
      __m512i v[2];
      decode_pair<B, p>(w, tab, tab_hi, v);
      if constexpr (B == 8) {
        static_for(std::make_integer_sequence<int, NP>{}, [&](auto Q) {
          constexpr int q = decltype(Q)::value, i = 2 * (p * NP + q);
          acc[i % NACC] = dp(acc[i % NACC], v[0], xg[q] + t * 32 + 2 * p);
          acc[(i + 1) % NACC] = dp(acc[(i + 1) % NACC], v[1], xg[q] + t * 32 + 2 * p);
        });
      } else {
        static_for(std::make_integer_sequence<int, NP>{}, [&](auto Q) {
          constexpr int q = decltype(Q)::value, i = p * NP + q;
          acc[i % NACC] = dp(acc[i % NACC], v[0], xg[q] + t * 32 + 2 * p);
        });
      }
    });
  }
  const __m512 s01 = _mm512_add_ps(acc[0], acc[1]), s23 = _mm512_add_ps(acc[2], acc[3]);
  const __m512 s45 = _mm512_add_ps(acc[4], acc[5]), s67 = _mm512_add_ps(acc[6], acc[7]);
  return _mm512_add_ps(_mm512_add_ps(s01, s23), _mm512_add_ps(s45, s67));
}

// 16 fp16 values of a block row (clipped to N, zero padded) as fp32; *bad |= any NaN/Inf.
inline __m512 load_half16(const uint16_t* row, int64_t n0, int64_t N, int* bad) {
  const __mmask16 m = n0 + 16 <= N ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n0)) - 1u);
  const __m256i v = _mm256_maskz_loadu_epi16(m, row + n0);
  const __m256i e = _mm256_set1_epi16(0x7C00);
  *bad |= _mm256_cmpeq_epi16_mask(_mm256_and_si256(v, e), e) != 0;
  return _mm512_cvtph_ps(v);
}

// Adds the stored groups [j0, j1) -- one segment of equal width B (the table is sorted by
// width) -- of column block cb to tot. One call per segment, not per group: a call per group
// that switched between the 3- and 4-bit bodies measured ~12% slower on the 3.5-bit mix than on
// either uniform width.
struct SegBf16 {   // (a struct: gemv_blocks takes it as a template argument)
template <int B, int NP>
__attribute__((noinline)) static __m512 run(const GemmArgs& a, int64_t cb, int64_t j0, int64_t j1,
                                              __m512 tot, int* bad) {
  const __m512i tab = B == 8 ? lut<4, 1>() : lut<B, 1>();
  const __m512i tab_hi = lut<4, 16>();   // 8-bit only: high nibble, 16 * (h - 8)
  // The sums are centred at 2^(b-1), except 8-bit ones at 136 (see the top). Zero point z
  // (2^(b-1) when symmetric): y += s * g - s * (z - centre) * sum(x_group).
  const __m512 centre = _mm512_set1_ps(B == 8 ? 136.f : (float)(1 << (B - 1)));
  const uint32_t* blk = a.qweight + cb * a.R * 16;
  const int64_t tiles = a.G / 32;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t off = a.gtable[j * 3 + 1], lg = a.gtable[j * 3 + 2];
    const uint16_t* xg[3];
    for (int q = 0; q < 3; ++q) xg[q] = a.xp[q < NP ? q : 0] + lg * a.G;
    const __m512 g = group_sum<B, NP>(blk + off * 16, xg, tiles, tab, tab_hi);
    const __m512 s = load_half16(a.scales + j * a.N, cb * 16, a.N, bad);
    tot = _mm512_fmadd_ps(s, g, tot);
    if (a.zeros || B == 8) {
      const __m512 z = a.zeros ? load_half16(a.zeros + j * a.N, cb * 16, a.N, bad) : _mm512_set1_ps(128.f);
      tot = _mm512_fnmadd_ps(_mm512_mul_ps(_mm512_sub_ps(z, centre), s), _mm512_set1_ps(a.xsum[lg]), tot);
    }
  }
  return tot;
}
};

// The column-block loop of both GEMVs: per block, one Seg::run<B, P> call per uniform segment
// of the stored groups (Seg: the bf16-piece or the int8-piece segment kernel).
template <class Seg, int P>
int gemv_blocks(const GemmArgs& a, int64_t cb0, int64_t cb1) {
  int bad = 0;
  prefetch_stream_start(a, cb0, cb1);
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    __m512 tot = _mm512_setzero_ps();
    prefetch_scales(a, cb, cb1);
    for (int64_t j0 = 0, j1; j0 < a.n_groups; j0 = j1) {
      const int b = a.gtable[j0 * 3];
      for (j1 = j0 + 1; j1 < a.n_groups && a.gtable[j1 * 3] == b; ++j1) {}
      switch (b) {
        case 2: tot = Seg::template run<2, P>(a, cb, j0, j1, tot, &bad); break;
        case 3: tot = Seg::template run<3, P>(a, cb, j0, j1, tot, &bad); break;
        case 4: tot = Seg::template run<4, P>(a, cb, j0, j1, tot, &bad); break;
        default: tot = Seg::template run<8, P>(a, cb, j0, j1, tot, &bad); break;
      }
    }
    alignas(64) float out[16];
    _mm512_store_ps(out, tot);
    store_block(a, 0, cb * 16, out);
  }
  return bad;
}

template <int NP>
int gemv_cols(const GemmArgs& a, int64_t cb0, int64_t cb1) { return gemv_blocks<SegBf16, NP>(a, cb0, cb1); }


// ---- M = 1 with int8 pieces of x (TASA_ISA_AVX512_VNNI) --------------------------------------
// Why a second GEMV: the bf16 one above spends three instructions per code pair at every width
// (index, vpermw, vdpbf16ps), so 3-bit, with 0.76x the bytes of 4-bit, ran at the same
// instruction rate and only 1.01-1.17x faster than 4-bit (benchmarks/results/
// gemm_cpu_3bit_amd.md; 0.9x on an Intel Xeon). vpdpbusd multiplies 4 unsigned bytes by 4
// signed bytes and adds them into an int32 lane: with the codes as bytes and x as int8, one
// instruction is 4 codes of each of 16 columns (vdpbf16ps: 2), and the codes need no table
// (their integer value is the weight up to the centre). A quad of 3-bit codes is one
// vpmultishiftqb (four 8-bit windows per column) + one vpand; 8-bit codes are the packed bytes
// themselves. Per 32-row tile and NQ pieces of x: 8 (index) + 8 (mask) + 8 NQ (vpdpbusd) + the
// funnel shifts of the two straddling 3-bit quads, against 16 + 16 + 16 NQ' + 6 for bf16 pieces.
//
// Precision: x of each logical group g is NQ int8 pieces h_q with steps d_0 = max|x_g| / 127,
// d_(q+1) = d_q / 254, each the rounded remainder of the ones before, so
//     |x - sum_q d_q h_q| <= max|x_g| * 254^-NQ      (+ fp32 rounding of the remainders)
// i.e. 1.5e-5 of the group's largest |x| for NQ = 2 (bf16 x), 6.1e-8 (2^-24) for NQ = 3
// (fp16 and fp32 x): below the rounding of a bf16 x (2^-9 of each |x|) and at the level of an fp32
// dot product. The integer sums are exact (|q h| <= 255 * 127 per term); each piece's sum is
// converted to fp32 once per group. The driver keeps the bf16 GEMV for non-finite x and for
// groups whose largest |x| is below 2^-96 (their steps would leave the normal fp32 range).
template <int B, int I>
inline __attribute__((always_inline)) __m512i quad_codes(const __m512i* w) {
  constexpr int LO = 4 * I * B, wi = LO >> 5, s = LO & 31;
  constexpr bool straddle = LO + 4 * B > 32 * (wi + 1);
  __m512i v = w[wi];
  if constexpr (straddle)   // funnel: the tile's bits from LO on, across the word boundary
    v = _mm512_shrdi_epi32(w[wi], w[wi + 1], s);   // (VBMI2: one op for the shift-shift-or)
  constexpr uint64_t o = straddle ? 0 : s;
  constexpr uint64_t c = o | (o + B) << 8 | (o + 2 * B) << 16 | (o + 3 * B) << 24 |
                         (o + 32) << 32 | (o + 32 + B) << 40 | (o + 32 + 2 * B) << 48 |
                         (o + 32 + 3 * B) << 56;
  v = _mm512_maskz_multishift_epi64_epi8(~(__mmask64)0, _mm512_set1_epi64((long long)c), v);
  return _mm512_and_si512(v, _mm512_set1_epi8((char)((1 << B) - 1)));
}

// Sum over one group of (q - centre) * x_hat for the 16 columns of a block; xg[q]: the
// group's slice of int8 piece q, d[q] its step, init[q] = -centre * (sum of that slice).
template <int B, int NQ>
inline __attribute__((always_inline)) __m512 group_sum_i8(const uint32_t* wp, const int8_t* const* xg,
                                                          const float* d, const int32_t* init,
                                                          int64_t tiles) {
  constexpr int NC = 4;   // chains per piece (NQ >= 2 pieces: 8-12 chains for 4-5 cycles latency)
  __m512i acc[NQ][NC];
  for (int q = 0; q < NQ; ++q)
    for (int i = 0; i < NC; ++i) acc[q][i] = i == 0 ? _mm512_set1_epi32(init[q]) : _mm512_setzero_si512();
  for (int64_t t = 0; t < tiles; ++t) {
    __m512i w[B];
    load_tile<B>(wp, t, w);
    static_for(std::make_integer_sequence<int, 8>{}, [&](auto Iq) {
      constexpr int i = decltype(Iq)::value;
      __m512i c;
      if constexpr (B == 8) c = w[i];
      else c = quad_codes<B, i>(w);
      static_for(std::make_integer_sequence<int, NQ>{}, [&](auto Q) {
        constexpr int q = decltype(Q)::value;
        int32_t xv;
        __builtin_memcpy(&xv, xg[q] + t * 32 + 4 * i, 4);
        acc[q][i % NC] = _mm512_dpbusd_epi32(acc[q][i % NC], c, _mm512_set1_epi32(xv));
      });
    });
  }
  __m512 g = _mm512_setzero_ps();
  for (int q = 0; q < NQ; ++q) {
    __m512i sq = acc[q][0];
    for (int i = 1; i < NC; ++i) sq = _mm512_add_epi32(sq, acc[q][i]);
    g = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sq), _mm512_set1_ps(d[q]), g);
  }
  return g;
}

struct SegI8 {   // (a struct: gemv_blocks takes it as a template argument)
template <int B, int NQ>
__attribute__((noinline)) static __m512 run(const GemmArgs& a, int64_t cb, int64_t j0, int64_t j1,
                                                 __m512 tot, int* bad) {
  constexpr int centre = 1 << (B - 1);   // also 8-bit: the codes are used as they are
  const uint32_t* blk = a.qweight + cb * a.R * 16;
  const int64_t tiles = a.G / 32;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t off = a.gtable[j * 3 + 1], lg = a.gtable[j * 3 + 2];
    const int8_t* xg[3];
    float d[3];
    int32_t init[3];
    for (int q = 0; q < NQ; ++q) {
      xg[q] = a.xq + q * a.K + lg * a.G;
      d[q] = a.xqd[q * a.n_groups + lg];
      init[q] = -centre * a.xqh[q * a.n_groups + lg];
    }
    const __m512 g = group_sum_i8<B, NQ>(blk + off * 16, xg, d, init, tiles);
    const __m512 s = load_half16(a.scales + j * a.N, cb * 16, a.N, bad);
    tot = _mm512_fmadd_ps(s, g, tot);
    if (a.zeros) {   // y -= s * (z - centre) * sum(x_hat of the group)
      const __m512 z = load_half16(a.zeros + j * a.N, cb * 16, a.N, bad);
      tot = _mm512_fnmadd_ps(_mm512_mul_ps(_mm512_sub_ps(z, _mm512_set1_ps((float)centre)), s),
                             _mm512_set1_ps(a.xqsum[lg]), tot);
    }
  }
  return tot;
}
};

template <int NQ>
int gemv_cols_i8(const GemmArgs& a, int64_t cb0, int64_t cb1) { return gemv_blocks<SegI8, NQ>(a, cb0, cb1); }

// ---- M > 1 ----------------------------------------------------------------------------------
// The GEMM decodes one group of one block once into bf16 code pairs (the vpermw outputs, 4 KiB
// for G = 128, L1-resident) and then runs vdpbf16ps over up to 8 rows of x per pass: the
// decode is shared by all M rows, and each instruction is still 32 exact multiply-adds.
// The driver uses it for bf16 activations only (1 piece); with fp32 x's 3 pieces the AVX2
// dequantize-to-fp32 + FMA GEMM is faster (see gemm.cpp).
// unit u of buf pairs with x[2u, 2u+1] (B < 8), or with x[2(u/2), 2(u/2)+1] (B = 8: low and
// high nibble units alternate).
template <int B>
void decode_group(const uint32_t* wp, int64_t tiles, __m512i* buf) {
  const __m512i tab = B == 8 ? lut<4, 1>() : lut<B, 1>();
  const __m512i tab_hi = lut<4, 16>();
  constexpr int U = B == 8 ? 2 : 1;     // units per code pair
  for (int64_t t = 0; t < tiles; ++t) {
    __m512i w[B];
    load_tile<B>(wp, t, w);
    static_for(std::make_integer_sequence<int, 16>{}, [&](auto P) {
      constexpr int p = decltype(P)::value;
      decode_pair<B, p>(w, tab, tab_hi, buf + (t * 16 + p) * U);
    });
  }
}

// decode_group for a width known at run time (stored group j's).
inline void decode_group_b(int b, const uint32_t* wp, int64_t tiles, __m512i* buf) {
  switch (b) {
    case 2: decode_group<2>(wp, tiles, buf); break;
    case 3: decode_group<3>(wp, tiles, buf); break;
    case 4: decode_group<4>(wp, tiles, buf); break;
    default: decode_group<8>(wp, tiles, buf); break;
  }
}

// The epilogue of stored group j (width b) for column block cb: y += s * g - zc * sum(x_group)
// with g the centred sums (centre 2^(b-1), 136 for 8-bit), zc = s * (z - centre) (z = 2^(b-1)
// when symmetric, so zc = 0 except for 8-bit groups); *bad |= a NaN/Inf scale or zero.
inline void group_affine(const GemmArgs& a, int64_t j, int64_t cb, int b, __m512* s, __m512* zc,
                         int* bad) {
  *s = load_half16(a.scales + j * a.N, cb * 16, a.N, bad);
  const float centre = b == 8 ? 136.f : (float)(1 << (b - 1));
  *zc = _mm512_setzero_ps();
  if (a.zeros || b == 8) {
    const __m512 z = a.zeros ? load_half16(a.zeros + j * a.N, cb * 16, a.N, bad)
                             : _mm512_set1_ps(128.f);
    *zc = _mm512_mul_ps(_mm512_sub_ps(z, _mm512_set1_ps(centre)), *s);
  }
}

// g[m] = sum over the group of buf . x[m] for MC rows; x[q][m]: piece q of row m at the group.
template <int MC, int NP>
void dp_rows(const __m512i* buf, int64_t units, int ushift, const uint16_t* const* x, int64_t M,
             int64_t K, __m512* g) {
  __m512 acc[MC];
  for (int m = 0; m < MC; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t u = 0; u < units; ++u) {
    const __m512i v = _mm512_load_si512((const void*)(buf + u));
    const int64_t xo = 2 * (u >> ushift);
    for (int q = 0; q < NP; ++q)
      for (int m = 0; m < MC; ++m) acc[m] = dp(acc[m], v, x[q] + m * K + xo);
  }
  for (int m = 0; m < MC; ++m) g[m] = acc[m];
}

template <int NP>
void dp_rows_n(int mc, const __m512i* buf, int64_t units, int ushift, const uint16_t* const* x,
               int64_t M, int64_t K, __m512* g) {
  switch (mc) {
    case 1: dp_rows<1, NP>(buf, units, ushift, x, M, K, g); break;
    case 2: dp_rows<2, NP>(buf, units, ushift, x, M, K, g); break;
    case 3: dp_rows<3, NP>(buf, units, ushift, x, M, K, g); break;
    case 4: dp_rows<4, NP>(buf, units, ushift, x, M, K, g); break;
    case 5: dp_rows<5, NP>(buf, units, ushift, x, M, K, g); break;
    case 6: dp_rows<6, NP>(buf, units, ushift, x, M, K, g); break;
    case 7: dp_rows<7, NP>(buf, units, ushift, x, M, K, g); break;
    default: dp_rows<8, NP>(buf, units, ushift, x, M, K, g); break;
  }
}

template <int NP>
int gemm_cols(const GemmArgs& a, int64_t cb0, int64_t cb1) {
  int bad = 0;
  const int64_t tiles = a.G / 32, M = a.M;
  std::vector<uint8_t> mem(tiles * 32 * 64 + 64);   // decoded group, 64-byte aligned
  __m512i* buf = (__m512i*)(((uintptr_t)mem.data() + 63) & ~(uintptr_t)63);
  std::vector<float> yaccv(M * 16);
  float* yacc = yaccv.data();
  const int64_t nchunks = (M + 7) / 8;
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    const uint32_t* blk = a.qweight + cb * a.R * 16;
    for (int64_t i = 0; i < M * 16; ++i) yacc[i] = 0.f;
    prefetch_scales(a, cb, cb1);
    for (int64_t j = 0; j < a.n_groups; ++j) {
      const int b = a.gtable[j * 3];
      const int64_t off = a.gtable[j * 3 + 1], lg = a.gtable[j * 3 + 2];
      decode_group_b(b, blk + off * 16, tiles, buf);
      const int64_t units = tiles * 16 * (b == 8 ? 2 : 1);
      __m512 s, zc;
      group_affine(a, j, cb, b, &s, &zc, &bad);     // centred as in the GEMV
      // Even split of the M rows into chunks of at most 8 (8 accumulators, one per row).
      for (int64_t ch = 0; ch < nchunks; ++ch) {
        const int64_t m0 = M * ch / nchunks, m1 = M * (ch + 1) / nchunks;
        const uint16_t* x[3];
        for (int q = 0; q < 3; ++q) x[q] = a.xp[q < NP ? q : 0] + m0 * a.K + lg * a.G;
        __m512 g[8];
        dp_rows_n<NP>((int)(m1 - m0), buf, units, b == 8 ? 1 : 0, x, M, a.K, g);
        for (int64_t m = m0; m < m1; ++m) {
          __m512 y = _mm512_fmadd_ps(s, g[m - m0], _mm512_loadu_ps(yacc + m * 16));
          y = _mm512_fnmadd_ps(zc, _mm512_set1_ps(a.xsum[m * a.n_groups + lg]), y);
          _mm512_storeu_ps(yacc + m * 16, y);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) store_block(a, m, cb * 16, yacc + m * 16);
  }
  return bad;
}

// ---- AMX: 1 < M ------------------------------------------------------------------------------
// The decoded group above is already a tile: unit p of tile t holds, per column (dword lane),
// the bf16 code pair (2p, 2p+1) -- exactly row p of a TDPBF16PS B operand (16 rows of K-pairs x
// 16 columns). So per 32-row tile of a group: one tile load of the decoded codes (two for 8-bit
// groups: the low- and high-nibble units, stride 128 B), and per bf16 piece of x one tile load
// of 16 rows x 32 values of x and one TDPBF16PS (16 x 16 x 32 multiply-adds; the vdpbf16ps GEMM
// above needs 16 rows x 16 instructions for the same work). The group's sums leave the tile
// through a 1 KB store and get the same scale / zero-point epilogue as gemm_cols. x is padded
// to a multiple of 16 rows with zeros by the driver (a fixed tile shape: one configuration per
// call). Products of bf16 values are exact and accumulate in fp32, as in the other paths.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// NB column blocks per pass (C tiles 4..4+NB-1): every tile load of x then feeds NB products.
// One block per pass re-read all of x (np pieces x 16 rows x K bf16: 384 KB at K = 4096, fp32 x)
// from L2 for every 32 KB of 4-bit weights, and a 16-row step cost 6-7x a 1-row one with fp32 x
// (3.1-4.0x with bf16 x: benchmarks/results/batched_cpu.md, first run).
constexpr int kAmxBlocks = 4;

// GCC's tile intrinsics paste the tile number into the asm text: literal numbers only, so the
// C tile of block k (tile 4 + k) is picked by if constexpr.
template <int k> inline __attribute__((always_inline)) void c_zero() {
  if constexpr (k == 0) _tile_zero(4); else if constexpr (k == 1) _tile_zero(5);
  else if constexpr (k == 2) _tile_zero(6); else _tile_zero(7);
}
template <int k, int B> inline __attribute__((always_inline)) void c_dp() {   // C_k += A(0) . B(1 or 2)
  if constexpr (B == 1) {
    if constexpr (k == 0) _tile_dpbf16ps(4, 0, 1); else if constexpr (k == 1) _tile_dpbf16ps(5, 0, 1);
    else if constexpr (k == 2) _tile_dpbf16ps(6, 0, 1); else _tile_dpbf16ps(7, 0, 1);
  } else {
    if constexpr (k == 0) _tile_dpbf16ps(4, 0, 2); else if constexpr (k == 1) _tile_dpbf16ps(5, 0, 2);
    else if constexpr (k == 2) _tile_dpbf16ps(6, 0, 2); else _tile_dpbf16ps(7, 0, 2);
  }
}
template <int k> inline __attribute__((always_inline)) void c_store(float* dst) {
  if constexpr (k == 0) _tile_stored(4, dst, 64); else if constexpr (k == 1) _tile_stored(5, dst, 64);
  else if constexpr (k == 2) _tile_stored(6, dst, 64); else _tile_stored(7, dst, 64);
}

template <int NP, int NB>
int amx_pass(const GemmArgs& a, int64_t cb, __m512i* bufs, float* cbuf, float* yacc) {
  int bad = 0;
  const int64_t tiles = a.G / 32, M = a.M, Mpad = (M + 15) / 16 * 16;
  const int64_t bufstride = tiles * 32 * 2;              // zmm units per block buffer
  const int xstride = (int)(a.K * 2);
  for (int64_t i = 0; i < NB * M * 16; ++i) yacc[i] = 0.f;
  for (int64_t j = 0; j < a.n_groups; ++j) {
    const int b = a.gtable[j * 3];
    const int64_t off = a.gtable[j * 3 + 1], lg = a.gtable[j * 3 + 2];
    __m512 s[NB], zc[NB];
    for (int k = 0; k < NB; ++k) {
      decode_group_b(b, a.qweight + (cb + k) * a.R * 16 + off * 16, tiles, bufs + k * bufstride);
      group_affine(a, j, cb + k, b, &s[k], &zc[k], &bad);
    }
    for (int64_t m0 = 0; m0 < Mpad; m0 += 16) {
      static_for(std::make_integer_sequence<int, NB>{}, [&](auto K_) {
        c_zero<decltype(K_)::value>();
      });
      for (int64_t t = 0; t < tiles; ++t) {
        static_for(std::make_integer_sequence<int, NP>{}, [&](auto Q) {
          _tile_loadd(0, a.xp[decltype(Q)::value] + m0 * a.K + lg * a.G + t * 32, xstride);
          static_for(std::make_integer_sequence<int, NB>{}, [&](auto K_) {
            constexpr int k = decltype(K_)::value;
            const __m512i* buf = bufs + k * bufstride;
            if (b == 8) {
              _tile_loadd(1, buf + t * 32, 128);
              _tile_loadd(2, buf + t * 32 + 1, 128);
              c_dp<k, 1>();
              c_dp<k, 2>();
            } else {
              _tile_loadd(1, buf + t * 16, 64);
              c_dp<k, 1>();
            }
          });
        });
      }
      static_for(std::make_integer_sequence<int, NB>{}, [&](auto K_) {
        constexpr int k = decltype(K_)::value;
        c_store<k>(cbuf);
        for (int64_t m = m0; m < M && m < m0 + 16; ++m) {
          float* ya = yacc + (k * M + m) * 16;
          __m512 y = _mm512_fmadd_ps(s[k], _mm512_load_ps(cbuf + (m - m0) * 16), _mm512_loadu_ps(ya));
          y = _mm512_fnmadd_ps(zc[k], _mm512_set1_ps(a.xsum[m * a.n_groups + lg]), y);
          _mm512_storeu_ps(ya, y);
        }
      });
    }
  }
  for (int k = 0; k < NB; ++k)
    for (int64_t m = 0; m < M; ++m) store_block(a, m, (cb + k) * 16, yacc + (k * M + m) * 16);
  return bad;
}

template <int NP>
int gemm_cols_amx_np(const GemmArgs& a, int64_t cb0, int64_t cb1) {
  int bad = 0;
  const int64_t tiles = a.G / 32;
  TileConfig cfg;   // 0: x (A), 1-2: decoded codes (B; 2: 8-bit high nibbles), 4-7: sums (C)
  for (int t : {0, 1, 2, 4, 5, 6, 7}) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
  std::vector<uint8_t> mem(kAmxBlocks * tiles * 32 * 2 * 64 + 64 + 16 * 16 * 4 + 64);
  __m512i* bufs = (__m512i*)(((uintptr_t)mem.data() + 63) & ~(uintptr_t)63);
  float* cbuf = (float*)(bufs + kAmxBlocks * tiles * 32 * 2);
  std::vector<float> yacc(kAmxBlocks * a.M * 16);
  for (int64_t cb = cb0; cb < cb1; cb += kAmxBlocks) {
    prefetch_scales(a, cb, cb1);
    switch (std::min<int64_t>(kAmxBlocks, cb1 - cb)) {
      case 1: bad |= amx_pass<NP, 1>(a, cb, bufs, cbuf, yacc.data()); break;
      case 2: bad |= amx_pass<NP, 2>(a, cb, bufs, cbuf, yacc.data()); break;
      case 3: bad |= amx_pass<NP, 3>(a, cb, bufs, cbuf, yacc.data()); break;
      default: bad |= amx_pass<NP, 4>(a, cb, bufs, cbuf, yacc.data()); break;
    }
  }
  _tile_release();
  return bad;
}

}  // namespace

int gemm_cols_amx(const GemmArgs& a, int64_t cb0, int64_t cb1) {
  switch (a.np) {
    case 1: return gemm_cols_amx_np<1>(a, cb0, cb1);
    case 2: return gemm_cols_amx_np<2>(a, cb0, cb1);
    default: return gemm_cols_amx_np<3>(a, cb0, cb1);
  }
}

int gemv_cols_avx512(const GemmArgs& a, int64_t cb0, int64_t cb1) {
  switch (a.np) {
    case 1: return gemv_cols<1>(a, cb0, cb1);
    case 2: return gemv_cols<2>(a, cb0, cb1);
    default: return gemv_cols<3>(a, cb0, cb1);
  }
}

int gemv_cols_avx512_i8(const GemmArgs& a, int64_t cb0, int64_t cb1) {
  switch (a.nq) {   // 2 (bf16 x) or 3 (fp16, fp32), set by the driver
    case 2: return gemv_cols_i8<2>(a, cb0, cb1);
    default: return gemv_cols_i8<3>(a, cb0, cb1);
  }
}

// x [K] in logical order -> nq int8 pieces per group of G (see "int8 pieces" above): xq
// [nq][K], steps d [nq][K/G], piece sums h [nq][K/G], xsum [K/G] = sum of the pieces' values.
// Returns 0; 1 when a group's largest |x| is nonzero but below 2^-96, 2 when x holds a NaN or
// Inf or a group's sum overflows fp32: the caller then falls back to the bf16-piece GEMV (the
// check lives here so that the driver needs no separate pass over x: see gemm.cpp).
int quantize_x_i8_avx512(const float* x, int64_t K, int64_t G, int nq, int8_t* xq, float* d,
                         int32_t* h, float* xsum) {
  const int64_t ng = K / G;
  for (int64_t g = 0; g < ng; ++g) {
    const float* xg = x + g * G;
    __m512 mx = _mm512_setzero_ps();
    __mmask16 nonfinite = 0;
    for (int64_t k = 0; k < G; k += 16) {
      const __m512 v = _mm512_abs_ps(_mm512_loadu_ps(xg + k));
      // "not less than Inf, or unordered": Inf and NaN (a max would drop a NaN)
      nonfinite |= _mm512_cmp_ps_mask(v, _mm512_set1_ps(__builtin_inff()), _CMP_NLT_UQ);
      mx = _mm512_max_ps(mx, v);
    }
    if (nonfinite) return 2;
    const float m = _mm512_reduce_max_ps(mx);
    if (m != 0.f && m < 0x1p-96f) return 1;
    float dq[3], inv[3];
    for (int q = 0; q < nq; ++q) {
      dq[q] = q == 0 ? m / 127.f : dq[q - 1] / 254.f;
      inv[q] = m == 0.f ? 0.f : 1.f / dq[q];
    }
    __m512i hs[3] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t k = 0; k < G; k += 16) {
      __m512 r = _mm512_loadu_ps(xg + k);
      for (int q = 0; q < nq; ++q) {
        // round to nearest (even) in the default MXCSR mode; the clamp catches a remainder
        // that rounded just past 127 (what it loses stays in the next piece's remainder)
        __m512i hq = _mm512_cvtps_epi32(_mm512_mul_ps(r, _mm512_set1_ps(inv[q])));
        hq = _mm512_max_epi32(_mm512_min_epi32(hq, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
        _mm_storeu_si128((__m128i*)(xq + q * K + g * G + k), _mm512_cvtepi32_epi8(hq));
        hs[q] = _mm512_add_epi32(hs[q], hq);
        r = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(hq), _mm512_set1_ps(dq[q]), r);
      }
    }
    double sum = 0.0;
    for (int q = 0; q < nq; ++q) {
      h[q * ng + g] = _mm512_reduce_add_epi32(hs[q]);
      d[q * ng + g] = dq[q];
      sum += (double)dq[q] * (double)h[q * ng + g];
    }
    xsum[g] = (float)sum;
    if (!(xsum[g] - xsum[g] == 0.f)) return 2;   // the sum overflowed fp32
  }
  return 0;
}

// bf16 activations only (a.np == 1): the driver keeps fp32/fp16 GEMMs on the AVX2 kernel.
int gemm_cols_avx512(const GemmArgs& a, int64_t cb0, int64_t cb1) { return gemm_cols<1>(a, cb0, cb1); }

// Splits fp32 x [K] into np bf16 pieces whose sum is exactly x (see the top): piece i is the
// bf16 truncation of what the previous pieces left. Non-finite x: the first piece carries it
// (Inf stays Inf, NaN stays NaN), the others are 0, so no Inf - Inf NaN appears.
void split_bf16_avx512(const float* x, int64_t K, int np, uint16_t* out) {
  const __m512i hi_mask = _mm512_set1_epi32((int)0xFFFF0000u);
  int64_t k = 0;
  for (; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
    __m512 r = _mm512_maskz_loadu_ps(m, x + k);
    const __mmask16 fin = _mm512_cmp_ps_mask(_mm512_abs_ps(r), _mm512_set1_ps(__builtin_inff()), _CMP_LT_OQ);
    const __mmask16 nan = _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
    for (int i = 0; i < np; ++i) {
      __m512i bits = _mm512_and_si512(_mm512_castps_si512(r), hi_mask);
      // a NaN whose payload sits in the low 16 bits must not truncate to Inf: set the quiet bit
      if (i == 0) bits = _mm512_mask_or_epi32(bits, nan, bits, _mm512_set1_epi32(0x00400000));
      _mm256_mask_storeu_epi16(out + i * K + k, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
      r = _mm512_maskz_sub_ps(fin, r, _mm512_castsi512_ps(bits));
    }
  }
}

}  // namespace tasa
#pragma GCC pop_options
