// Torch-free unit tests of the CPU kernels (built and run by CMake/ctest): pack/unpack round trip
// for every width, and the fused GEMM on every ISA path (scalar, AVX2, AVX-512 where the CPU
// has them) and activation dtype against a float64 dot product of the dequantized weights, on
// odd sizes; GPTQ's column loop against its formula written out, bit for bit; the clipping
// search against a brute-force search over explicitly clamped rows; the incoherence rotation
// against the block matrix of format.h written out (float64), forward and inverse.
#include <string.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <random>
#include <utility>
#include <vector>

#include "tasa/kernels.h"
#include "tasa/numeric.h"

static int failures = 0;
#define EXPECT(cond, ...)                 \
  do {                                    \
    if (!(cond)) {                        \
      ++failures;                         \
      printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      printf(__VA_ARGS__);                \
      printf("\n");                       \
    }                                     \
  } while (0)

static void run_case(int64_t N, int64_t K, int64_t G, const std::vector<int32_t>& pattern, bool asym,
                     bool perm_on, int64_t M, std::mt19937& rng) {
  const int64_t ng = K / G;
  std::vector<int32_t> bits(ng);
  for (int64_t g = 0; g < ng; ++g) bits[g] = pattern[g % pattern.size()];
  std::vector<uint8_t> codes(N * K);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) codes[n * K + k] = rng() % (1u << bits[k / G]);
  std::vector<int32_t> gtable(ng * 3);
  int64_t R = 0;
  EXPECT(tasa_make_gtable(bits.data(), ng, G, gtable.data(), &R) == TASA_OK, "gtable");
  std::vector<uint32_t> qw(tasa_num_col_blocks(N) * R * 16);
  EXPECT(tasa_pack_cpu(codes.data(), N, K, gtable.data(), G, R, qw.data()) == TASA_OK, "pack");
  std::vector<uint8_t> back(N * K);
  EXPECT(tasa_unpack_cpu(qw.data(), gtable.data(), N, K, G, R, back.data()) == TASA_OK, "unpack");
  EXPECT(back == codes, "round trip N=%ld K=%ld G=%ld", (long)N, (long)K, (long)G);

  std::uniform_real_distribution<float> us(0.002f, 0.05f), ux(-1.f, 1.f);
  std::vector<uint16_t> scales(ng * N), zeros(ng * N);
  for (int64_t j = 0; j < ng; ++j)
    for (int64_t n = 0; n < N; ++n) {
      scales[j * N + n] = tasa::float_to_half(us(rng));
      zeros[j * N + n] = tasa::float_to_half(ux(rng) * 2 + (1 << (gtable[j * 3] - 1)));
    }
  std::vector<int32_t> perm(K);
  for (int64_t k = 0; k < K; ++k) perm[k] = (int32_t)k;
  if (perm_on) std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<float> W(N * K), x(M * K), y(M * N);
  EXPECT(tasa_dequant_cpu(qw.data(), scales.data(), asym ? zeros.data() : nullptr, gtable.data(),
                          perm_on ? perm.data() : nullptr, N, K, G, R, W.data()) == TASA_OK, "dequant");
  // embed: rows of W for ids (repeated, both ends), bit-identical to dequant; a bad id refused
  {
    const std::vector<int64_t> ids = {N - 1, 0, N / 2, 0};
    std::vector<float> rows(ids.size() * K, -1.f);
    EXPECT(tasa_embed_cpu(ids.data(), (int64_t)ids.size(), qw.data(), scales.data(),
                          asym ? zeros.data() : nullptr, gtable.data(), perm_on ? perm.data() : nullptr,
                          N, K, G, R, rows.data()) == TASA_OK, "embed");
    for (size_t i = 0; i < ids.size(); ++i)
      EXPECT(memcmp(&rows[i * K], &W[ids[i] * K], sizeof(float) * K) == 0, "embed row %ld", (long)ids[i]);
    const int64_t bad[2] = {0, N};
    EXPECT(tasa_embed_cpu(bad, 2, qw.data(), scales.data(), asym ? zeros.data() : nullptr, gtable.data(),
                          nullptr, N, K, G, R, rows.data()) == TASA_ERR_INDEX, "embed id N");
  }
  // dequant_t (the prefill path's W^T, logical rows, no perm): fp32 equal to dequant's values
  // bit for bit, bf16 their round-to-nearest-even; in two column ranges (a ragged tail) on every
  // ISA; bad arguments refused
  {
    const int64_t NB = tasa_num_col_blocks(N), half = NB / 2, ldw = NB * 16 + 3;
    std::vector<float> Wt(K * ldw, -7.f);
    std::vector<uint16_t> Wtb(K * ldw, 0xFFFF);
    for (int isa = 0; isa <= tasa_cpu_isa_detected(); ++isa) {
      tasa_cpu_set_isa(isa);
      for (auto r : {std::pair<int64_t, int64_t>{0, half}, {half, NB}}) {
        const int64_t off = r.first * 16;
        EXPECT(tasa_dequant_t_cpu(qw.data(), scales.data(), asym ? zeros.data() : nullptr, gtable.data(),
                                  N, K, G, R, r.first, r.second, Wt.data() + off, ldw, TASA_F32) == TASA_OK,
               "dequant_t f32");
        EXPECT(tasa_dequant_t_cpu(qw.data(), scales.data(), asym ? zeros.data() : nullptr, gtable.data(),
                                  N, K, G, R, r.first, r.second, Wtb.data() + off, ldw, TASA_BF16) == TASA_OK,
               "dequant_t bf16");
      }
      int wrong = 0;
      for (int64_t rr = 0; rr < K; ++rr)
        for (int64_t n = 0; n < N; ++n) {
          const float w = W[n * K + perm[rr]];           // logical row rr is channel perm[rr]
          wrong += memcmp(&Wt[rr * ldw + n], &w, 4) != 0;
          wrong += Wtb[rr * ldw + n] != tasa::float_to_bf16(w);
        }
      EXPECT(wrong == 0, "dequant_t isa=%d N=%ld K=%ld G=%ld: %d values differ", isa, (long)N, (long)K,
             (long)G, wrong);
    }
    tasa_cpu_set_isa(-1);
    EXPECT(tasa_dequant_t_cpu(qw.data(), scales.data(), nullptr, gtable.data(), N, K, G, R, 0, NB + 1,
                              Wt.data(), ldw, TASA_F32) == TASA_ERR_SHAPE, "dequant_t cb1 > blocks");
    EXPECT(tasa_dequant_t_cpu(qw.data(), scales.data(), nullptr, gtable.data(), N, K, G, R, 0, NB,
                              Wt.data(), 15, TASA_F32) == TASA_ERR_SHAPE, "dequant_t ldw too small");
    EXPECT(tasa_dequant_t_cpu(qw.data(), scales.data(), nullptr, gtable.data(), N, K, G, R, 0, NB,
                              Wt.data(), ldw, TASA_F16) == TASA_ERR_SHAPE, "dequant_t fp16 out");
    std::vector<uint16_t> sbad(scales);
    sbad[(ng - 1) * N + N - 1] = 0x7C00;                // +Inf in the last column's last group
    EXPECT(tasa_dequant_t_cpu(qw.data(), sbad.data(), nullptr, gtable.data(), N, K, G, R, 0, NB,
                              Wt.data(), ldw, TASA_F32) == TASA_ERR_NONFINITE, "dequant_t Inf scale");
  }
  for (auto& v : x) v = ux(rng);
  // x and y in each activation dtype; the reference reads the same (rounded) x and allows the
  // rounding of y to that dtype on top of fp32-level accumulation error.
  std::vector<uint16_t> x16(M * K), y16(M * N);
  for (int xdt : {TASA_F32, TASA_BF16, TASA_F16}) {
    std::vector<float> xr(x);
    for (int64_t i = 0; i < M * K; ++i)
      if (xdt != TASA_F32) {
        x16[i] = xdt == TASA_BF16 ? tasa::float_to_bf16(x[i]) : tasa::float_to_half(x[i]);
        xr[i] = xdt == TASA_BF16 ? tasa::bf16_to_float(x16[i]) : tasa::half_to_float(x16[i]);
      }
    const double out_ulp = xdt == TASA_F32 ? 0.0 : xdt == TASA_BF16 ? 1.0 / 256 : 1.0 / 1024;
    for (int isa = 0; isa <= tasa_cpu_isa_detected(); ++isa) {
      tasa_cpu_set_isa(isa);
      const void* xp = xdt == TASA_F32 ? (const void*)x.data() : (const void*)x16.data();
      void* yp = xdt == TASA_F32 ? (void*)y.data() : (void*)y16.data();
      EXPECT(tasa_gemm_cpu(xp, xdt, M, qw.data(), scales.data(), asym ? zeros.data() : nullptr,
                           gtable.data(), perm_on ? perm.data() : nullptr, N, K, G, R, yp) == TASA_OK,
             "gemm");
      // The VNNI GEMV and the AVX2 one (its 2/3/4-bit groups) read x as nq int8 pieces per
      // logical group: |x - x_hat| <= max|x_g| * 254^-nq (gemm_avx512.cpp, gemm_avx2.cpp), so
      // each output may also move by sum_k |W_nk| * that bound; so does the AVX2 row-shared GEMV
      // (2 <= M <= gemv_rows) where x comes in 2 pieces: bf16 x here (fp32 takes 3 by default).
      std::vector<double> xerr(K, 0.0);
      const bool rows_i8 = isa == TASA_ISA_AVX2 && xdt == TASA_BF16 && M > 1 &&
                           M <= tasa_cpu_gemv_rows();
      if (((isa >= TASA_ISA_AVX512_VNNI || isa == TASA_ISA_AVX2) && M == 1) || rows_i8) {
        const int nq = xdt == TASA_BF16 ? 2 : 3;
        for (int64_t g = 0; g < ng; ++g) {
          double mx = 0;
          for (int64_t r = g * G; r < (g + 1) * G; ++r) mx = fmax(mx, fabs(xr[perm[r]]));
          for (int64_t r = g * G; r < (g + 1) * G; ++r) xerr[perm[r]] = 1.01 * mx * pow(254.0, -nq);
        }
      }
      double err = 0, nrm = 0;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double ref = 0, allow = 0;
          for (int64_t k = 0; k < K; ++k) {
            ref += (double)xr[m * K + k] * W[n * K + k];
            allow += fabs((double)W[n * K + k]) * xerr[k];
          }
          const double got = xdt == TASA_F32    ? y[m * N + n]
                             : xdt == TASA_BF16 ? tasa::bf16_to_float(y16[m * N + n])
                                                : tasa::half_to_float(y16[m * N + n]);
          err = fmax(err, fabs(ref - got) - out_ulp * fabs(ref) - allow);
          nrm = fmax(nrm, fabs(ref));
        }
      EXPECT(err <= 1e-5 * nrm + 1e-6, "gemm isa=%d xdt=%d M=%ld N=%ld err=%g norm=%g", isa, xdt,
             (long)M, (long)N, err, nrm);
    }
  }
  tasa_cpu_set_isa(-1);
}


