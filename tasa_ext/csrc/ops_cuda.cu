// CUDA implementations of the tasa ops (schemas: tasa_ext/ops.py; CPU twins: ops_cpu.cpp).
// Like the CPU shim this file only checks arguments (naming the tensor), sets the device guard,
// and calls the torch-free launchers of csrc/cuda on the current stream. Compiled only in CUDA
// builds (setup.py globs tasa_ext/csrc/*.cu into the CUDAExtension).
//
// Synchronization: pack / unpack / dequant synchronize (they copy the small group table -- and
// perm -- to the host to validate it, and read back a device error flag); they run at
// quantization time. gemm and hessian_accumulate_ never synchronize, so decoding can be captured
// in a CUDA graph: gemm trusts gtable/perm (validated when packed or loaded) and does not
// report NaN/Inf scales; hessian_accumulate_ skips rows whose src is outside [0, S) instead of
// raising (the CPU op raises).
//
// This file holds no device code. Its body is hidden from nvcc's device passes (__CUDA_ARCH__
// is defined only there): otherwise cicc would parse all of torch/extension.h once per
// architecture in archs.txt (~45 s each) to emit nothing. The host pass compiles it in full.
#if !defined(__CUDA_ARCH__)
// c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h: the stream getter is the same
// function (at::cuda::getCurrentCUDAStream is c10::cuda::getCurrentCUDAStream), and this header
// does not pull in cuBLAS/cuSPARSE, so the file also compile-checks with a bare nvcc toolkit.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "check.h"
#include "tasa/kernels.h"

namespace tasa_ext {
namespace {

void* stream_of(const at::Tensor& t) {
  return (void*)c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "tasa: ", name, " must be a CUDA tensor, got device ", t.device());
}

std::tuple<at::Tensor, at::Tensor> pack_cuda(const at::Tensor& codes, const at::Tensor& group_bits,
                                             int64_t group_size) {
  check_cuda(codes, "codes");
  c10::cuda::CUDAGuard guard(codes.device());
  check_2d(codes, "codes", at::kByte);
  const int64_t N = codes.size(0), K = codes.size(1);
  TORCH_CHECK(N > 0, "tasa: codes must have at least one row (output feature)");
  check_group_size(K, group_size);
  check_1d(group_bits, "group_bits", at::kInt, K / group_size);
  TORCH_CHECK(group_bits.device() == codes.device(), "tasa: group_bits is on ", group_bits.device(),
              " but codes is on ", codes.device());
  // The table is built on the host (a few bytes; pack is a quantization-time op).
  auto gb = group_bits.cpu().contiguous();
  auto gtable_h = at::empty({K / group_size, 3}, gb.options());
  int64_t R = 0;
  raise_status(tasa_make_gtable(gb.data_ptr<int32_t>(), K / group_size, group_size,
                                gtable_h.data_ptr<int32_t>(), &R), "group_bits");
  auto gtable = gtable_h.to(codes.device());
  auto qweight = at::empty({tasa_num_col_blocks(N), R, TASA_COL_BLOCK}, codes.options().dtype(at::kInt));
  raise_status(tasa_pack_cuda(codes.data_ptr<uint8_t>(), N, K, gtable.data_ptr<int32_t>(), group_size, R,
                              (uint32_t*)qweight.data_ptr<int32_t>(), stream_of(codes)),
               "codes");
  return {qweight, gtable};
}

at::Tensor unpack_cuda(const at::Tensor& qweight, const at::Tensor& gtable, int64_t N, int64_t group_size) {
  check_cuda(qweight, "qweight");
  c10::cuda::CUDAGuard guard(qweight.device());
  const int64_t K = check_layout(qweight, gtable, N, group_size);
  auto codes = at::empty({N, K}, qweight.options().dtype(at::kByte));
  raise_status(tasa_unpack_cuda((const uint32_t*)qweight.data_ptr<int32_t>(), gtable.data_ptr<int32_t>(), N,
                                K, group_size, qweight.size(1), codes.data_ptr<uint8_t>(), stream_of(qweight)),
               "gtable");
  return codes;
}

at::Tensor dequant_cuda(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                        const at::Tensor& gtable, const std::optional<at::Tensor>& perm, int64_t group_size) {
  check_cuda(qweight, "qweight");
  c10::cuda::CUDAGuard guard(qweight.device());
  int64_t N;
  const int64_t K = check_packed(qweight, scales, zeros, gtable, perm, group_size, &N);
  auto W = at::empty({N, K}, qweight.options().dtype(at::kFloat));
  raise_status(tasa_dequant_cuda((const uint32_t*)qweight.data_ptr<int32_t>(), half_ptr(scales),
                                 zeros ? half_ptr(*zeros) : nullptr, gtable.data_ptr<int32_t>(),
                                 perm ? perm->data_ptr<int32_t>() : nullptr, N, K, group_size,
                                 qweight.size(1), W.data_ptr<float>(), stream_of(qweight)),
               "scales/zeros/perm");
  return W;
}

at::Tensor embed_cuda(const at::Tensor& ids, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, const at::Tensor& gtable,
                      const std::optional<at::Tensor>& perm, int64_t group_size) {
  check_cuda(qweight, "qweight");
  c10::cuda::CUDAGuard guard(qweight.device());
  int64_t N;
  const int64_t K = check_packed(qweight, scales, zeros, gtable, perm, group_size, &N);
  auto out = check_ids(ids, qweight, K);
  raise_status(tasa_embed_cuda(ids.data_ptr<int64_t>(), ids.numel(), (const uint32_t*)qweight.data_ptr<int32_t>(),
                               half_ptr(scales), zeros ? half_ptr(*zeros) : nullptr, gtable.data_ptr<int32_t>(),
                               perm ? perm->data_ptr<int32_t>() : nullptr, N, K, group_size, qweight.size(1),
                               out.data_ptr<float>(), stream_of(qweight)));
  return out;
}

at::Tensor hadamard_cuda(const at::Tensor& x, int64_t group_size, bool inverse);

at::Tensor gemm_cuda(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& zeros, const at::Tensor& gtable,
                     const std::optional<at::Tensor>& perm, int64_t group_size, bool hadamard) {
  check_cuda(qweight, "qweight");
  c10::cuda::CUDAGuard guard(qweight.device());
  int64_t N;
  const int64_t K = check_packed(qweight, scales, zeros, gtable, perm, group_size, &N);
  // (the rotation keeps x's dtype, shape and device: one check serves both)
  const int xdt = check_activation(x_in, "x", K, qweight);
  // a rotated matrix multiplies x R (the hadamard op's rotation, on the same stream)
  const at::Tensor x = hadamard ? hadamard_cuda(x_in, group_size, false) : x_in;
  // The GEMV streams qweight with 16-byte loads (a view at an odd offset would fault).
  TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0,
              "tasa: qweight must be 16-byte aligned (pass a freshly allocated or cloned tensor)");
  const int64_t M = K > 0 ? x.numel() / K : 0;
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  auto y = at::empty(out_shape, x.options());
  raise_status(tasa_gemm_cuda(x.data_ptr(), xdt, M, (const uint32_t*)qweight.data_ptr<int32_t>(),
                              half_ptr(scales), zeros ? half_ptr(*zeros) : nullptr, gtable.data_ptr<int32_t>(),
                              perm ? perm->data_ptr<int32_t>() : nullptr, N, K, group_size, qweight.size(1),
                              y.data_ptr(), stream_of(qweight)),
               "x/qweight (sizes)");
  return y;
}

