// Group parameters by a clipping search (tasa.quant.mse.mse_params): for each row of W [R, G]
// the scale / zero point among the ranges p * [lo, hi] (p in shrink) that minimise
// sum_k weight_k (w_k - q(w_k))^2, q the round-to-nearest of W with those parameters.
//
// Why a kernel: the torch version runs ~12 tensor ops per candidate (21 candidates per group):
// in gptq-mse on a 576 x 1536 matrix it took 1.40 s of 1.75 s (cProfile, AMD EPYC, busy
// machine), the ops' dispatch and memory passes over [rows, G] temporaries, while per row the
// search is 21 x G multiply-adds that stay in registers. A first scalar version of this file
// was 0.5-0.6x torch's speed on whole-matrix rtn-mse (AMD EPYC, benchmarks/bench_quantizers.py:
// a libm nearbyintf call and a division per element, no SIMD, against torch's AVX-512 loops);
// hence the candidates' parameters in O(1) and the AVX2 error loop below.
//
// Each candidate's (scale, zero) is computed exactly as tasa.quant.rtn.rtn_params computes it
// in fp32 (fp16-representable scale, zero rounded half to even), so the parameters returned are
// always ones the torch search could return. rtn_params of W clamped to [p lo, p hi] needs no
// pass over the row: clamping is monotone, so max_k clamp(w_k) = clamp(max_k w_k) (the same for min, and
// max |clamp| is at the row's min or max), exactly, no rounding involved. The per-element
// error terms are torch's operations in torch's order (division, round half to even, clamp,
// no FMA: this file is compiled without -mfma), so each term is bit-equal; the sums run in
// double (torch sums fp32 terms pairwise): on a near-tie the two may pick different candidates
// whose errors differ by rounding only (tests/test_ops.py bounds it).
#include <immintrin.h>
#include <math.h>
#include <omp.h>

#include "tasa/kernels.h"
#include "tasa/numeric.h"

namespace {

// torch.maximum(torch.minimum(v, hi), lo), in that order (defined for lo > hi too)
inline float clampf(float v, float lo, float hi) { return fmaxf(fminf(v, hi), lo); }

// sum_k wt_k (w_k - (clamp(rint(w_k / s) + z, 0, maxq) - z) s)^2 over k in [k0, G), scalar
inline double err_tail(const float* w, const float* wt, int64_t k0, int64_t G, float s, float z,
                       float fmaxq) {
  double e = 0.0;
  for (int64_t k = k0; k < G; ++k) {
    float q = nearbyintf(w[k] / s) + z;
    q = q < 0.f ? 0.f : (q > fmaxq ? fmaxq : q);
    const float d = w[k] - (q - z) * s;
    const float d2 = d * d;
    e += wt ? (double)(d2 * wt[k]) : (double)d2;
  }
  return e;
}

#pragma GCC push_options
#pragma GCC target("avx2")     // no "fma": a contracted w - (q - z) s would round differently
__attribute__((target("avx2"))) double err_avx2(const float* w, const float* wt, int64_t G, float s,
                                                float z, float fmaxq) {
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), vmax = _mm256_set1_ps(fmaxq);
  const __m256 zero = _mm256_setzero_ps();
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  int64_t k = 0;
  for (; k + 8 <= G; k += 8) {
    const __m256 vw = _mm256_loadu_ps(w + k);
    __m256 q = _mm256_round_ps(_mm256_div_ps(vw, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, vz), zero), vmax);
    const __m256 d = _mm256_sub_ps(vw, _mm256_mul_ps(_mm256_sub_ps(q, vz), vs));
    __m256 d2 = _mm256_mul_ps(d, d);
    if (wt) d2 = _mm256_mul_ps(d2, _mm256_loadu_ps(wt + k));
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(d2)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(d2, 1)));
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, _mm256_add_pd(acc0, acc1));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + err_tail(w, wt, k, G, s, z, fmaxq);
}
#pragma GCC pop_options

}  // namespace

int tasa_mse_params_cpu(const float* W, int64_t R, int64_t G, int64_t bits, int sym,
                        const float* weight, int64_t weight_rows, const float* shrink,
                        int64_t n_shrink, float* scale, float* zero) {
  if (R < 0 || G < 1 || bits < 1 || bits > 8 || n_shrink < 1) return TASA_ERR_SHAPE;
  if (weight && weight_rows != 1 && weight_rows != R) return TASA_ERR_SHAPE;
  const float fmaxq = (float)((1 << bits) - 1);
  const float zsym = (float)(1 << (bits - 1));
  const bool avx2 = tasa_cpu_isa() >= TASA_ISA_AVX2;
#pragma omp parallel for schedule(static) if (R * G * n_shrink > (1 << 16))
  for (int64_t r = 0; r < R; ++r) {
    const float* w = W + r * G;
    const float* wt = weight ? (weight_rows == 1 ? weight : weight + r * G) : nullptr;
    float mn = w[0], mx = w[0];
    for (int64_t k = 1; k < G; ++k) {
      mn = fminf(mn, w[k]);
      mx = fmaxf(mx, w[k]);
    }
    const float a = fmaxf(fabsf(mn), fabsf(mx));           // max_k |w_k|
    const float lo = sym ? -a : fminf(mn, 0.f), hi = sym ? a : fmaxf(mx, 0.f);
    float best_s = 0.f, best_z = 0.f;
    double best_e = 0.0;
    for (int64_t c = 0; c < n_shrink; ++c) {
      const float p = shrink[c];
      const bool clip = p != 1.0f;
      const float plo = p * lo, phi = p * hi;
      // rtn_params of W clamped to [p lo, p hi]: the clamped row's extremes, in O(1)
      float s, z, clo = 0.f;
      if (sym) {
        // |.| of a monotone map peaks at one end of the row
        const float ca = clip ? fmaxf(fabsf(clampf(mn, plo, phi)), fabsf(clampf(mx, plo, phi))) : a;
        s = 2.f * ca / fmaxq;
      } else {
        const float cmn = clip ? clampf(mn, plo, phi) : mn, cmx = clip ? clampf(mx, plo, phi) : mx;
        clo = fminf(cmn, 0.f);
        s = (fmaxf(cmx, 0.f) - clo) / fmaxq;
      }
      if (!(s > 0.f)) s = 1.f;
      s = tasa::half_to_float(tasa::float_to_half(s));
      if (!(s > 0.f)) s = 5.9604644775390625e-08f;       // 2^-24: fp16 underflow
      if (sym) {
        z = zsym;
      } else {
        z = nearbyintf(-clo / s);
        z = z < 0.f ? 0.f : (z > fmaxq ? fmaxq : z);
      }
      const double e = avx2 ? err_avx2(w, wt, G, s, z, fmaxq) : err_tail(w, wt, 0, G, s, z, fmaxq);
      if (c == 0 || e < best_e) { best_e = e; best_s = s; best_z = z; }
    }
    scale[r] = best_s;
    zero[r] = best_z;
  }
  return TASA_OK;
}