// GPTQ's column loop: the header's formula, one row at a time, serial
static void gptq_cols_ref(std::vector<float>& W, int64_t N, int64_t B, const std::vector<float>& U,
                          int64_t c0, int64_t c1, const std::vector<float>& s,
                          const std::vector<float>& z, int64_t maxq, std::vector<uint8_t>& codes,
                          std::vector<float>& err) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = c0; i < c1; ++i) {
      float c = nearbyintf(W[n * B + i] / s[n]) + z[n];
      c = std::min(std::max(c, 0.f), (float)maxq);
      const float e = (W[n * B + i] - (c - z[n]) * s[n]) / U[i * B + i];
      codes[n * B + i] = (uint8_t)c;
      err[n * B + i] = e;
      for (int64_t j = i; j < B; ++j) W[n * B + j] -= e * U[i * B + j];
    }
}

static void gptq_cols_case(int64_t N, int64_t B, int64_t c0, int64_t c1, int64_t maxq,
                           std::mt19937& rng) {
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> ud(0.5f, 1.5f);
  std::vector<float> W(N * B), U(B * B, 0.f), s(N), z(N);
  for (auto& v : W) v = nd(rng);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t j = i; j < B; ++j) U[i * B + j] = j == i ? ud(rng) : 0.3f * nd(rng);
  for (int64_t n = 0; n < N; ++n) {
    s[n] = 0.05f * ud(rng);
    z[n] = (float)((maxq + 1) / 2);
  }
  std::vector<float> W2 = W, err(N * B, -7.f), err2 = err;
  std::vector<uint8_t> q(N * B, 99), q2 = q;
  EXPECT(tasa_gptq_cols_cpu(W.data(), N, B, U.data(), c0, c1, s.data(), z.data(), maxq, q.data(),
                            err.data()) == TASA_OK, "gptq_cols status");
  gptq_cols_ref(W2, N, B, U, c0, c1, s, z, maxq, q2, err2);
  EXPECT(memcmp(W.data(), W2.data(), W.size() * 4) == 0, "gptq_cols W N=%lld B=%lld c=[%lld,%lld)",
         (long long)N, (long long)B, (long long)c0, (long long)c1);
  EXPECT(q == q2 && memcmp(err.data(), err2.data(), err.size() * 4) == 0,
         "gptq_cols codes/err N=%lld B=%lld", (long long)N, (long long)B);
  s[N / 2] = 0.f;                                      // a zero scale is refused
  EXPECT(tasa_gptq_cols_cpu(W.data(), N, B, U.data(), c0, c1, s.data(), z.data(), maxq, q.data(),
                            err.data()) == TASA_ERR_NONFINITE, "gptq_cols zero scale");
  EXPECT(tasa_gptq_cols_cpu(W.data(), N, B, U.data(), c0, B + 1, s.data(), z.data(), maxq,
                            q.data(), err.data()) == TASA_ERR_SHAPE, "gptq_cols c1 > B");
}

