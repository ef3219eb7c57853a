// Shared device helpers of the tasa CUDA kernels (torch-free). See csrc/include/tasa/format.h
// for the packed layout every kernel here reads or writes.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "tasa/format.h"
#include "tasa/kernels.h"

namespace tasa_cuda {

// Code of tile row i (0..31) from the B words of one column of a tile (format.h: code i sits
// at bits [B*i, B*i+B) of the little-endian concatenation of the words). Call it with B and
// i compile-time constants (fully unrolled loops): every index and shift then folds, the
// words stay in registers, and a 3-bit straddle costs one extra shift-or (the funnel shift).
template <int B>
__device__ __forceinline__ uint32_t code_at(const uint32_t (&w)[B], int i) {
  const int bit = B * i, wi = bit >> 5, sh = bit & 31;
  uint32_t v = w[wi] >> sh;
  // The clamp keeps the (dead, for B = 2/4/8) straddle branch from indexing past w.
  if (sh + B > 32) v |= w[wi + 1 < B ? wi + 1 : wi] << (32 - sh);
  return v & ((1u << B) - 1u);
}

// Activation element -> fp32, and fp32 -> output element.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// fp16 bit pattern (scales/zeros are passed as uint16_t) -> fp32.
__device__ __forceinline__ float half_bits_to_f32(uint16_t h) {
  return __half2float(__ushort_as_half(h));
}

__device__ __forceinline__ bool half_bits_finite(uint16_t h) { return (h & 0x7C00u) != 0x7C00u; }

// Maps a launch / runtime error to the tasa status (never throws: these are C-style launchers).
inline int launch_status() { return cudaGetLastError() == cudaSuccess ? TASA_OK : TASA_ERR_CUDA; }

}  // namespace tasa_cuda
