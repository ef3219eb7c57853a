// AVX-512 body of tasa_dequant_t_cpu (dequant_t.cpp): one zmm lane per output column, one
// packed row of a 16-column block per zmm, every code extracted with constant shifts (the
// tile's 32 rows unrolled at compile time per width), fma(q, s, -(z*s)) (exact value rounded
// once, see dequant_t.cpp) and one 64-byte (fp32) or 32-byte (bf16) store per row of W^T.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <utility>

#include "gemm_internal.h"
#include "tasa/kernels.h"

namespace tasa {
namespace {


// Code of tile row I (0..31) of every column: bits [B*I, B*I + B) of the tile's B words.
template <int B, int I>
inline __attribute__((always_inline)) __m512i code(const __m512i* w) {
  constexpr int p = B * I, wi = p >> 5, s = p & 31;
  __m512i v = s ? _mm512_srli_epi32(w[wi], s) : w[wi];
  if constexpr (s + B > 32) v = _mm512_or_si512(v, _mm512_slli_epi32(w[wi + 1], 32 - s));
  if constexpr (s + B == 32) return v;   // the word's top field: nothing above it
  return _mm512_and_si512(v, _mm512_set1_epi32((1 << B) - 1));
}

template <int B>
int run(const uint32_t* qweight, const uint16_t* scales, const uint16_t* zeros, int64_t N,
        int64_t G, int64_t R, int64_t off, int64_t lg, int64_t j, int64_t cb0, int64_t cb1,
        void* out, int64_t ldw, bool bf16) {
  const int64_t tiles = G / 32;
  __mmask16 badm = 0;
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    const int64_t n0 = cb * 16, cnt = N - n0 < 16 ? N - n0 : 16;
    const __mmask16 m = (__mmask16)((1u << cnt) - 1u);
    const __m256i sh = _mm256_maskz_loadu_epi16(m, scales + j * N + n0);
    const __m256i zh = zeros ? _mm256_maskz_loadu_epi16(m, zeros + j * N + n0) : _mm256_setzero_si256();
    // fp16 NaN/Inf: exponent bits all ones
    const __m256i e = _mm256_set1_epi16(0x7C00);
    badm |= _mm256_mask_cmpeq_epi16_mask(m, _mm256_and_si256(sh, e), e) |
            _mm256_mask_cmpeq_epi16_mask(m, _mm256_and_si256(zh, e), e);
    const __m512 s = _mm512_cvtph_ps(sh);
    const __m512 z = zeros ? _mm512_cvtph_ps(zh) : _mm512_set1_ps((float)(1 << (B - 1)));
    const __m512 nzs = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, s));   // exact
    const uint32_t* blk = qweight + (cb * R + off) * 16;
    const int64_t col = (cb - cb0) * 16;
    for (int64_t t = 0; t < tiles; ++t) {
      __m512i w[B];
      for (int k = 0; k < B; ++k) w[k] = _mm512_loadu_si512((const void*)(blk + (t * B + k) * 16));
      const int64_t r0 = lg * G + t * 32;
      static_for(std::make_integer_sequence<int, 32>{}, [&](auto I) {
        const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(code<B, I.value>(w)), s, nzs);
        const int64_t at = (r0 + I.value) * ldw + col;
        if (bf16)
          _mm256_mask_storeu_epi16((uint16_t*)out + at, m, (__m256i)_mm512_cvtneps_pbh(v));
        else
          _mm512_mask_storeu_ps((float*)out + at, m, v);
      });
    }
  }
  return badm != 0;
}

}  // namespace

int dequant_t_avx512(const uint32_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                     const int32_t* gtable, int64_t N, int64_t group_size, int64_t R, int64_t j,
                     int64_t cb0, int64_t cb1, void* out, int64_t ldw, int odt) {
  const int b = gtable[j * 3 + 0];
  const int64_t off = gtable[j * 3 + 1], lg = gtable[j * 3 + 2];
  const bool bf16 = odt == TASA_BF16;
  switch (b) {
    case 2: return run<2>(qweight, scales, zeros, N, group_size, R, off, lg, j, cb0, cb1, out, ldw, bf16);
    case 3: return run<3>(qweight, scales, zeros, N, group_size, R, off, lg, j, cb0, cb1, out, ldw, bf16);
    case 4: return run<4>(qweight, scales, zeros, N, group_size, R, off, lg, j, cb0, cb1, out, ldw, bf16);
    default: return run<8>(qweight, scales, zeros, N, group_size, R, off, lg, j, cb0, cb1, out, ldw, bf16);
  }
}

}  // namespace tasa
#pragma GCC pop_options