// the clipping search by brute force: clamp the row, rtn parameters, float64 error
static double mse_err(const float* w, const float* wt, int64_t G, float s, float z, float maxq) {
  double e = 0;
  for (int64_t k = 0; k < G; ++k) {
    float q = std::min(std::max(nearbyintf(w[k] / s) + z, 0.f), maxq);
    const float d = w[k] - (q - z) * s;
    e += wt ? (double)(d * d * wt[k]) : (double)(d * d);
  }
  return e;
}

static void mse_ref(const float* w, const float* wt, int64_t G, int bits, bool sym,
                    const std::vector<float>& shrink, float* best_s, float* best_z) {
  const float maxq = (float)((1 << bits) - 1);
  float mn = 0, mx = 0, a = 0;
  for (int64_t k = 0; k < G; ++k) {
    mn = std::min(mn, w[k]);
    mx = std::max(mx, w[k]);
    a = std::max(a, fabsf(w[k]));
  }
  double best = 0;
  for (size_t c = 0; c < shrink.size(); ++c) {
    const float p = shrink[c], lo = sym ? -p * a : p * mn, hi = sym ? p * a : p * mx;
    float cmn = INFINITY, cmx = -INFINITY, ca = 0;
    for (int64_t k = 0; k < G; ++k) {
      const float v = std::max(std::min(w[k], hi), lo);
      cmn = std::min(cmn, v);
      cmx = std::max(cmx, v);
      ca = std::max(ca, fabsf(v));
    }
    const float clo = std::min(cmn, 0.f);
    float s = sym ? 2.f * ca / maxq : (std::max(cmx, 0.f) - clo) / maxq;
    if (!(s > 0.f)) s = 1.f;
    s = tasa::half_to_float(tasa::float_to_half(s));
    if (!(s > 0.f)) s = 5.9604644775390625e-08f;
    const float z = sym ? (float)(1 << (bits - 1))
                        : std::min(std::max(nearbyintf(-clo / s), 0.f), maxq);
    const double e = mse_err(w, wt, G, s, z, maxq);
    if (c == 0 || e < best) { best = e; *best_s = s; *best_z = z; }
  }
}

