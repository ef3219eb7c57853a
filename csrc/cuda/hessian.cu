// CUDA GPTQ Hessian accumulation for several sources in one pass over X:
//   for each source s with m_s = #{t : src[t] == s} > 0 (src == NULL: all rows in source 0),
//     H_s <- H_s * n_s / (n_s + m_s) + 2 / (n_s + m_s) * sum_{t in s} x_t x_t^T,  n_s += m_s.
// Semantics identical to tasa_hessian_accumulate_cpu: fp32 accumulation of x x^T, the result
// written to the upper triangle and mirrored into the lower one (H stays exactly symmetric),
// sources with m_s == 0 left untouched.
//
// Where m_s is computed: ON THE DEVICE. A histogram kernel counts m_s, a one-block kernel turns
// (count_s, m_s) into decay_s = (float)(n/(n+m)) and beta_s = (float)(2/(n+m)) in double (the
// same expressions as the CPU, so the same fp32 factors) and advances count_s. No
// device->host copy, so the op never synchronizes the stream. Consequence: rows whose src is
// outside [0, S) are skipped instead of reported (the CPU returns TASA_ERR_SHAPE); the torch
// shim documents this.
//
// Main kernel: one CTA per 64 x 64 block (bi <= bj) of the upper triangle, 256 threads, each a
// 4 x 4 micro-tile (rows ty + 16a, cols tx + 16b) for up to kSrc = 4 sources at once. Rows of X
// are staged 32 at a time in shared memory as fp32 together with their source slot; every thread
// sees the same row, so the switch on the slot is warp-uniform and keeps the 4 x 16 accumulators
// in registers (a dynamic index would demote them to local memory). S > 4 sources take
// ceil(S / 4) passes over X.
#include "common.cuh"

namespace tasa_cuda {
namespace {

constexpr int kHT = 64, kHRows = 32, kSrc = 4, kHThreads = 256;

__global__ void src_histogram_kernel(const int64_t* __restrict__ src, int64_t T, int64_t S,
                                     unsigned long long* __restrict__ m) {
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < T; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t s = src ? src[t] : 0;
    if (s >= 0 && s < S) atomicAdd(m + s, 1ULL);
  }
}

__global__ void coef_kernel(int64_t S, const unsigned long long* __restrict__ m, int64_t* __restrict__ count,
                            float* __restrict__ decay, float* __restrict__ beta) {
  for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
    const double n_old = (double)count[s], n_new = n_old + (double)m[s];
    decay[s] = m[s] ? (float)(n_old / n_new) : 1.f;
    beta[s] = m[s] ? (float)(2.0 / n_new) : 0.f;
    count[s] = count[s] + (int64_t)m[s];
  }
}

__device__ __forceinline__ void outer_fma(float (&acc)[4][4], const float (&a)[4], const float (&b)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
}

template <typename T>
__global__ void __launch_bounds__(kHThreads)
hessian_kernel(float* __restrict__ H, int64_t S, const T* __restrict__ X, int64_t Trows, int64_t K,
               const int64_t* __restrict__ src, const unsigned long long* __restrict__ m,
               const float* __restrict__ decay, const float* __restrict__ beta, int64_t s_base) {
  const int bi = blockIdx.y, bj = blockIdx.x;
  if (bj < bi) return;   // lower triangle: mirrored from the upper one
  const int64_t i0 = (int64_t)bi * kHT, j0 = (int64_t)bj * kHT;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  __shared__ float Xi[kHRows][kHT], Xj[kHRows][kHT];
  __shared__ int slot[kHRows];

  float acc[kSrc][4][4];
#pragma unroll
  for (int q = 0; q < kSrc; ++q)
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[q][a][b] = 0.f;

  for (int64_t t0 = 0; t0 < Trows; t0 += kHRows) {
#pragma unroll
    for (int u = 0; u < kHRows * kHT / kHThreads; ++u) {
      const int e = threadIdx.x + u * kHThreads, r = e / kHT, c = e % kHT;
      const int64_t t = t0 + r;
      const bool ok = t < Trows;
      Xi[r][c] = ok && i0 + c < K ? to_f32(X[t * K + i0 + c]) : 0.f;
      Xj[r][c] = ok && j0 + c < K ? to_f32(X[t * K + j0 + c]) : 0.f;
    }
    if (threadIdx.x < kHRows) {
      const int64_t t = t0 + threadIdx.x;
      const int64_t s = t < Trows ? (src ? src[t] : 0) : -1;
      slot[threadIdx.x] = (s >= s_base && s < s_base + kSrc && s < S) ? (int)(s - s_base) : -1;
    }
    __syncthreads();
    for (int r = 0; r < kHRows; ++r) {
      const int sl = slot[r];
      if (sl < 0) continue;
      float a[4], b[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) { a[q] = Xi[r][ty + 16 * q]; b[q] = Xj[r][tx + 16 * q]; }
      switch (sl) {   // uniform across the CTA
        case 0: outer_fma(acc[0], a, b); break;
        case 1: outer_fma(acc[1], a, b); break;
        case 2: outer_fma(acc[2], a, b); break;
        default: outer_fma(acc[3], a, b); break;
      }
    }
    __syncthreads();
  }

  // Each upper element (i <= j) is read and written by exactly one thread; its mirror (j, i)
  // is only written, so no two threads race.
#pragma unroll
  for (int q = 0; q < kSrc; ++q) {
    const int64_t s = s_base + q;
    if (s >= S || m[s] == 0) continue;
    const float d = decay[s], be = beta[s];
    float* Hs = H + s * K * K;
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int64_t i = i0 + ty + 16 * a, j = j0 + tx + 16 * b;
        if (i < K && j < K && j >= i) {
          const float v = Hs[i * K + j] * d + be * acc[q][a][b];
          Hs[i * K + j] = v;
          Hs[j * K + i] = v;
        }
      }
  }
}

