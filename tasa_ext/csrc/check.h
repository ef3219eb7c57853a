// Argument checks shared by the CPU and CUDA shims: each failure names the argument.
#pragma once
#include <torch/extension.h>

#include <limits>

#include "tasa/kernels.h"

namespace tasa_ext {

inline const char* status_text(int st) {
  switch (st) {
    case TASA_ERR_BITS: return "unsupported bit width (supported: 2, 3, 4, 8)";
    case TASA_ERR_GROUP_SIZE: return "group_size must be a positive multiple of 32 dividing K";
    case TASA_ERR_GTABLE: return "inconsistent group table (bits not sorted, offsets not cumulative, or logical groups not a permutation)";
    case TASA_ERR_CODE_RANGE: return "a code does not fit its group's bit width";
    case TASA_ERR_PERM: return "perm is not a permutation of [0, K)";
    case TASA_ERR_NONFINITE: return "NaN or Inf found";
    case TASA_ERR_SHAPE: return "inconsistent sizes or values";
    case TASA_ERR_CUDA: return "CUDA launch failed";
    case TASA_ERR_ALLOC: return "allocation failed";
    case TASA_ERR_INDEX: return "an index is outside [0, N) (a token id beyond the vocabulary?)";
    default: return "unknown error";
  }
}

// The argument a launcher's status points at (arg overrides it where the caller knows better).
inline const char* status_arg(int st) {
  switch (st) {
    case TASA_ERR_BITS: case TASA_ERR_GTABLE: return "gtable";
    case TASA_ERR_GROUP_SIZE: return "group_size";
    case TASA_ERR_CODE_RANGE: return "codes";
    case TASA_ERR_PERM: return "perm";
    case TASA_ERR_NONFINITE: return "scales/zeros";
    case TASA_ERR_INDEX: return "ids";
    default: return "shapes";
  }
}

inline void raise_status(int st, const char* arg = nullptr) {
  TORCH_CHECK(st == TASA_OK, "tasa: ", status_text(st), " (argument: ", arg ? arg : status_arg(st), ")");
}

inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dt) {
  TORCH_CHECK(t.scalar_type() == dt, "tasa: ", name, " must have dtype ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "tasa: ", name, " must be contiguous");
}

// The decode ops' buffers: contiguous float32 on the CPU (the kernels read raw float pointers).
inline void check_cpu_f32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "tasa: ", op, " takes contiguous float32 CPU tensors (", name, ": ", t.scalar_type(),
              " on ", t.device(), t.is_contiguous() ? "" : ", not contiguous", ")");
}

inline void check_2d(const at::Tensor& t, const char* name, at::ScalarType dt) {
  TORCH_CHECK(t.dim() == 2, "tasa: ", name, " must be 2-D, got shape ", t.sizes());
  check_tensor(t, name, dt);
}

inline void check_1d(const at::Tensor& t, const char* name, at::ScalarType dt, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "tasa: ", name, " must have shape [", n, "], got ", t.sizes());
  check_tensor(t, name, dt);
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "tasa: ", name, " is on ", t.device(), " but qweight is on ",
              ref.device());
}

inline void check_group_size(int64_t K, int64_t group_size) {
  TORCH_CHECK(group_size > 0 && group_size % TASA_TILE_K == 0,
              "tasa: group_size must be a positive multiple of ", TASA_TILE_K, ", got ", group_size);
  TORCH_CHECK(K % group_size == 0, "tasa: K=", K, " (input features) is not divisible by group_size=",
              group_size);
}

// The largest K (input features) an op accepts: far above any model (2^40), far below where
// n_groups * group_size or bits * K * N products overflow int64.
constexpr int64_t kMaxK = int64_t(1) << 40;