static void mse_case(int64_t R, int64_t G, int bits, bool sym, int wmode, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> ud(0.f, 3.f);
  std::vector<float> W(R * G), wt(wmode == 2 ? R * G : G), s(R), z(R);
  for (auto& v : W) v = nd(rng);
  W[3] *= 30.f;                                         // an outlier worth clipping
  for (auto& v : wt) v = ud(rng);
  std::vector<float> shrink;
  for (int i = 0; i <= 20; ++i) shrink.push_back(1.f - 0.025f * i);
  const float* wp = wmode == 0 ? nullptr : wt.data();
  EXPECT(tasa_mse_params_cpu(W.data(), R, G, bits, sym, wp, wmode == 2 ? R : 1, shrink.data(),
                             (int64_t)shrink.size(), s.data(), z.data()) == TASA_OK, "mse status");
  int same = 0;
  const float maxq = (float)((1 << bits) - 1);
  for (int64_t r = 0; r < R; ++r) {
    float rs = 0, rz = 0;
    const float* wr = wmode == 2 ? wt.data() + r * G : wp;
    mse_ref(W.data() + r * G, wr, G, bits, sym, shrink, &rs, &rz);
    same += rs == s[r] && rz == z[r];
    const double e = mse_err(W.data() + r * G, wr, G, s[r], z[r], maxq);
    const double re = mse_err(W.data() + r * G, wr, G, rs, rz, maxq);
    EXPECT(e <= re * (1 + 1e-6) + 1e-12, "mse row %lld: error %g > brute force %g", (long long)r,
           e, re);
    EXPECT(s[r] > 0.f && s[r] == tasa::half_to_float(tasa::float_to_half(s[r])), "mse scale fp16");
  }
  EXPECT(same >= R * 99 / 100, "mse: %d of %lld rows as the brute force", same, (long long)R);
}

