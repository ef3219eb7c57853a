// CPU implementations of the tasa ops (schemas are defined once, in tasa_ext/ops.py) and the
// pybind module tasa_ext._C with the format constants and the exact cost function.
// This file only checks arguments (naming the tensor) and calls the torch-free launchers.
#include <torch/extension.h>

#include "check.h"
#include "tasa/kernels.h"

namespace tasa_ext {

std::tuple<at::Tensor, at::Tensor> pack_cpu(const at::Tensor& codes, const at::Tensor& group_bits,
                                            int64_t group_size) {
  check_2d(codes, "codes", at::kByte);
  const int64_t N = codes.size(0), K = codes.size(1);
  check_group_size(K, group_size);
  check_1d(group_bits, "group_bits", at::kInt, K / group_size);
  auto gb = group_bits.cpu().contiguous();
  auto gtable = at::empty({K / group_size, 3}, gb.options());
  int64_t R = 0;
  raise_status(tasa_make_gtable(gb.data_ptr<int32_t>(), K / group_size, group_size,
                                gtable.data_ptr<int32_t>(), &R), "group_bits");
  auto qweight = at::empty({tasa_num_col_blocks(N), R, TASA_COL_BLOCK}, codes.options().dtype(at::kInt));
  raise_status(tasa_pack_cpu(codes.data_ptr<uint8_t>(), N, K, gtable.data_ptr<int32_t>(), group_size,
                             R, (uint32_t*)qweight.data_ptr<int32_t>()));
  return {qweight, gtable};
}

at::Tensor unpack_cpu(const at::Tensor& qweight, const at::Tensor& gtable, int64_t N, int64_t group_size) {
  const int64_t K = check_layout(qweight, gtable, N, group_size);
  auto codes = at::empty({N, K}, qweight.options().dtype(at::kByte));
  raise_status(tasa_unpack_cpu((const uint32_t*)qweight.data_ptr<int32_t>(), gtable.data_ptr<int32_t>(), N,
                               K, group_size, qweight.size(1), codes.data_ptr<uint8_t>()));
  return codes;
}

at::Tensor dequant_cpu(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                       const at::Tensor& gtable, const std::optional<at::Tensor>& perm, int64_t group_size) {
  int64_t N;
  const int64_t K = check_packed(qweight, scales, zeros, gtable, perm, group_size, &N);
  auto W = at::empty({N, K}, qweight.options().dtype(at::kFloat));
  raise_status(tasa_dequant_cpu((const uint32_t*)qweight.data_ptr<int32_t>(), half_ptr(scales),
                                zeros ? half_ptr(*zeros) : nullptr, gtable.data_ptr<int32_t>(),
                                perm ? perm->data_ptr<int32_t>() : nullptr, N, K, group_size,
                                qweight.size(1), W.data_ptr<float>()));
  return W;
}

at::Tensor embed_cpu(const at::Tensor& ids, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& zeros, const at::Tensor& gtable,
                     const std::optional<at::Tensor>& perm, int64_t group_size) {
  int64_t N;
  const int64_t K = check_packed(qweight, scales, zeros, gtable, perm, group_size, &N);
  auto out = check_ids(ids, qweight, K);
  raise_status(tasa_embed_cpu(ids.data_ptr<int64_t>(), ids.numel(), (const uint32_t*)qweight.data_ptr<int32_t>(),
                              half_ptr(scales), zeros ? half_ptr(*zeros) : nullptr,
                              gtable.data_ptr<int32_t>(), perm ? perm->data_ptr<int32_t>() : nullptr, N, K,
                              group_size, qweight.size(1), out.data_ptr<float>()));
  return out;
}

// ---- prefill path: dequantize once, dense matmul ---------------------------------------------
// From g_dense_rows rows of x on, gemm dequantizes W^T in column chunks (tasa_dequant_t_cpu)
// and hands each chunk to torch's matmul: bf16 x -> bf16 W^T (oneDNN's AMX kernels where the
// CPU has them, AVX-512 BF16 otherwise; W^T rounded to bf16 as a bf16 model's weights are),
// fp32 / fp16 x -> fp32 W^T and sgemm (the fused kernel's fp32 semantics; fp16 x is computed
// in fp32 and rounded back). Measured on the 2-core Intel Xeon with AMX
// (benchmarks/results/prefill_cpu.md): see kDenseRowsDefault.
constexpr int64_t kDenseRowsDefault = 64;
int64_t g_dense_rows = kDenseRowsDefault;
// W^T chunk of at most this many bytes. Measured on the 2-core Intel Xeon (bf16, M = 512,
// noisy: torch's own matmul varied 1.7-4.7 ms on one shape within minutes): 256 KB and 1 MB
// chunks cost 1.5-4x the matmul alone on Qwen's 4864x896 / 896x4864 (one oneDNN call per
// chunk, each repacking its operand), a whole matrix 1.3x; 16 MB holds every matrix of the
// registry's models in one bf16 chunk and bounds the transient at 8B shapes (14336 x 4096 bf16
// is 117 MB whole).
constexpr int64_t kChunkBytesDefault = 16 << 20;
int64_t g_chunk_bytes = kChunkBytesDefault;   // settable for the tests of the chunk loop

at::Tensor gemm_dense_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const std::optional<at::Tensor>& zeros, const at::Tensor& gtable,
                          const std::optional<at::Tensor>& perm, int64_t group_size, int64_t N,
                          int64_t K, int64_t M) {
  const bool bf16 = x.scalar_type() == at::kBFloat16 && tasa_cpu_isa() >= TASA_ISA_AVX512;
  const auto cdt = bf16 ? at::kBFloat16 : at::kFloat;
  auto x2 = x.reshape({M, K});
  if (perm) x2 = x2.index_select(1, *perm);          // logical order: column r = channel perm[r]
  x2 = x2.to(cdt).contiguous();
  const int64_t NB = tasa_num_col_blocks(N), elt = bf16 ? 2 : 4;
  const int64_t cbs = std::max<int64_t>(1, std::min<int64_t>(NB, g_chunk_bytes / (K * 16 * elt)));
  auto Wt = at::empty({K, cbs * 16}, x2.options());
  auto y = at::empty({M, N}, x2.options());
  for (int64_t cb0 = 0; cb0 < NB; cb0 += cbs) {
    const int64_t cb1 = std::min(NB, cb0 + cbs), nc = std::min(N, cb1 * 16) - cb0 * 16;
    raise_status(tasa_dequant_t_cpu((const uint32_t*)qweight.data_ptr<int32_t>(), half_ptr(scales),
                                    zeros ? half_ptr(*zeros) : nullptr, gtable.data_ptr<int32_t>(),
                                    N, K, group_size, qweight.size(1), cb0, cb1, Wt.data_ptr(),
                                    Wt.size(1), bf16 ? TASA_BF16 : TASA_F32));
    auto yc = y.narrow(1, cb0 * 16, nc);
    at::mm_out(yc, x2, Wt.narrow(1, 0, nc));
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  return y.to(x.scalar_type()).reshape(out_shape);
}

at::Tensor hadamard_cpu(const at::Tensor& x, int64_t group_size, bool inverse);

at::Tensor gemm_cpu(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                    const std::optional<at::Tensor>& zeros, const at::Tensor& gtable,
                    const std::optional<at::Tensor>& perm, int64_t group_size, bool hadamard) {
  int64_t N;
  const int64_t K = check_packed(qweight, scales, zeros, gtable, perm, group_size, &N);
  // (the rotation keeps x's dtype, shape and device: one check serves both)
  const int xdt = check_activation(x_in, "x", K, qweight);
  // A rotated matrix (format version 2) multiplies x R: the rotation of the hadamard op, called
  // here rather than as its own op (a decode step of the README job's SmolLM2 made 124 such
  // calls at 10.8 us each, ~10% of the step, most of it dispatch and Python)
  const at::Tensor x = hadamard ? hadamard_cpu(x_in, group_size, false) : x_in;
  const int64_t M = x.numel() / K;
  if (g_dense_rows > 0 && M >= g_dense_rows) {
    if (perm) raise_status(tasa_check_layout_cpu(gtable.data_ptr<int32_t>(), perm->data_ptr<int32_t>(), K,
                                                 group_size, qweight.size(1)), "perm");
    return gemm_dense_cpu(x, qweight, scales, zeros, gtable, perm, group_size, N, K, M);
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  auto y = at::empty(out_shape, x.options());
  raise_status(tasa_gemm_cpu(x.data_ptr(), xdt, M, (const uint32_t*)qweight.data_ptr<int32_t>(),
                             half_ptr(scales), zeros ? half_ptr(*zeros) : nullptr,
                             gtable.data_ptr<int32_t>(), perm ? perm->data_ptr<int32_t>() : nullptr, N,
                             K, group_size, qweight.size(1), y.data_ptr()));
  return y;
}

void hessian_accumulate_cpu(at::Tensor& H, const at::Tensor& X, const std::optional<at::Tensor>& src,
                            at::Tensor& count) {
  int64_t S, K, T;
  const int xdt = check_hessian(H, X, src, count, &S, &K, &T);
  raise_status(tasa_hessian_accumulate_cpu(H.data_ptr<float>(), S, X.data_ptr(), xdt, T, K,
                                           src ? src->data_ptr<int64_t>() : nullptr,
                                           count.data_ptr<int64_t>()), "src");
}

void gptq_cols_cpu(at::Tensor& W, const at::Tensor& U, const at::Tensor& scale,
                   const at::Tensor& zero, int64_t maxq, int64_t c0, int64_t c1, at::Tensor& codes,
                   at::Tensor& err) {
  check_2d(W, "W", at::kFloat);
  const int64_t N = W.size(0), B = W.size(1);
  check_2d(U, "U", at::kFloat);
  TORCH_CHECK(U.size(0) == B && U.size(1) == B, "tasa: U must have shape [", B, ", ", B, "], got ", U.sizes());
  check_1d(scale, "scale", at::kFloat, N);
  check_1d(zero, "zero", at::kFloat, N);
  check_2d(codes, "codes", at::kByte);
  TORCH_CHECK(codes.size(0) == N && codes.size(1) == B, "tasa: codes must have shape [", N, ", ", B, "], got ", codes.sizes());
  check_2d(err, "err", at::kFloat);
  TORCH_CHECK(err.size(0) == N && err.size(1) == B, "tasa: err must have shape [", N, ", ", B, "], got ", err.sizes());
  TORCH_CHECK(0 <= c0 && c0 <= c1 && c1 <= B, "tasa: columns [", c0, ", ", c1, ") outside [0, ", B, ")");
  TORCH_CHECK(1 <= maxq && maxq <= 255, "tasa: maxq must be in [1, 255], got ", maxq);
  raise_status(tasa_gptq_cols_cpu(W.data_ptr<float>(), N, B, U.data_ptr<float>(), c0, c1,
                                  scale.data_ptr<float>(), zero.data_ptr<float>(), maxq,
                                  codes.data_ptr<uint8_t>(), err.data_ptr<float>()),
               "scale/zero or U's diagonal");
}

std::tuple<at::Tensor, at::Tensor> mse_params_cpu(const at::Tensor& W, int64_t bits, bool sym,
                                                  const std::optional<at::Tensor>& weight,
                                                  const at::Tensor& shrink) {
  check_tensor(W, "W", at::kFloat);
  TORCH_CHECK(W.dim() >= 1 && W.size(-1) >= 1, "tasa: W must have a non-empty last axis, got ", W.sizes());
  TORCH_CHECK(1 <= bits && bits <= 8, "tasa: bits must be in [1, 8], got ", bits);
  const int64_t G = W.size(-1), R = W.numel() / G;
  int64_t wrows = 0;
  if (weight) {
    check_tensor(*weight, "weight", at::kFloat);
    if (weight->dim() == 1 && weight->size(0) == G) wrows = 1;
    else if (weight->sizes() == W.sizes()) wrows = R;
    else TORCH_CHECK(false, "tasa: weight must have shape [", G, "] or W's shape ", W.sizes(), ", got ", weight->sizes());
  }
  TORCH_CHECK(shrink.dim() == 1 && shrink.size(0) >= 1, "tasa: shrink must be a non-empty 1-D tensor");
  check_tensor(shrink, "shrink", at::kFloat);
  auto out_shape = W.sizes().vec();
  out_shape.pop_back();
  auto s = at::empty(out_shape, W.options()), z = at::empty(out_shape, W.options());
  raise_status(tasa_mse_params_cpu(W.data_ptr<float>(), R, G, bits, sym ? 1 : 0,
                                   weight ? weight->data_ptr<float>() : nullptr, wrows,
                                   shrink.data_ptr<float>(), shrink.size(0), s.data_ptr<float>(),
                                   z.data_ptr<float>()));
  return {s, z};
}

at::Tensor hadamard_cpu(const at::Tensor& x, int64_t group_size, bool inverse) {
  TORCH_CHECK(x.device().is_cpu(), "tasa: x must be a CPU tensor");
  int64_t K;
  // a fresh fp32 copy, rotated in place (the rotation adds in fp32 whatever x's dtype)
  auto y = hadamard_input(x, group_size, &K);
  const int64_t M = K > 0 ? y.numel() / K : 0;
  raise_status(tasa_hadamard_cpu(y.data_ptr<float>(), M, K, group_size, inverse ? 1 : 0));
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor decode_attention_cpu(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                at::Tensor& k_cache, at::Tensor& v_cache, int64_t H, int64_t pos,
                                double scale) {
  check_cpu_f32(qkv, "decode_attention", "qkv");
  check_cpu_f32(cos, "decode_attention", "cos");
  check_cpu_f32(sin, "decode_attention", "sin");
  check_cpu_f32(k_cache, "decode_attention", "k_cache");
  check_cpu_f32(v_cache, "decode_attention", "v_cache");
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(),
              "tasa: k_cache and v_cache must be [KV, max_len, hd] of one shape, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t KV = k_cache.size(0), max_len = k_cache.size(1), hd = k_cache.size(2);
  TORCH_CHECK(H > 0 && H % KV == 0, "tasa: H must be a positive multiple of KV (", KV, "), got ", H);
  TORCH_CHECK(qkv.numel() == (H + 2 * KV) * hd, "tasa: qkv must hold (H + 2 KV) * hd = ",
              (H + 2 * KV) * hd, " values, got ", qkv.numel());
  TORCH_CHECK(cos.numel() == hd && sin.numel() == hd, "tasa: cos and sin must hold hd = ", hd,
              " values");
  TORCH_CHECK(0 <= pos && pos < max_len, "tasa: pos ", pos, " outside the cache [0, ", max_len, ")");
  auto out = at::empty({H * hd}, qkv.options());
  raise_status(tasa_decode_attention_cpu(qkv.data_ptr<float>(), cos.data_ptr<float>(),
                                         sin.data_ptr<float>(), k_cache.data_ptr<float>(),
                                         v_cache.data_ptr<float>(), H, KV, hd, max_len, pos,
                                         (float)scale, out.data_ptr<float>()));
  return out;
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && x.scalar_type() == at::kFloat &&
                  w.scalar_type() == at::kFloat,
              "tasa: rms_norm takes float32 CPU tensors");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && x.size(-1) == w.size(0) && w.size(0) > 0,
              "tasa: rms_norm needs x [..., D] and w [D], got ", x.sizes(), " and ", w.sizes());
  const auto xc = x.contiguous(), wc = w.contiguous();
  auto y = at::empty_like(xc);
  const int64_t D = w.size(0);
  raise_status(tasa_rms_norm_cpu(xc.data_ptr<float>(), wc.data_ptr<float>(), xc.numel() / D, D,
                                 (float)eps, y.data_ptr<float>()));
  return y;
}

// tasa::decode_layers_: per layer, tensors[44 l ..] = norm1, norm2, then for each of the seven
// matrix slots q (or fused q/k/v), k, v, o, gate (or fused gate/up), up, down: qweight, scales,
// zeros?, gtable, perm?, bias? (k, v and up all None when fused); ints[14 l ..] = group_size,
// hadamard of the same seven. Checked as the ops they stand for check their arguments, every
// call (tens of us for SmolLM2's 30 layers against a ~10 ms step). B = len(pos) streams: h
// [B, D] (or [D] for one), each layer's caches [B, KV, max_len, hd] (or [KV, max_len, hd] for
// one), stream b at pos[b].
void decode_layers_cpu(at::Tensor& h, const c10::List<std::optional<at::Tensor>>& tensors,
                       at::IntArrayRef ints, at::TensorList k_caches, at::TensorList v_caches,
                       const at::Tensor& cos, const at::Tensor& sin, int64_t H, at::IntArrayRef pos,
                       double eps, double scale, int64_t x_pieces) {
  constexpr int64_t kT = 44, kI = 14;
  TORCH_CHECK(x_pieces == 2 || x_pieces == 3, "tasa: x_pieces must be 2 or 3, got ", x_pieces);
  const int64_t n_layers = (int64_t)k_caches.size();
  TORCH_CHECK(n_layers > 0 && (int64_t)v_caches.size() == n_layers &&
                  (int64_t)tensors.size() == kT * n_layers && (int64_t)ints.size() == kI * n_layers,
              "tasa: decode_layers_ needs ", kT, " tensors and ", kI, " ints per layer and one k "
              "and v cache per layer, got ", tensors.size(), ", ", ints.size(), ", ",
              k_caches.size(), " and ", v_caches.size());
  auto fp32 = [](const at::Tensor& t, const char* name) { check_cpu_f32(t, "decode_layers_", name); };
  fp32(h, "h");
  fp32(cos, "cos");
  fp32(sin, "sin");
  const int64_t B = (int64_t)pos.size();
  TORCH_CHECK(B > 0, "tasa: decode_layers_ needs one position per stream, got none");
  TORCH_CHECK(h.dim() >= 1 && h.numel() > 0, "tasa: h is empty");
  const int64_t D = h.size(-1);
  TORCH_CHECK(h.numel() == B * D && (B == 1 || (h.dim() == 2 && h.size(0) == B)),
              "tasa: h must be [B=", B, ", D] for ", B, " positions, got ", h.sizes());
  const at::Tensor& k0 = k_caches[0];
  TORCH_CHECK((k0.dim() == 3 && B == 1) || (k0.dim() == 4 && k0.size(0) == B),
              "tasa: k_caches must be [B=", B, ", KV, max_len, hd] (or [KV, max_len, hd] for one "
              "stream), got ", k0.sizes());
  const int64_t KV = k0.size(-3), max_len = k0.size(-2), hd = k0.size(-1);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == max_len && cos.size(1) == hd && sin.sizes() == cos.sizes(),
              "tasa: cos and sin must be [max_len=", max_len, ", hd=", hd, "], got ", cos.sizes(),
              " and ", sin.sizes());
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(0 <= pos[b] && pos[b] < max_len, "tasa: pos ", pos[b], " outside the cache [0, ",
                max_len, ")");
  TORCH_CHECK(H > 0 && H % KV == 0, "tasa: H must be a positive multiple of KV (", KV, "), got ", H);
  std::vector<tasa_decode_layer_cpu_t> layers(n_layers);
  std::vector<at::Tensor> held(kT * n_layers);       // the list's elements, alive for the call
  int64_t I = -1;
  static const char* kSlot[7] = {"q (or q/k/v)", "k", "v", "o", "gate (or gate/up)", "up", "down"};
  for (int64_t l = 0; l < n_layers; ++l) {
    auto get = [&](int64_t i) -> const at::Tensor* {
      const std::optional<at::Tensor> t = tensors.get(kT * l + i);
      if (!t || !t->defined()) return nullptr;
      held[kT * l + i] = *t;
      return &held[kT * l + i];
    };
    tasa_decode_layer_cpu_t& L = layers[l];
    const at::Tensor* n1 = get(0);
    const at::Tensor* n2 = get(1);
    TORCH_CHECK(n1 && n2, "tasa: layer ", l, " lacks its norm weights");
    for (const at::Tensor* n : {n1, n2}) {
      fp32(*n, "norm");
      TORCH_CHECK(n->numel() == D, "tasa: layer ", l, "'s norm weight has ", n->numel(),
                  " values, h has ", D);
    }
    L.norm1 = n1->data_ptr<float>();
    L.norm2 = n2->data_ptr<float>();
    tasa_packed_cpu_t* P[7] = {&L.qkv[0], &L.qkv[1], &L.qkv[2], &L.o, &L.gate_up[0], &L.gate_up[1],
                               &L.down};
    bool present[7];
    for (int j = 0; j < 7; ++j) {
      const at::Tensor* qw = get(2 + 6 * j);
      const at::Tensor* sc = get(3 + 6 * j);
      const at::Tensor* zr = get(4 + 6 * j);
      const at::Tensor* gt = get(5 + 6 * j);
      const at::Tensor* pm = get(6 + 6 * j);
      const at::Tensor* bs = get(7 + 6 * j);
      present[j] = qw != nullptr;
      const bool optional = j == 1 || j == 2 || j == 5;
      if (!qw && optional) {
        TORCH_CHECK(!sc && !zr && !gt && !pm && !bs, "tasa: layer ", l, "'s ", kSlot[j],
                    " has tensors but no qweight");
        continue;
      }
      TORCH_CHECK(qw && sc && gt, "tasa: layer ", l, "'s ", kSlot[j], " lacks qweight, scales or gtable");
      const std::optional<at::Tensor> zo = zr ? std::optional<at::Tensor>(*zr) : std::nullopt;
      const std::optional<at::Tensor> po = pm ? std::optional<at::Tensor>(*pm) : std::nullopt;
      const int64_t gs = ints[kI * l + 2 * j];
      int64_t N;
      const int64_t K = check_packed(*qw, *sc, zo, *gt, po, gs, &N);
      TORCH_CHECK(qw->device().is_cpu(), "tasa: decode_layers_ takes CPU tensors");
      tasa_packed_cpu_t& p = *P[j];
      p.qweight = (const uint32_t*)qw->data_ptr<int32_t>();
      p.scales = half_ptr(*sc);
      p.zeros = zr ? half_ptr(*zr) : nullptr;
      p.gtable = gt->data_ptr<int32_t>();
      p.perm = pm ? pm->data_ptr<int32_t>() : nullptr;
      p.N = N;
      p.K = K;
      p.group_size = gs;
      p.R = qw->size(1);
      p.hadamard = ints[kI * l + 2 * j + 1] != 0;
      p.bias = nullptr;
      if (bs) {
        fp32(*bs, "bias");
        TORCH_CHECK(bs->numel() == N, "tasa: layer ", l, "'s ", kSlot[j], " bias has ", bs->numel(),
                    " values for N=", N);
        p.bias = bs->data_ptr<float>();
      }
    }
    TORCH_CHECK(present[1] == present[2], "tasa: layer ", l, " has k without v or v without k");
    L.n_qkv = present[1] ? 3 : 1;
    L.n_gate_up = present[5] ? 2 : 1;
    int64_t qkv_n = 0, gu_n = 0;
    bool ks_ok = true;
    for (int i = 0; i < L.n_qkv; ++i) qkv_n += L.qkv[i].N, ks_ok = ks_ok && L.qkv[i].K == D;
    for (int i = 0; i < L.n_gate_up; ++i) gu_n += L.gate_up[i].N, ks_ok = ks_ok && L.gate_up[i].K == D;
    TORCH_CHECK(gu_n % 2 == 0 && (L.n_gate_up == 1 || L.gate_up[0].N == L.gate_up[1].N),
                "tasa: layer ", l, "'s gate and up must have as many outputs each");
    if (I < 0) I = gu_n / 2;
    TORCH_CHECK(ks_ok && qkv_n == (H + 2 * KV) * hd && L.o.K == H * hd && L.o.N == D &&
                    gu_n == 2 * I && L.down.K == I && L.down.N == D,
                "tasa: layer ", l, "'s matrices do not fit D=", D, ", H=", H, ", KV=", KV,
                ", hd=", hd, ", I=", I);
    for (const at::Tensor* c : {&k_caches[l], &v_caches[l]}) {
      fp32(*c, "cache");
      TORCH_CHECK(c->sizes() == k0.sizes(), "tasa: layer ", l, "'s cache has shape ", c->sizes(),
                  ", layer 0's ", k0.sizes());
    }
    L.k_cache = k_caches[l].data_ptr<float>();
    L.v_cache = v_caches[l].data_ptr<float>();
  }
  auto scratch = at::empty({tasa_decode_layers_batch_scratch(B, D, H, KV, hd, I)}, h.options());
  const std::vector<int64_t> p(pos.begin(), pos.end());
  raise_status(tasa_decode_layers_batch_cpu(h.data_ptr<float>(), B, D, layers.data(), n_layers, H,
                                            KV, hd, I, max_len, p.data(), cos.data_ptr<float>(),
                                            sin.data_ptr<float>(), (float)eps, (float)scale,
                                            scratch.data_ptr<float>(), (int)x_pieces));
}

}  // namespace tasa_ext