template <typename T>
int launch_hessian(float* H, int64_t S, const void* X, int64_t Trows, int64_t K, const int64_t* src,
                   const unsigned long long* m, const float* decay, const float* beta, cudaStream_t st) {
  const int64_t nb = (K + kHT - 1) / kHT;
  if (nb > 65535) return TASA_ERR_SHAPE;
  const dim3 grid((unsigned)nb, (unsigned)nb);
  for (int64_t s_base = 0; s_base < S; s_base += kSrc) {
    hessian_kernel<T><<<grid, kHThreads, 0, st>>>(H, S, (const T*)X, Trows, K, src, m, decay, beta, s_base);
    if (launch_status() != TASA_OK) return TASA_ERR_CUDA;
  }
  return TASA_OK;
}

}  // namespace
}  // namespace tasa_cuda

using namespace tasa_cuda;

int tasa_hessian_accumulate_cuda(float* H, int64_t S, const void* X, int xdt, int64_t T,
                                 int64_t K, const int64_t* src, int64_t* count, void* stream) {
  cudaStream_t st = (cudaStream_t)stream;
  if (xdt != TASA_F32 && xdt != TASA_BF16 && xdt != TASA_F16) return TASA_ERR_SHAPE;
  if (S <= 0 || K < 0 || T < 0) return TASA_ERR_SHAPE;
  if (T == 0 || K == 0) return TASA_OK;
  // Scratch: m [S] (u64), decay [S], beta [S] -- stream-ordered, so graph-capturable.
  void* scratch = nullptr;
  if (cudaMallocAsync(&scratch, (size_t)S * 16, st) != cudaSuccess) return TASA_ERR_ALLOC;
  unsigned long long* m = (unsigned long long*)scratch;
  float* decay = (float*)(m + S);
  float* beta = decay + S;
  int status = TASA_OK;
  if (cudaMemsetAsync(m, 0, sizeof(unsigned long long) * S, st) != cudaSuccess) status = TASA_ERR_CUDA;
  if (status == TASA_OK) {
    const int64_t blocks = (T + 255) / 256 < 1024 ? (T + 255) / 256 : 1024;
    src_histogram_kernel<<<(unsigned)blocks, 256, 0, st>>>(src, T, S, m);
    coef_kernel<<<1, 256, 0, st>>>(S, m, count, decay, beta);
    status = launch_status();
  }
  if (status == TASA_OK) {
    switch (xdt) {
      case TASA_F32: status = launch_hessian<float>(H, S, X, T, K, src, m, decay, beta, st); break;
      case TASA_BF16: status = launch_hessian<__nv_bfloat16>(H, S, X, T, K, src, m, decay, beta, st); break;
      default: status = launch_hessian<__half>(H, S, X, T, K, src, m, decay, beta, st); break;
    }
  }
  cudaFreeAsync(scratch, st);
  return status;
}