// x R (or x R^T) with R's blocks diag(s) H_b / sqrt(b) built entry by entry: H_b[i][j] =
// (-1)^popcount(i & j) is the Sylvester matrix, s from tasa_hadamard_sign.
static void hadamard_case(int64_t M, int64_t K, int64_t G, int inverse, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  std::vector<float> x(M * K), y;
  for (auto& v : x) v = nd(rng);
  y = x;
  EXPECT(tasa_hadamard_cpu(y.data(), M, K, G, inverse) == TASA_OK, "hadamard status");
  const int64_t b = tasa_hadamard_block(G);
  EXPECT(b > 0 && G % b == 0 && (b & (b - 1)) == 0 && b <= TASA_HAD_MAX_BLOCK, "block %lld",
         (long long)b);
  double worst = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K; ++j) {
      const int64_t a = j / b * b;
      double acc = 0;
      for (int64_t i = a; i < a + b; ++i) {
        const double h = (__builtin_popcountll((uint64_t)((i - a) & (j - a))) & 1) ? -1.0 : 1.0;
        // forward: R[i][j] = s_i H[i][j]; inverse: R^T[i][j] = R[j][i] = s_j H[j][i] (H symmetric)
        const double r = (inverse ? tasa_hadamard_sign(j) : tasa_hadamard_sign(i)) * h / sqrt((double)b);
        acc += (double)x[m * K + i] * r;
      }
      worst = std::max(worst, fabs(acc - (double)y[m * K + j]));
    }
  EXPECT(worst < 1e-5, "hadamard M=%lld K=%lld G=%lld inverse=%d: max error %g", (long long)M,
         (long long)K, (long long)G, inverse, worst);
}

