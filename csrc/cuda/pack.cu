// CUDA pack / unpack / dequant: quantization-time kernels, so weights never round-trip through
// the CPU. One thread per (column, stored tile): it owns the b words of that column of one
// 32-row tile, so packing needs no atomics (a tile's words are written by exactly one thread)
// and 16 consecutive threads (the 16 lanes of a column block) touch one 64-byte packed row.
//
// Validation: these launchers are synchronous (they return a status that depends on data).
// The group table (and perm for dequant) is copied to the host and checked with the same
// format.h functions the CPU uses -- a few hundred bytes, negligible next to the weights.
// Code-range (pack) and non-finite scale/zero (dequant) errors are raised by a device flag
// read back after the kernel. The GEMM, which must stay capturable in CUDA graphs, instead
// trusts gtable (see gemm.cu).
#include <vector>

#include "common.cuh"

namespace tasa_cuda {
namespace {

constexpr int kThreads = 256;

// OR code q of tile row i into the tile's words (inverse of code_at; i compile-time).
template <int B>
__device__ __forceinline__ void put_code(uint32_t (&w)[B], int i, uint32_t q) {
  const int bit = B * i, wi = bit >> 5, sh = bit & 31;
  w[wi] |= q << sh;
  if (sh + B > 32) w[wi + 1 < B ? wi + 1 : wi] |= q >> (32 - sh);
}

// c: the tile's 32 codes (NULL for a padding column, which holds code 0); out: the first word
// of the tile in this column, successive words 16 apart.
template <int B>
__device__ __forceinline__ void pack_tile(const uint8_t* c, uint32_t* out, int* bad) {
  uint32_t w[B];
#pragma unroll
  for (int k = 0; k < B; ++k) w[k] = 0u;
  if (c != nullptr) {
    bool ok = true;
#pragma unroll
    for (int i = 0; i < TASA_TILE_K; ++i) {
      const uint32_t q = c[i];
      if (q >= (1u << B)) { ok = false; continue; }
      put_code<B>(w, i, q);
    }
    if (!ok) atomicOr(bad, 1);
  }
#pragma unroll
  for (int k = 0; k < B; ++k) out[k * TASA_COL_BLOCK] = w[k];
}

template <int B>
__device__ __forceinline__ void unpack_tile(const uint32_t* in, uint8_t* c) {
  uint32_t w[B];
#pragma unroll
  for (int k = 0; k < B; ++k) w[k] = in[k * TASA_COL_BLOCK];
#pragma unroll
  for (int i = 0; i < TASA_TILE_K; ++i) c[i] = (uint8_t)code_at<B>(w, i);
}

// Double precision, rounded once: bit-identical to the CPU twin (tasa_dequant_cpu).
template <int B>
__device__ __forceinline__ void dequant_tile(const uint32_t* in, double s, double z, int64_t r0,
                                             const int32_t* perm, float* Wn) {
  uint32_t w[B];
#pragma unroll
  for (int k = 0; k < B; ++k) w[k] = in[k * TASA_COL_BLOCK];
#pragma unroll
  for (int i = 0; i < TASA_TILE_K; ++i) {
    const int64_t r = r0 + i;
    Wn[perm ? (int64_t)perm[r] : r] = (float)(((double)code_at<B>(w, i) - z) * s);
  }
}

// Thread index -> (column block cb, stored tile tt, lane): lane fastest, so a warp covers two
// column-block rows of 64 contiguous bytes.
struct TileIdx {
  int64_t cb, tt;
  int lane;
};
__device__ __forceinline__ bool tile_index(int64_t NB, int64_t n_tiles, TileIdx* ix) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= NB * n_tiles * TASA_COL_BLOCK) return false;
  ix->lane = (int)(idx % TASA_COL_BLOCK);
  const int64_t rest = idx / TASA_COL_BLOCK;
  ix->tt = rest % n_tiles;
  ix->cb = rest / n_tiles;
  return true;
}