// qweight [NB, R, 16] int32 and gtable [n_groups, 3] int32 on one device; returns K.
inline int64_t check_layout(const at::Tensor& qweight, const at::Tensor& gtable, int64_t N, int64_t group_size) {
  TORCH_CHECK(qweight.dim() == 3 && qweight.size(2) == TASA_COL_BLOCK,
              "tasa: qweight must have shape [ceil(N/16), R, 16], got ", qweight.sizes());
  check_tensor(qweight, "qweight", at::kInt);
  check_2d(gtable, "gtable", at::kInt);
  TORCH_CHECK(gtable.size(1) == TASA_GTABLE_COLS, "tasa: gtable must have shape [n_groups, 3], got ", gtable.sizes());
  check_same_device(gtable, "gtable", qweight);
  TORCH_CHECK(N > 0 && tasa_num_col_blocks(N) == qweight.size(0), "tasa: qweight has ", qweight.size(0),
              " column blocks, which does not match N=", N, " output features");
  TORCH_CHECK(group_size > 0 && group_size % TASA_TILE_K == 0,
              "tasa: group_size must be a positive multiple of ", TASA_TILE_K, ", got ", group_size);
  // K = 0 (no groups) has no packed rows to read; every caller divides by K (x.numel() / K
  // killed the process with SIGFPE) and the CUDA path returned an uninitialized output
  TORCH_CHECK(gtable.size(0) > 0, "tasa: gtable has no groups (K = 0 input features): nothing to "
              "multiply");
  // n_groups * group_size wrapped to 0 (or below) for group sizes near 2^62 and bypassed the
  // K = 0 guard: a SIGFPE in gemm, a raw SymInt error in unpack
  TORCH_CHECK(gtable.size(0) <= kMaxK / group_size, "tasa: gtable has ", gtable.size(0),
              " groups of group_size=", group_size, ": K would exceed ", kMaxK, " input features");
  // the packed rows bound the groups' widths (2..8 bits): a table that does not fit qweight is
  // refused from the shapes alone, before an output of n_groups x group_size is allocated
  const int64_t min_rows = gtable.size(0) * 2 * (group_size / TASA_TILE_K);
  TORCH_CHECK(min_rows <= qweight.size(1) && qweight.size(1) <= 4 * min_rows, "tasa: qweight has ",
              qweight.size(1), " packed rows, which ", gtable.size(0), " groups of group_size=",
              group_size, " cannot have (", min_rows, " to ", 4 * min_rows, ")");
  return gtable.size(0) * group_size;
}

inline const uint16_t* half_ptr(const at::Tensor& t) { return (const uint16_t*)t.data_ptr<at::Half>(); }

inline void check_scales(const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                         const std::optional<at::Tensor>& perm, const at::Tensor& qweight, int64_t n_groups,
                         int64_t N, int64_t K) {
  check_2d(scales, "scales", at::kHalf);
  TORCH_CHECK(scales.size(0) == n_groups, "tasa: scales must have shape [n_groups=", n_groups, ", N], got ",
              scales.sizes());
  check_same_device(scales, "scales", qweight);
  if (zeros) {
    check_2d(*zeros, "zeros", at::kHalf);
    TORCH_CHECK(zeros->sizes() == scales.sizes(), "tasa: zeros must have the shape of scales ", scales.sizes(),
                ", got ", zeros->sizes());
    check_same_device(*zeros, "zeros", qweight);
  }
  if (perm) {
    check_1d(*perm, "perm", at::kInt, K);
    check_same_device(*perm, "perm", qweight);
  }
}

