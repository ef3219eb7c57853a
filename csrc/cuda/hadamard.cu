// The incoherence rotation of format version 2 on the GPU (csrc/cpu/hadamard.cpp is the CPU
// twin, tasa_ext/reference.py:hadamard the semantics): one CUDA block per (row, rotation block),
// b / 2 threads, the b values in shared memory, one butterfly pair per thread per pass. The
// per-block work (b log2 b adds on b <= 128 floats) is tiny next to the GEMV that follows it,
// so the launch is kept simple rather than fused.
#include "common.cuh"

namespace {

__global__ void hadamard_kernel(float* __restrict__ x, int64_t K, int64_t b, float scale,
                                int inverse) {
  extern __shared__ float sh[];
  const int64_t row = blockIdx.y;
  const int64_t base = (int64_t)blockIdx.x * b;
  float* v = x + row * K + base;
  const int t = threadIdx.x;          // b / 2 threads
  for (int64_t i = t; i < b; i += blockDim.x) {
    const float s = tasa_hadamard_sign(base + i);
    sh[i] = inverse ? v[i] : v[i] * s;
  }
  __syncthreads();
  for (int64_t h = 1; h < b; h *= 2) {
    // pair t: j = (t / h) * 2h + t % h, partner j + h
    const int64_t j = (t / h) * 2 * h + (t % h);
    const float a = sh[j], c = sh[j + h];
    __syncthreads();
    sh[j] = a + c;
    sh[j + h] = a - c;
    __syncthreads();
  }
  for (int64_t i = t; i < b; i += blockDim.x) {
    const float s = tasa_hadamard_sign(base + i);
    v[i] = inverse ? sh[i] * (s * scale) : sh[i] * scale;
  }
}

}  // namespace

int tasa_hadamard_cuda(float* x, int64_t M, int64_t K, int64_t group_size, int inverse,
                       void* stream) {
  if (M < 0 || K < 0) return TASA_ERR_SHAPE;
  if (group_size <= 0 || K % group_size) return TASA_ERR_GROUP_SIZE;
  if (M == 0 || K == 0) return TASA_OK;
  const int64_t b = tasa_hadamard_block(group_size);
  if (M > 65535) return TASA_ERR_SHAPE;     // grid.y limit; the shim splits larger batches
  const int threads = b >= 2 ? (int)(b / 2) : 1;
  dim3 grid((unsigned)(K / b), (unsigned)M);
  hadamard_kernel<<<grid, threads, b * sizeof(float), (cudaStream_t)stream>>>(
      x, K, b, 1.0f / sqrtf((float)b), inverse);
  return tasa_cuda::launch_status();
}