__global__ void pack_kernel(const uint8_t* __restrict__ codes, int64_t N, int64_t K,
                            const int32_t* __restrict__ gtable, int64_t G, int64_t R,
                            uint32_t* __restrict__ qweight, int* bad) {
  const int64_t NB = tasa_num_col_blocks(N), tpg = G / TASA_TILE_K, n_tiles = K / TASA_TILE_K;
  TileIdx ix;
  if (!tile_index(NB, n_tiles, &ix)) return;
  const int64_t j = ix.tt / tpg, t = ix.tt % tpg;
  const int b = gtable[j * 3 + 0];
  const int64_t off = gtable[j * 3 + 1], lg = gtable[j * 3 + 2];
  const int64_t n = ix.cb * TASA_COL_BLOCK + ix.lane;
  const uint8_t* c = n < N ? codes + n * K + lg * G + t * TASA_TILE_K : nullptr;
  uint32_t* out = qweight + (ix.cb * R + off + t * b) * TASA_COL_BLOCK + ix.lane;
  switch (b) {
    case 2: pack_tile<2>(c, out, bad); break;
    case 3: pack_tile<3>(c, out, bad); break;
    case 4: pack_tile<4>(c, out, bad); break;
    case 8: pack_tile<8>(c, out, bad); break;
    default: atomicOr(bad, 2); break;   // unreachable: gtable was validated on the host
  }
}

__global__ void unpack_kernel(const uint32_t* __restrict__ qweight, const int32_t* __restrict__ gtable,
                              int64_t N, int64_t K, int64_t G, int64_t R, uint8_t* __restrict__ codes) {
  const int64_t NB = tasa_num_col_blocks(N), tpg = G / TASA_TILE_K, n_tiles = K / TASA_TILE_K;
  TileIdx ix;
  if (!tile_index(NB, n_tiles, &ix)) return;
  const int64_t n = ix.cb * TASA_COL_BLOCK + ix.lane;
  if (n >= N) return;
  const int64_t j = ix.tt / tpg, t = ix.tt % tpg;
  const int b = gtable[j * 3 + 0];
  const int64_t off = gtable[j * 3 + 1], lg = gtable[j * 3 + 2];
  const uint32_t* in = qweight + (ix.cb * R + off + t * b) * TASA_COL_BLOCK + ix.lane;
  uint8_t* c = codes + n * K + lg * G + t * TASA_TILE_K;
  switch (b) {
    case 2: unpack_tile<2>(in, c); break;
    case 3: unpack_tile<3>(in, c); break;
    case 4: unpack_tile<4>(in, c); break;
    case 8: unpack_tile<8>(in, c); break;
    default: break;
  }
}

// Column n, stored tile tt of the packed matrix into Wn (the column's K outputs): the work of one
// thread of both dequant (every column) and embed (the columns the ids name).
__device__ __forceinline__ void dequant_column_tile(
    const uint32_t* __restrict__ qweight, const uint16_t* __restrict__ scales,
    const uint16_t* __restrict__ zeros, const int32_t* __restrict__ gtable,
    const int32_t* __restrict__ perm, int64_t N, int64_t G, int64_t R, int64_t n, int64_t tt,
    float* __restrict__ Wn, int* bad) {
  const int64_t tpg = G / TASA_TILE_K;
  const int64_t j = tt / tpg, t = tt % tpg;
  const int b = gtable[j * 3 + 0];
  const int64_t off = gtable[j * 3 + 1], lg = gtable[j * 3 + 2];
  const uint16_t sh = scales[j * N + n], zh = zeros ? zeros[j * N + n] : (uint16_t)0;
  if (!half_bits_finite(sh) || !half_bits_finite(zh)) { atomicOr(bad, 1); return; }
  const double s = half_bits_to_f32(sh);
  const double z = zeros ? (double)half_bits_to_f32(zh) : (double)(1 << (b - 1));
  const uint32_t* in = qweight + ((n / TASA_COL_BLOCK) * R + off + t * b) * TASA_COL_BLOCK +
                       n % TASA_COL_BLOCK;
  const int64_t r0 = lg * G + t * TASA_TILE_K;
  switch (b) {
    case 2: dequant_tile<2>(in, s, z, r0, perm, Wn); break;
    case 3: dequant_tile<3>(in, s, z, r0, perm, Wn); break;
    case 4: dequant_tile<4>(in, s, z, r0, perm, Wn); break;
    case 8: dequant_tile<8>(in, s, z, r0, perm, Wn); break;
    default: break;
  }
}

