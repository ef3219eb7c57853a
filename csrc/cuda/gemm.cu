// CUDA fused dequant GEMV / GEMM: y [M, N] = x [M, K] . W^T with W the packed matrix.
//
// Two kernels, one launcher (tasa_gemm_cuda):
//   * gemv_kernel -- decode (M <= 8, any dtype) and the SIMT fallback (fp32 x, any M, in chunks
//     of 8 rows). Weight streaming, dequantization in registers, fp32 accumulation.
//   * mma_kernel  -- fp16 / bf16 x with M > 8: tensor cores (mma.sync m16n8k16, fp32 accum),
//     dequantization fused into the shared-memory tile load.
// Both walk the stored tiles of the whole matrix in one launch, reading (bits, offset, logical
// group) from gtable per tile: groups are sorted by bits, so all but the few warps that sit on
// a segment boundary take one uniform switch branch.
//
// gtable and perm are TRUSTED here (validated when packing / loading, and by the synchronous
// pack/unpack/dequant launchers): a data-dependent check would need a device->host sync, which
// would break CUDA-graph capture of decoding. Likewise a NaN/Inf scale is not reported (the CPU
// twin returns TASA_ERR_NONFINITE); it propagates into y.
#include "common.cuh"

namespace tasa_cuda {
namespace {

// ============================================================================================
// GEMV
// ============================================================================================
// Launch: grid (NB column blocks, ceil(M / MT)), 256 threads = 64 "quads" of 4 threads.
// Thread (quad, q4) handles the 4 columns q4*4..q4*4+3 of its column block and, for every
// stored tile tt = quad, quad + 64, ..., the tile's b packed rows: b 16-byte loads (uint4 = the
// 4 columns' words of one packed row). The 4 threads of a quad read a whole 64-byte packed row;
// the 8 quads of a warp read 8 consecutive tiles, i.e. 8*b*64 contiguous bytes (tiles of one
// column block are stored back to back), so weight loads are fully coalesced.
//
// Arithmetic per tile ("centered codes", as on the CPU): with c = 2^(b-1),
//   sum_i (q_i - z) s x_i = s * ( sum_i (q_i - c) x_i  -  (z - c) * sum_i x_i ),
// q - c is a small exact integer, and in symmetric mode z - c == 0 exactly. The per-tile partial
// sums keep the fp32 cancellation local to 32 rows.
constexpr int kGemvThreads = 256;
constexpr int kQuads = kGemvThreads / 4;

// One logical row r of the tile: gathers x[m, perm[r]] for the CTA's rows and accumulates
// (q - c) * x for the thread's 4 columns.
template <typename T, int MT>
__device__ __forceinline__ void gemv_row(const T* __restrict__ x, const int32_t* __restrict__ perm, int64_t r,
                                         int64_t K, int mrows, const float (&qc)[4], float (&part)[MT][4],
                                         float (&xs)[MT]) {
  const int64_t k = perm ? (int64_t)__ldg(perm + r) : r;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float xv = m < mrows ? to_f32(x[m * K + k]) : 0.f;
    xs[m] += xv;
#pragma unroll
    for (int c = 0; c < 4; ++c) part[m][c] = fmaf(qc[c], xv, part[m][c]);
  }
}

template <int B, typename T, int MT>
__device__ __forceinline__ void gemv_tile(const uint4* __restrict__ wsrc, const T* __restrict__ x,
                                          const int32_t* __restrict__ perm, int64_t r0, int64_t K,
                                          int mrows, const float (&s)[4], const float (&zc)[4],
                                          float (&acc)[MT][4]) {
  float part[MT][4], xs[MT], qc[4];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    xs[m] = 0.f;
#pragma unroll
    for (int c = 0; c < 4; ++c) part[m][c] = 0.f;
  }
  constexpr float cen = (float)(1 << (B - 1));
  // qweight rows are 16 words = 4 uint4 apart; component c of a uint4 is column q4*4 + c.
  if constexpr (B == 3) {
    // Codes straddle words: hold the tile's 3 words per column and unroll all 32 rows so that
    // every shift (and the two funnel shifts) is a compile-time constant.
    uint32_t w[4][3];
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const uint4 v = __ldg(wsrc + k * 4);
      w[0][k] = v.x; w[1][k] = v.y; w[2][k] = v.z; w[3][k] = v.w;
    }
#pragma unroll
    for (int i = 0; i < TASA_TILE_K; ++i) {
#pragma unroll
      for (int c = 0; c < 4; ++c) qc[c] = (float)code_at<3>(w[c], i) - cen;
      gemv_row<T, MT>(x, perm, r0 + i, K, mrows, qc, part, xs);
    }
  } else {
    // b in {2, 4, 8}: word k holds rows k*32/b .. (k+1)*32/b - 1 whole. A rolled loop over the
    // words keeps the code (and ptxas time) small; each word's rows are unrolled.
    constexpr int kPer = TASA_TILE_K / B;
#pragma unroll 1
    for (int k = 0; k < B; ++k) {
      const uint4 v = __ldg(wsrc + k * 4);
      const uint32_t wc[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int ii = 0; ii < kPer; ++ii) {
#pragma unroll
        for (int c = 0; c < 4; ++c) qc[c] = (float)((wc[c] >> (B * ii)) & ((1u << B) - 1u)) - cen;
        gemv_row<T, MT>(x, perm, r0 + k * kPer + ii, K, mrows, qc, part, xs);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[m][c] = fmaf(s[c], part[m][c] - zc[c] * xs[m], acc[m][c]);
}

template <typename T, int MT>
__global__ void __launch_bounds__(kGemvThreads)
gemv_kernel(const T* __restrict__ x, int64_t M, const uint32_t* __restrict__ qweight,
            const uint16_t* __restrict__ scales, const uint16_t* __restrict__ zeros,
            const int32_t* __restrict__ gtable, const int32_t* __restrict__ perm, int64_t N,
            int64_t K, int64_t G, int64_t R, T* __restrict__ y) {
  const int64_t cb = blockIdx.x;
  const int64_t m0 = (int64_t)blockIdx.y * MT;
  const int mrows = (int)(M - m0 < MT ? M - m0 : MT);
  const int quad = threadIdx.x >> 2, q4 = threadIdx.x & 3;
  const int64_t n0 = cb * TASA_COL_BLOCK + q4 * 4;
  const int64_t tpg = G / TASA_TILE_K, n_tiles = K / TASA_TILE_K;
  const T* xm = x + m0 * K;

  float acc[MT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[m][c] = 0.f;

  for (int64_t tt = quad; tt < n_tiles; tt += kQuads) {
    const int64_t j = tt / tpg, t = tt - j * tpg;
    const int b = __ldg(gtable + j * 3 + 0);
    const int64_t off = __ldg(gtable + j * 3 + 1), lg = __ldg(gtable + j * 3 + 2);
    const float cen = (float)(1 << (b - 1));
    float s[4], zc[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t n = n0 + c;
      // Padding columns (n >= N) hold code 0; a zero scale keeps them out of the result.
      s[c] = n < N ? half_bits_to_f32(__ldg(scales + j * N + n)) : 0.f;
      zc[c] = (n < N && zeros) ? half_bits_to_f32(__ldg(zeros + j * N + n)) - cen : 0.f;
    }
    const uint4* wsrc =
        reinterpret_cast<const uint4*>(qweight + (cb * R + off + t * b) * TASA_COL_BLOCK) + q4;
    const int64_t r0 = lg * G + t * TASA_TILE_K;
    switch (b) {
      case 2: gemv_tile<2, T, MT>(wsrc, xm, perm, r0, K, mrows, s, zc, acc); break;
      case 3: gemv_tile<3, T, MT>(wsrc, xm, perm, r0, K, mrows, s, zc, acc); break;
      case 4: gemv_tile<4, T, MT>(wsrc, xm, perm, r0, K, mrows, s, zc, acc); break;
      case 8: gemv_tile<8, T, MT>(wsrc, xm, perm, r0, K, mrows, s, zc, acc); break;
      default: break;
    }
  }

  // Reduce over the 64 quads: first the 8 quads of a warp (lanes with equal lane % 4), then
  // the 8 warps through shared memory.
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      float v = acc[m][c];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      acc[m][c] = v;
    }
  constexpr int kWarps = kGemvThreads / 32;
  __shared__ float red[kWarps][MT][TASA_COL_BLOCK];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane < 4) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int c = 0; c < 4; ++c) red[warp][m][lane * 4 + c] = acc[m][c];
  }
  __syncthreads();
  if (threadIdx.x < MT * TASA_COL_BLOCK) {
    const int m = threadIdx.x / TASA_COL_BLOCK, col = threadIdx.x % TASA_COL_BLOCK;
    const int64_t n = cb * TASA_COL_BLOCK + col;
    if (m < mrows && n < N) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v += red[w][m][col];
      y[(m0 + m) * N + n] = from_f32<T>(v);
    }
  }
}