TORCH_LIBRARY_IMPL(tasa, CPU, m) {
  m.impl("pack", &tasa_ext::pack_cpu);
  m.impl("unpack", &tasa_ext::unpack_cpu);
  m.impl("dequant", &tasa_ext::dequant_cpu);
  m.impl("embed", &tasa_ext::embed_cpu);
  m.impl("gemm", &tasa_ext::gemm_cpu);
  m.impl("hessian_accumulate_", &tasa_ext::hessian_accumulate_cpu);
  m.impl("gptq_cols_", &tasa_ext::gptq_cols_cpu);
  m.impl("mse_params", &tasa_ext::mse_params_cpu);
  m.impl("hadamard", &tasa_ext::hadamard_cpu);
  m.impl("decode_attention_", &tasa_ext::decode_attention_cpu);
  m.impl("rms_norm", &tasa_ext::rms_norm_cpu);
  m.impl("decode_layers_", &tasa_ext::decode_layers_cpu);
}

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tasa compiled kernels (CPU" 
#ifdef TASA_WITH_CUDA
            " + CUDA"
#endif
            ")";
  m.attr("FORMAT_VERSION") = TASA_FORMAT_VERSION;
  m.attr("TILE_K") = TASA_TILE_K;
  m.attr("COL_BLOCK") = TASA_COL_BLOCK;
  m.attr("GTABLE_COLS") = TASA_GTABLE_COLS;
  m.attr("HAD_MAX_BLOCK") = TASA_HAD_MAX_BLOCK;
  m.def("hadamard_block", [](int64_t group_size) { return tasa_hadamard_block(group_size); },
        "Rotation block of a group size (format.h, version 2).");
  m.attr("SUPPORTED_BITS") = py::make_tuple(2, 3, 4, 8);
#ifdef TASA_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("cost_bits",
        [](int64_t N, int64_t K, int64_t group_size, std::vector<int32_t> group_bits, bool has_zeros,
           bool has_perm) {
          TORCH_CHECK(group_size > 0 && K % group_size == 0, "tasa: K=", K,
                      " is not divisible by group_size=", group_size);
          TORCH_CHECK((int64_t)group_bits.size() == K / group_size, "tasa: group_bits has ",
                      group_bits.size(), " entries but K / group_size = ", K / group_size);
          for (auto b : group_bits)
            TORCH_CHECK(tasa_bits_supported(b), "tasa: group_bits contains unsupported width ", b,
                        " (supported: 2, 3, 4, 8)");
          return tasa_cost_bits(N, K, group_size, group_bits.data(), K / group_size, has_zeros, has_perm);
        },
        "Exact stored bits of one packed matrix (codes incl. column padding, fp16 scales, fp16 "
        "zeros if asymmetric, the group table, the permutation if any).",
        py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("group_bits"), py::arg("has_zeros"),
        py::arg("has_perm"));
  m.def("dense_rows", []() { return tasa_ext::g_dense_rows; },
        "Rows of x from which the CPU gemm dequantizes once and calls torch's matmul (0: never).");
  m.def("set_dense_rows", [](int64_t rows) {
    TORCH_CHECK(rows >= 0, "tasa: dense_rows must be >= 0 (0 turns the dense path off), got ", rows);
    tasa_ext::g_dense_rows = rows;
  });
  m.attr("DENSE_ROWS_DEFAULT") = tasa_ext::kDenseRowsDefault;
  m.attr("GEMV_ROWS_MAX") = TASA_GEMV_ROWS_MAX;
  m.def("set_dense_chunk_bytes", [](int64_t n) {   // tests: several chunks on small matrices
    tasa_ext::g_chunk_bytes = n > 0 ? n : tasa_ext::kChunkBytesDefault;
  });
  m.def("cpu_isa", []() { return tasa_cpu_isa(); });
  m.def("gemv_rows", []() { return tasa_cpu_gemv_rows(); },
        "up to how many rows the AVX2 gemm shares the GEMV's decode across rows");
  m.def("set_gemv_rows", [](int rows) {
    TORCH_CHECK(tasa_cpu_set_gemv_rows(rows) == TASA_OK, "tasa: gemv_rows must be 1..",
                TASA_GEMV_ROWS_MAX, " (1: off) or -1 (the default), got ", rows);
  });
  m.def("gemv_i8", []() { return tasa_cpu_gemv_i8(); },
        "whether the AVX2 GEMV runs its 2/3/4-bit groups on int8 pieces of x (vpmaddubsw)");
  m.def("set_gemv_i8", [](int on) { tasa_cpu_set_gemv_i8(on); });
  m.def("x_pieces", []() { return tasa_cpu_x_pieces(); },
        "int8 pieces of fp32 x in the int8 GEMVs (2 or 3)");
  m.def("set_x_pieces", [](int n) {
    TORCH_CHECK(tasa_cpu_set_x_pieces(n) == TASA_OK, "tasa: x_pieces must be 2, 3 or -1 (the default), got ", n);
  });
  m.def("cpu_isa_detected", []() { return tasa_cpu_isa_detected(); });
  m.def("set_cpu_isa", [](int isa) {
    TORCH_CHECK(tasa_cpu_set_isa(isa) == TASA_OK, "tasa: this CPU does not support ISA level ", isa);
  });
}