__global__ void dequant_kernel(const uint32_t* __restrict__ qweight, const uint16_t* __restrict__ scales,
                               const uint16_t* __restrict__ zeros, const int32_t* __restrict__ gtable,
                               const int32_t* __restrict__ perm, int64_t N, int64_t K, int64_t G,
                               int64_t R, float* __restrict__ W, int* bad) {
  const int64_t NB = tasa_num_col_blocks(N), n_tiles = K / TASA_TILE_K;
  TileIdx ix;
  if (!tile_index(NB, n_tiles, &ix)) return;
  const int64_t n = ix.cb * TASA_COL_BLOCK + ix.lane;
  if (n >= N) return;
  dequant_column_tile(qweight, scales, zeros, gtable, perm, N, G, R, n, ix.tt, W + n * K, bad);
}

// Embedding lookup: one thread per (id, stored tile) -- the dequant kernel's work for the
// columns the ids name. Out-of-range ids set flag bit 2 (checked on the host afterwards: the
// lookup is synchronous like dequant; a decode step's embedding is a few KB).
__global__ void embed_kernel(const int64_t* __restrict__ ids, int64_t n_ids,
                             const uint32_t* __restrict__ qweight, const uint16_t* __restrict__ scales,
                             const uint16_t* __restrict__ zeros, const int32_t* __restrict__ gtable,
                             const int32_t* __restrict__ perm, int64_t N, int64_t K, int64_t G,
                             int64_t R, float* __restrict__ out, int* bad) {
  const int64_t n_tiles = K / TASA_TILE_K;
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n_ids * n_tiles) return;
  const int64_t i = idx / n_tiles;
  const int64_t n = ids[i];
  if (n < 0 || n >= N) { atomicOr(bad, 2); return; }
  dequant_column_tile(qweight, scales, zeros, gtable, perm, N, G, R, n, idx % n_tiles, out + i * K,
                      bad);
}

// Copies gtable (and perm) to the host and validates them like the CPU kernels do.
int check_layout_device(const int32_t* gtable, const int32_t* perm, int64_t K, int64_t G, int64_t R,
                        cudaStream_t st) {
  if (G <= 0 || G % TASA_TILE_K != 0 || K % G != 0) return TASA_ERR_GROUP_SIZE;
  const int64_t n_groups = K / G;
  std::vector<int32_t> h_gt(n_groups * 3), h_perm(perm ? K : 0);
  if (cudaMemcpyAsync(h_gt.data(), gtable, sizeof(int32_t) * n_groups * 3, cudaMemcpyDeviceToHost, st) !=
      cudaSuccess)
    return TASA_ERR_CUDA;
  if (perm && cudaMemcpyAsync(h_perm.data(), perm, sizeof(int32_t) * K, cudaMemcpyDeviceToHost, st) !=
                  cudaSuccess)
    return TASA_ERR_CUDA;
  if (cudaStreamSynchronize(st) != cudaSuccess) return TASA_ERR_CUDA;
  std::vector<uint8_t> seen(n_groups > K ? n_groups : K);
  int64_t rows = 0;
  int s = tasa_check_gtable(h_gt.data(), n_groups, G, seen.data(), &rows);
  if (s != TASA_OK) return s;
  if (rows != R) return TASA_ERR_SHAPE;
  if (perm) return tasa_check_perm(h_perm.data(), K, seen.data());
  return TASA_OK;
}

// A device int flag for data-dependent errors, read back synchronously.
struct Flag {
  int* d = nullptr;
  cudaStream_t st;
  explicit Flag(cudaStream_t s) : st(s) {
    if (cudaMallocAsync((void**)&d, sizeof(int), st) != cudaSuccess) d = nullptr;
    else if (cudaMemsetAsync(d, 0, sizeof(int), st) != cudaSuccess) { cudaFreeAsync(d, st); d = nullptr; }
  }
  ~Flag() { if (d) cudaFreeAsync(d, st); }
  // Returns -1 on a CUDA error, else the flag's value.
  int read() {
    int h = 0;
    if (cudaMemcpyAsync(&h, d, sizeof(int), cudaMemcpyDeviceToHost, st) != cudaSuccess) return -1;
    if (cudaStreamSynchronize(st) != cudaSuccess) return -1;
    return h;
  }
};