template <typename T, int MT>
int launch_gemv(const void* x, int64_t M, const uint32_t* qweight, const uint16_t* scales,
                const uint16_t* zeros, const int32_t* gtable, const int32_t* perm, int64_t N,
                int64_t K, int64_t G, int64_t R, void* y, cudaStream_t st) {
  const dim3 grid((unsigned)tasa_num_col_blocks(N), (unsigned)((M + MT - 1) / MT));
  gemv_kernel<T, MT><<<grid, kGemvThreads, 0, st>>>((const T*)x, M, qweight, scales, zeros, gtable,
                                                    perm, N, K, G, R, (T*)y);
  return launch_status();
}

template <typename T>
int dispatch_gemv(const void* x, int64_t M, const uint32_t* qweight, const uint16_t* scales,
                  const uint16_t* zeros, const int32_t* gtable, const int32_t* perm, int64_t N,
                  int64_t K, int64_t G, int64_t R, void* y, cudaStream_t st) {
  // Rows per CTA: the smallest of 1/4/8 that holds M (larger M: chunks of 8 rows, each
  // re-streaming the weights -- the SIMT fallback for fp32 activations). No MT = 2: the kernel
  // is bound by weight streaming, so two masked rows cost little, while each instantiation
  // adds compile time (and MT = 2 spilled a few registers on sm_80).
  if (M == 1) return launch_gemv<T, 1>(x, M, qweight, scales, zeros, gtable, perm, N, K, G, R, y, st);
  if (M <= 4) return launch_gemv<T, 4>(x, M, qweight, scales, zeros, gtable, perm, N, K, G, R, y, st);
  return launch_gemv<T, 8>(x, M, qweight, scales, zeros, gtable, perm, N, K, G, R, y, st);
}

