// Shared between the GEMM driver (gemm.cpp) and its ISA-specific column-block kernels.
#pragma once
#include <stdint.h>

#include <utility>

namespace tasa {
// f(std::integral_constant<int, I>{}) for every I of the sequence: loops whose index must be a
// compile-time constant (intrinsics' immediates, template arguments), unrolled.
template <class F, int... I>
inline __attribute__((always_inline)) void static_for(std::integer_sequence<int, I...>, F&& f) {
  (f(std::integral_constant<int, I>{}), ...);
}
}  // namespace tasa

namespace tasa {

struct GemmArgs {
  const float* xl;        // [M, K] fp32 activations in logical row order (perm applied)
  const float* xsum;      // [M, n_groups] sum of xl over each logical group
  const float* xs[4];     // AVX2 GEMV, bits 2/3/4/8: xl * 2^-(32-b) (it reads codes left-aligned)
  const uint16_t* xp[3];  // AVX-512: xl as np bf16 pieces [np][M][K] summing exactly to xl
  int np;
  // AVX-512 VNNI GEMV: xl as nq int8 pieces per logical group (nq = 0: that path is off)
  const int8_t* xq;       // [nq][K]
  const float* xqd;       // [nq][n_groups] step of each piece
  const int32_t* xqh;     // [nq][n_groups] sum of each piece over the group
  const float* xqsum;     // [n_groups] sum over the group of x_hat = sum_q xqd * xq
  int nq;
  int64_t M, N, K, G, R, n_groups;
  const uint32_t* qweight;
  const uint16_t* scales;
  const uint16_t* zeros;  // NULL: symmetric
  const int32_t* gtable;
  void* y;
  int ydt;
};

// Each computes the output columns of column blocks [cb0, cb1) for all M rows and returns
// nonzero if a scale or zero it read was NaN/Inf.
int gemm_cols_scalar(const GemmArgs& a, int64_t cb0, int64_t cb1);
int gemv_cols_avx2(const GemmArgs& a, int64_t cb0, int64_t cb1);
int gemm_cols_avx2(const GemmArgs& a, int64_t cb0, int64_t cb1);
// 2 <= M <= tasa_cpu_gemv_rows() (<= TASA_GEMV_ROWS_MAX): the GEMV's decode shared by chunks
// of up to 4 rows (gemm_avx2.cpp)
int gemv_rows_cols_avx2(const GemmArgs& a, int64_t cb0, int64_t cb1);
int gemv_cols_avx512(const GemmArgs& a, int64_t cb0, int64_t cb1);
int gemm_cols_avx512(const GemmArgs& a, int64_t cb0, int64_t cb1);   // bf16 x (np == 1) only
int gemv_cols_avx512_i8(const GemmArgs& a, int64_t cb0, int64_t cb1);  // M == 1, a.nq > 0
// 1 < M on the AMX tile unit: x pieces [np][Mpad][K] with Mpad = M rounded up to 16 (zero rows)
int gemm_cols_amx(const GemmArgs& a, int64_t cb0, int64_t cb1);
// x [K] (logical order) -> nq int8 pieces per group; 1 = a group too small to split,
// 2 = non-finite x or group sum (0: done).
int quantize_x_i8_avx512(const float* x, int64_t K, int64_t G, int nq, int8_t* xq, float* d,
                         int32_t* h, float* xsum);
// x [K] -> np bf16 pieces out [np][K] with sum exactly x (np = 3 suffices for any fp32 x).
void split_bf16_avx512(const float* x, int64_t K, int np, uint16_t* out);

// Writes 16 fp32 results of row m, columns [n0, n0+16) (clipped to N) into y of dtype ydt.
void store_block(const GemmArgs& a, int64_t m, int64_t n0, const float* v16);

}  // namespace tasa

namespace tasa {
// W^T tile of stored group j, column blocks [cb0, cb1): rows lg*G .. lg*G+G-1 of out (leading
// dimension ldw, column 0 = column cb0*16), fp32 (odt TASA_F32) or bf16; nonzero if a scale or
// zero it read was NaN/Inf (dequant_t.cpp: the scalar twin; gemm_avx512.cpp-style ISA file).
int dequant_t_scalar(const uint32_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                     const int32_t* gtable, int64_t N, int64_t group_size, int64_t R, int64_t j,
                     int64_t cb0, int64_t cb1, void* out, int64_t ldw, int odt);
int dequant_t_avx512(const uint32_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                     const int32_t* gtable, int64_t N, int64_t group_size, int64_t R, int64_t j,
                     int64_t cb0, int64_t cb1, void* out, int64_t ldw, int odt);
}  // namespace tasa