inline unsigned grid_for(int64_t N, int64_t K) {
  const int64_t threads = tasa_num_col_blocks(N) * (K / TASA_TILE_K) * TASA_COL_BLOCK;
  return (unsigned)((threads + kThreads - 1) / kThreads);
}

}  // namespace
}  // namespace tasa_cuda

using namespace tasa_cuda;

int tasa_pack_cuda(const uint8_t* codes, int64_t N, int64_t K, const int32_t* gtable,
                   int64_t group_size, int64_t R, uint32_t* qweight, void* stream) {
  cudaStream_t st = (cudaStream_t)stream;
  if (N <= 0) return TASA_ERR_SHAPE;
  int s = check_layout_device(gtable, nullptr, K, group_size, R, st);
  if (s != TASA_OK || K == 0) return s;
  Flag bad(st);
  if (!bad.d) return TASA_ERR_ALLOC;
  pack_kernel<<<grid_for(N, K), kThreads, 0, st>>>(codes, N, K, gtable, group_size, R, qweight, bad.d);
  if (launch_status() != TASA_OK) return TASA_ERR_CUDA;
  const int f = bad.read();
  return f < 0 ? TASA_ERR_CUDA : f & 2 ? TASA_ERR_GTABLE : f ? TASA_ERR_CODE_RANGE : TASA_OK;
}

int tasa_unpack_cuda(const uint32_t* qweight, const int32_t* gtable, int64_t N, int64_t K,
                     int64_t group_size, int64_t R, uint8_t* codes, void* stream) {
  cudaStream_t st = (cudaStream_t)stream;
  if (N <= 0) return TASA_ERR_SHAPE;
  int s = check_layout_device(gtable, nullptr, K, group_size, R, st);
  if (s != TASA_OK || K == 0) return s;
  unpack_kernel<<<grid_for(N, K), kThreads, 0, st>>>(qweight, gtable, N, K, group_size, R, codes);
  return launch_status();
}

int tasa_dequant_cuda(const uint32_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                      const int32_t* gtable, const int32_t* perm, int64_t N, int64_t K,
                      int64_t group_size, int64_t R, float* W, void* stream) {
  cudaStream_t st = (cudaStream_t)stream;
  if (N <= 0) return TASA_ERR_SHAPE;
  int s = check_layout_device(gtable, perm, K, group_size, R, st);
  if (s != TASA_OK || K == 0) return s;
  Flag bad(st);
  if (!bad.d) return TASA_ERR_ALLOC;
  dequant_kernel<<<grid_for(N, K), kThreads, 0, st>>>(qweight, scales, zeros, gtable, perm, N, K,
                                                       group_size, R, W, bad.d);
  if (launch_status() != TASA_OK) return TASA_ERR_CUDA;
  const int f = bad.read();
  return f < 0 ? TASA_ERR_CUDA : f ? TASA_ERR_NONFINITE : TASA_OK;
}

int tasa_embed_cuda(const int64_t* ids, int64_t n_ids, const uint32_t* qweight,
                    const uint16_t* scales, const uint16_t* zeros, const int32_t* gtable,
                    const int32_t* perm, int64_t N, int64_t K, int64_t group_size, int64_t R,
                    float* out, void* stream) {
  cudaStream_t st = (cudaStream_t)stream;
  if (N <= 0) return TASA_ERR_SHAPE;
  int s = check_layout_device(gtable, perm, K, group_size, R, st);
  if (s != TASA_OK || K == 0 || n_ids == 0) return s;
  Flag bad(st);
  if (!bad.d) return TASA_ERR_ALLOC;
  const int64_t threads = n_ids * (K / TASA_TILE_K);
  embed_kernel<<<(unsigned)((threads + kThreads - 1) / kThreads), kThreads, 0, st>>>(
      ids, n_ids, qweight, scales, zeros, gtable, perm, N, K, group_size, R, out, bad.d);
  if (launch_status() != TASA_OK) return TASA_ERR_CUDA;
  const int f = bad.read();
  return f < 0 ? TASA_ERR_CUDA : f & 2 ? TASA_ERR_INDEX : f ? TASA_ERR_NONFINITE : TASA_OK;
}