// ============================================================================================
// Tensor-core GEMM (fp16 / bf16 activations)
// ============================================================================================
// CTA tile 64 (M) x 64 (N = 4 column blocks) x 32 (K = one stored tile); 128 threads = 4 warps
// in a 2 x 2 layout, each warp owning a 32 x 32 output = 2 (m16) x 4 (n8) mma tiles.
// Per stored tile:
//   A: x[m, perm[r]] for the tile's 32 logical rows r, copied as 16-bit values into As[m][k];
//   B: each thread dequantizes 16 rows of one column, w = (q - z) * s in fp32 rounded once to
//      the activation type, into Bs[n][k] (k contiguous = the "col" operand of mma .row.col).
// Rows of As/Bs are padded to 40 halves (80 bytes = 20 words): the 8 row addresses a fragment
// load touches then fall into distinct bank quads (20*g mod 32 distinct for g = 0..7).
// Correctness first: no multi-stage pipeline yet; the two __syncthreads per tile bound
// throughput, and a cp.async / register double buffer is the next step.
constexpr int kBM = 64, kBN = 64, kBK = TASA_TILE_K, kLds = kBK + 8, kMmaThreads = 128;

template <typename T> struct MmaOp;
template <> struct MmaOp<__half> {
  static __device__ __forceinline__ uint16_t bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ uint16_t bits(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Dequantizes tile rows I0..I0+15 of one column (words 16 apart) into dst[0..16).
template <typename T, int B, int I0>
__device__ __forceinline__ void dequant_half_tile(const uint32_t* __restrict__ in, float s, float z,
                                                  uint16_t* dst) {
  uint32_t w[B];
#pragma unroll
  for (int k = 0; k < B; ++k) w[k] = __ldg(in + k * TASA_COL_BLOCK);
#pragma unroll
  for (int i = 0; i < 16; ++i) dst[i] = MmaOp<T>::bits(((float)code_at<B>(w, I0 + i) - z) * s);
}

template <typename T, int B>
__device__ __forceinline__ void dequant_col(const uint32_t* in, int h, float s, float z, uint16_t* dst) {
  // h picks the tile half; two instantiations keep every code index a compile-time constant.
  if (h == 0) dequant_half_tile<T, B, 0>(in, s, z, dst);
  else dequant_half_tile<T, B, 16>(in, s, z, dst);
}

template <typename T>
__global__ void __launch_bounds__(kMmaThreads)
mma_kernel(const T* __restrict__ x, int64_t M, const uint32_t* __restrict__ qweight,
           const uint16_t* __restrict__ scales, const uint16_t* __restrict__ zeros,
           const int32_t* __restrict__ gtable, const int32_t* __restrict__ perm, int64_t N,
           int64_t K, int64_t G, int64_t R, T* __restrict__ y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(16) uint16_t As[kBM * kLds];
  __shared__ __align__(16) uint16_t Bs[kBN * kLds];
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tg = lane & 3;            // mma fragment coordinates
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int64_t m_base = (int64_t)blockIdx.y * kBM, n_base = (int64_t)blockIdx.x * kBN;
  const int64_t tpg = G / TASA_TILE_K, n_tiles = K / TASA_TILE_K;

  // B-load role of this thread: column bc of the CTA tile, tile half bh.
  const int bc = tid >> 1, bh = tid & 1;
  const int64_t bn = n_base + bc;

  float acc[2][4][4];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.f;

  for (int64_t tt = 0; tt < n_tiles; ++tt) {
    const int64_t j = tt / tpg, t = tt - j * tpg;
    const int bits = __ldg(gtable + j * 3 + 0);
    const int64_t off = __ldg(gtable + j * 3 + 1), lg = __ldg(gtable + j * 3 + 2);
    const int64_t r0 = lg * G + t * TASA_TILE_K;

    // A tile: 64 x 32 values, 16 per thread; consecutive threads walk k (coalesced w/o perm).
#pragma unroll
    for (int u = 0; u < kBM * kBK / kMmaThreads; ++u) {
      const int e = tid + u * kMmaThreads, mm = e / kBK, i = e % kBK;
      const int64_t m = m_base + mm, r = r0 + i;
      const int64_t k = perm ? (int64_t)__ldg(perm + r) : r;
      As[mm * kLds + i] = m < M ? xb[m * K + k] : (uint16_t)0;
    }
    // B tile: 64 columns x 32 rows; padding / out-of-range columns are zero.
    uint16_t* dst = Bs + bc * kLds + bh * 16;
    if (bn < N) {
      const float s = half_bits_to_f32(__ldg(scales + j * N + bn));
      const float z = zeros ? half_bits_to_f32(__ldg(zeros + j * N + bn)) : (float)(1 << (bits - 1));
      const uint32_t* in = qweight + ((bn / TASA_COL_BLOCK) * R + off + t * bits) * TASA_COL_BLOCK +
                           bn % TASA_COL_BLOCK;
      switch (bits) {
        case 2: dequant_col<T, 2>(in, bh, s, z, dst); break;
        case 3: dequant_col<T, 3>(in, bh, s, z, dst); break;
        case 4: dequant_col<T, 4>(in, bh, s, z, dst); break;
        case 8: dequant_col<T, 8>(in, bh, s, z, dst); break;
        default: break;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) dst[i] = 0;
    }
    __syncthreads();

#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t af[2][4];
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        const uint16_t* p = As + (wm + a * 16 + g) * kLds + ks + 2 * tg;
        af[a][0] = *reinterpret_cast<const uint32_t*>(p);                 // row g,   k 2tg..
        af[a][1] = *reinterpret_cast<const uint32_t*>(p + 8 * kLds);      // row g+8, k 2tg..
        af[a][2] = *reinterpret_cast<const uint32_t*>(p + 8);             // row g,   k 2tg+8..
        af[a][3] = *reinterpret_cast<const uint32_t*>(p + 8 * kLds + 8);  // row g+8, k 2tg+8..
      }
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint16_t* p = Bs + (wn + b * 8 + g) * kLds + ks + 2 * tg;
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(p);       // k 2tg..,   n g
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(p + 8);   // k 2tg+8.., n g
#pragma unroll
        for (int a = 0; a < 2; ++a) MmaOp<T>::mma(acc[a][b], af[a], b0, b1);
      }
    }
    __syncthreads();
  }

  // Accumulator layout (m16n8 f32): e0,e1 -> row g, cols 2tg, 2tg+1; e2,e3 -> row g+8.
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = m_base + wm + a * 16 + g + (e >> 1) * 8;
        const int64_t n = n_base + wn + b * 8 + 2 * tg + (e & 1);
        if (m < M && n < N) y[m * N + n] = from_f32<T>(acc[a][b][e]);
      }
