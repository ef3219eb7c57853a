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
  const float* xqd;       // [M][nq][n_groups] step of each piece (M > 1: AVX2 row-shared GEMV)
  const int32_t* xqh;     // [M][nq][n_groups] sum of each piece over the group
  const float* xqsum;     // [M][n_groups] sum over the group of x_hat = sum_q xqd * xq
  int nq;
  int64_t M, N, K, G, R, n_groups;
  const uint32_t* qweight;
  const uint16_t* scales;
  const uint16_t* zeros;  // NULL: symmetric
  const int32_t* gtable;
  void* y;
  int ydt;
  // AVX2 GEMV and row-shared GEMV (nq > 0; the latter only with nq = 2): the int8 pieces in
  // the order their 2-, 3- and 4-bit groups read them (xqr[b - 2]), [M][nq][K] each
  // (quantize_x_i8_avx2 per row); xqd, xqh, xqsum as above
  const int8_t* xqr[3];
};

// ---- Software prefetch (every ISA's GEMV) ------------------------------------------------------------------------
// Measured on the 2-core Zen 4 VM with the weights streamed from DRAM (bench_gemm.py's default):
// without it the GEMV ran at ~11 GB/s (3-bit) to ~17 GB/s (4-bit) per core, i.e. time ~ compute +
// memory with little overlap, and the 3/4-bit mix was slower than either width. Two streams miss:
//  * the packed weights: each thread reads its column blocks as one contiguous stream, but the
//    hardware prefetcher did not run far enough ahead of a compute-heavy loop. Two prefetches
//    per 64-byte row in the same stream (they cross into the next group, segment and column
//    block on their own: those are contiguous): into L2 kPrefetchL2Bytes ahead, into L1
//    kPrefetchBytes ahead. With the L1 one alone (16 KiB ahead, the first version) 3-bit
//    streamed at 75-77% of the copy bandwidth and only 1.1-1.2x faster than 4-bit; adding the
//    L2 one took every width to 95-110% (4096x4096 3-bit 202 -> 148 us, 4-bit 229 -> 200 us;
//    L1/L2 distances 2-4 / 16-32 KiB within noise of each other, 64-128 KiB a little slower;
//    no software prefetch at all: 3-bit 270 us).
//  * the scales: a column block reads one 32-byte piece of each of the n_groups scale rows, rows
//    N * 2 bytes apart -- n_groups scattered lines per block that no stream prefetcher follows
//    (the mix lost most here: ~2.6 ms -> ~2.0 ms single-thread on 14336x4096 from this alone).
//    They are prefetched (into L2) kScaleAheadBlocks column blocks ahead.
constexpr int64_t kPrefetchBytes = 4 << 10;
constexpr int64_t kPrefetchL2Bytes = 32 << 10;
constexpr int64_t kScaleAheadBlocks = 4;

inline __attribute__((always_inline)) void prefetch_ahead(const uint32_t* p) {
  __builtin_prefetch((const char*)p + kPrefetchBytes, 0, 3);      // prefetcht0
  __builtin_prefetch((const char*)p + kPrefetchL2Bytes, 0, 2);    // prefetcht1
}

// The scale (and zero) lines of column block cb + kScaleAheadBlocks, if it is still ours.
inline void prefetch_scales(const GemmArgs& a, int64_t cb, int64_t cb1) {
  const int64_t c = cb + kScaleAheadBlocks;
  if (c >= cb1) return;
  for (int64_t j = 0; j < a.n_groups; ++j) {
    __builtin_prefetch((const char*)(a.scales + j * a.N + c * 16), 0, 2);
    if (a.zeros) __builtin_prefetch((const char*)(a.zeros + j * a.N + c * 16), 0, 2);
  }
}

// The first kPrefetchL2Bytes of a thread's stream: prefetch_ahead only reaches that far ahead
// of what is being read, so without this every call started its stream on demand misses.
inline void prefetch_stream_start(const GemmArgs& a, int64_t cb0, int64_t cb1) {
  const char* p = (const char*)(a.qweight + cb0 * a.R * 16);
  const int64_t n = (cb1 - cb0) * a.R * 64;
  for (int64_t o = 0; o < kPrefetchL2Bytes && o < n; o += 64) __builtin_prefetch(p + o, 0, 2);
}

// Each computes the output columns of column blocks [cb0, cb1) for all M rows and returns
// nonzero if a scale or zero it read was NaN/Inf.
int gemm_cols_scalar(const GemmArgs& a, int64_t cb0, int64_t cb1);
int gemv_cols_avx2(const GemmArgs& a, int64_t cb0, int64_t cb1);
int gemm_cols_avx2(const GemmArgs& a, int64_t cb0, int64_t cb1);
// 2 <= M <= tasa_cpu_gemv_rows() (<= TASA_GEMV_ROWS_MAX): the GEMV's decode shared by chunks
// of up to 4 rows, or (a.nq == 2, 2- to 4-bit groups) the int8 GEMV by pairs (gemm_avx2.cpp)
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
// The same pieces on AVX2, written in the int8 GEMV's three orders (gemm_avx2.cpp).
int quantize_x_i8_avx2(const float* x, int64_t K, int64_t G, int nq, int8_t* const* xqr,
                       int need, float* d, int32_t* h, float* xsum);

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