void hessian_accumulate_cuda(at::Tensor& H, const at::Tensor& X, const std::optional<at::Tensor>& src,
                             at::Tensor& count) {
  check_cuda(H, "H");
  c10::cuda::CUDAGuard guard(H.device());
  int64_t S, K, T;
  const int xdt = check_hessian(H, X, src, count, &S, &K, &T);
  raise_status(tasa_hessian_accumulate_cuda(H.data_ptr<float>(), S, X.data_ptr(), xdt, T, K,
                                            src ? src->data_ptr<int64_t>() : nullptr,
                                            count.data_ptr<int64_t>(), stream_of(H)),
               "H/X (sizes)");
}

at::Tensor hadamard_cuda(const at::Tensor& x, int64_t group_size, bool inverse) {
  check_cuda(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  int64_t K;
  auto y = hadamard_input(x, group_size, &K);
  const int64_t M = K > 0 ? y.numel() / K : 0;
  for (int64_t m0 = 0; m0 < M; m0 += 65535)      // the launcher's grid.y limit
    raise_status(tasa_hadamard_cuda(y.data_ptr<float>() + m0 * K, std::min<int64_t>(65535, M - m0),
                                    K, group_size, inverse ? 1 : 0, stream_of(x)));
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace
}  // namespace tasa_ext

TORCH_LIBRARY_IMPL(tasa, CUDA, m) {
  m.impl("pack", &tasa_ext::pack_cuda);
  m.impl("unpack", &tasa_ext::unpack_cuda);
  m.impl("dequant", &tasa_ext::dequant_cuda);
  m.impl("embed", &tasa_ext::embed_cuda);
  m.impl("gemm", &tasa_ext::gemm_cuda);
  m.impl("hadamard", &tasa_ext::hadamard_cuda);
  m.impl("hessian_accumulate_", &tasa_ext::hessian_accumulate_cuda);
}

#endif  // !defined(__CUDA_ARCH__)