int main() {
  std::mt19937 rng(1234);
  for (int64_t G : {32, 96, 128, 160, 256})
    for (int inverse = 0; inverse < 2; ++inverse) hadamard_case(3, G * 3, G, inverse, rng);
  {
    std::vector<float> x(100);
    EXPECT(tasa_hadamard_cpu(x.data(), 1, 100, 64, 0) == TASA_ERR_GROUP_SIZE, "hadamard K % G");
    EXPECT(tasa_hadamard_cpu(x.data(), 1, 100, 0, 0) == TASA_ERR_GROUP_SIZE, "hadamard G 0");
    int plus = 0;
    for (int64_t k = 0; k < 4096; ++k) plus += tasa_hadamard_sign(k) > 0;
    EXPECT(plus > 1843 && plus < 2253, "hadamard signs unbalanced: %d of 4096", plus);
  }
  const std::vector<std::vector<int32_t>> patterns = {{2}, {3}, {4}, {8}, {3, 4}, {8, 2, 4, 3}};
  for (auto& p : patterns)
    for (int64_t G : {32, 64, 128})
      for (int64_t M : {1, 3, 17}) {
        run_case(37, G * 4, G, p, (M & 1) == 1, M == 3, M, rng);
        if (M == 1) run_case(53, G * 6, G, p, false, true, M, rng);   // GEMV: sym + perm too
      }
  for (int64_t B : {32, 96, 128})
    for (int64_t maxq : {3, 7, 15, 255}) {
      gptq_cols_case(37, B, 0, 32, maxq, rng);
      gptq_cols_case(5, B, B - 32, B, maxq, rng);
    }
  for (int isa = TASA_ISA_SCALAR; isa <= TASA_ISA_AVX2; ++isa) {   // the mse kernel's two loops
    if (tasa_cpu_set_isa(isa) != TASA_OK) continue;
    for (int bits : {2, 3, 4, 8})
      for (int wmode = 0; wmode < 3; ++wmode) {
        mse_case(301, 96, bits, false, wmode, rng);
        mse_case(67, 37, bits, true, wmode, rng);
      }
    tasa_cpu_set_isa(-1);
  }
  {
    std::vector<float> w(64), sc(2), zr(2), sh = {1.f};
    EXPECT(tasa_mse_params_cpu(w.data(), 2, 32, 9, 0, nullptr, 0, sh.data(), 1, sc.data(),
                               zr.data()) == TASA_ERR_SHAPE, "mse bits 9");
    EXPECT(tasa_mse_params_cpu(w.data(), 2, 32, 4, 0, w.data(), 3, sh.data(), 1, sc.data(),
                               zr.data()) == TASA_ERR_SHAPE, "mse weight rows");
  }
  // invalid inputs give error codes, never UB
  std::vector<int32_t> bad_bits = {5};
  std::vector<int32_t> gt(3);
  int64_t R;
  EXPECT(tasa_make_gtable(bad_bits.data(), 1, 32, gt.data(), &R) == TASA_ERR_BITS, "bits 5");
  std::vector<int32_t> bits4 = {4};
  EXPECT(tasa_make_gtable(bits4.data(), 1, 48, gt.data(), &R) == TASA_ERR_GROUP_SIZE, "group 48");
  std::vector<uint8_t> big(16 * 32, 200);
  tasa_make_gtable(bits4.data(), 1, 32, gt.data(), &R);
  std::vector<uint32_t> qw(R * 16);
  EXPECT(tasa_pack_cpu(big.data(), 16, 32, gt.data(), 32, R, qw.data()) == TASA_ERR_CODE_RANGE, "range");
  printf("%s: %d failures\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