#else
  __trap();   // built only for sm_80+ (csrc/cuda/archs.txt)
#endif
}

template <typename T>
int launch_mma(const void* x, int64_t M, const uint32_t* qweight, const uint16_t* scales,
               const uint16_t* zeros, const int32_t* gtable, const int32_t* perm, int64_t N,
               int64_t K, int64_t G, int64_t R, void* y, cudaStream_t st) {
  const dim3 grid((unsigned)((N + kBN - 1) / kBN), (unsigned)((M + kBM - 1) / kBM));
  mma_kernel<T><<<grid, kMmaThreads, 0, st>>>((const T*)x, M, qweight, scales, zeros, gtable, perm, N,
                                               K, G, R, (T*)y);
  return launch_status();
}

}  // namespace
}  // namespace tasa_cuda

using namespace tasa_cuda;

int tasa_gemm_cuda(const void* x, int xdt, int64_t M, const uint32_t* qweight,
                   const uint16_t* scales, const uint16_t* zeros, const int32_t* gtable,
                   const int32_t* perm, int64_t N, int64_t K, int64_t group_size, int64_t R,
                   void* y, void* stream) {
  cudaStream_t st = (cudaStream_t)stream;
  if (group_size <= 0 || group_size % TASA_TILE_K != 0 || K % group_size != 0) return TASA_ERR_GROUP_SIZE;
  if (xdt != TASA_F32 && xdt != TASA_BF16 && xdt != TASA_F16) return TASA_ERR_SHAPE;
  if (N <= 0 || M < 0 || R < 0) return TASA_ERR_SHAPE;
  // The GEMV reads qweight with 16-byte vector loads.
  if (reinterpret_cast<uintptr_t>(qweight) % 16 != 0) return TASA_ERR_SHAPE;
  if (M == 0) return TASA_OK;
  if (K == 0) {   // empty reduction: y = 0
    const size_t esz = xdt == TASA_F32 ? 4 : 2;
    return cudaMemsetAsync(y, 0, esz * M * N, st) == cudaSuccess ? TASA_OK : TASA_ERR_CUDA;
  }
  // Grid y is limited to 65535 CTAs.
  if ((M + kBM - 1) / kBM > 65535 || (M + 7) / 8 > 65535 || tasa_num_col_blocks(N) > 0x7fffffff)
    return TASA_ERR_SHAPE;
  const bool tensor_cores = M > 8;
  switch (xdt) {
    case TASA_F16:
      return tensor_cores ? launch_mma<__half>(x, M, qweight, scales, zeros, gtable, perm, N, K, group_size, R, y, st)
                          : dispatch_gemv<__half>(x, M, qweight, scales, zeros, gtable, perm, N, K, group_size, R, y, st);
    case TASA_BF16:
      return tensor_cores
                 ? launch_mma<__nv_bfloat16>(x, M, qweight, scales, zeros, gtable, perm, N, K, group_size, R, y, st)
                 : dispatch_gemv<__nv_bfloat16>(x, M, qweight, scales, zeros, gtable, perm, N, K, group_size, R, y, st);
    default:
      return dispatch_gemv<float>(x, M, qweight, scales, zeros, gtable, perm, N, K, group_size, R, y, st);
  }
}