// ids: int64 token ids (any shape, contiguous) on qweight's device; returns the fp32 output
// [*ids.shape, K] of an embedding lookup.
inline at::Tensor check_ids(const at::Tensor& ids, const at::Tensor& qweight, int64_t K) {
  TORCH_CHECK(ids.scalar_type() == at::kLong, "tasa: ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.is_contiguous(), "tasa: ids must be contiguous");
  check_same_device(ids, "ids", qweight);
  auto shape = ids.sizes().vec();
  shape.push_back(K);
  return at::empty(shape, qweight.options().dtype(at::kFloat));
}

// Every op on a packed matrix (dequant, embed, gemm; CPU and CUDA): the layout, then the scales,
// zeros and perm against it. Returns K; *N = the output features (scales' columns).
inline int64_t check_packed(const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& zeros, const at::Tensor& gtable,
                            const std::optional<at::Tensor>& perm, int64_t group_size, int64_t* N) {
  *N = scales.dim() == 2 ? scales.size(1) : -1;
  const int64_t K = check_layout(qweight, gtable, *N, group_size);
  check_scales(scales, zeros, perm, qweight, K / group_size, *N, K);
  return K;
}

inline int check_activation(const at::Tensor& x, const char* name, int64_t K, const at::Tensor& qweight) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "tasa: ", name, " must have last dimension K=", K, ", got shape ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(), "tasa: ", name, " must be contiguous");
  check_same_device(x, name, qweight);
  switch (x.scalar_type()) {
    case at::kFloat: return TASA_F32;
    case at::kBFloat16: return TASA_BF16;
    case at::kHalf: return TASA_F16;
    default: TORCH_CHECK(false, "tasa: ", name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return -1;
}

// The rotation's input (tasa::hadamard, both devices): returns a fresh contiguous fp32 copy of x
// to rotate in place, and in *K its last dimension.
inline at::Tensor hadamard_input(const at::Tensor& x, int64_t group_size, int64_t* K) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "tasa: x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(x.dim() >= 1, "tasa: x must have at least one dimension");
  *K = x.size(-1);
  TORCH_CHECK(group_size > 0 && *K % group_size == 0, "tasa: x's last dimension K=", *K,
              " is not a multiple of group_size=", group_size);
  return x.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
}

inline int check_hessian(const at::Tensor& H, const at::Tensor& X, const std::optional<at::Tensor>& src,
                         const at::Tensor& count, int64_t* S, int64_t* K, int64_t* T) {
  TORCH_CHECK(H.dim() == 3 && H.size(1) == H.size(2), "tasa: H must have shape [S, K, K], got ", H.sizes());
  check_tensor(H, "H", at::kFloat);
  *S = H.size(0);
  *K = H.size(1);
  TORCH_CHECK(X.dim() == 2 && X.size(1) == *K, "tasa: X must have shape [T, K=", *K, "], got ", X.sizes());
  TORCH_CHECK(X.device() == H.device(), "tasa: X is on ", X.device(), " but H is on ", H.device());
  *T = X.size(0);
  check_1d(count, "count", at::kLong, *S);
  TORCH_CHECK(count.device() == H.device(), "tasa: count is on ", count.device(), " but H is on ", H.device());
  // a negative running count turns the mean rescale n/(n+t) into garbage (NaN at n = -t); one
  // reduction (a device sync on CUDA, small next to the K x K update)
  TORCH_CHECK(*S == 0 || count.min().item<int64_t>() >= 0, "tasa: count must be >= 0 (tokens "
              "accumulated so far per source), got ", count.min().item<int64_t>());
  // a count near 2^63 wrapped negative after adding T rows
  TORCH_CHECK(*S == 0 || count.max().item<int64_t>() <= std::numeric_limits<int64_t>::max() - X.size(0),
              "tasa: count would overflow int64 after adding ", X.size(0), " rows (got ",
              count.max().item<int64_t>(), ")");
  // X reading the H being written (a view of it) gave a different result silently
  TORCH_CHECK(!X.is_alias_of(H), "tasa: X must not share memory with H");
  if (src) {
    check_1d(*src, "src", at::kLong, *T);
    TORCH_CHECK(src->device() == H.device(), "tasa: src is on ", src->device(), " but H is on ", H.device());
  } else {
    TORCH_CHECK(*S == 1, "tasa: src is required when H holds ", *S, " sources");
  }
  TORCH_CHECK(X.is_contiguous(), "tasa: X must be contiguous");
  switch (X.scalar_type()) {
    case at::kFloat: return TASA_F32;
    case at::kBFloat16: return TASA_BF16;
    case at::kHalf: return TASA_F16;
    default: TORCH_CHECK(false, "tasa: X must be float32, bfloat16 or float16, got ", X.scalar_type());
  }
  return -1;
}

}  // namespace tasa_ext
