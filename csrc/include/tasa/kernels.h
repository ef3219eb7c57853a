// C-style launchers of the tasa kernels. Torch-free: raw pointers, sizes, and an int status
// (enum tasa_status in format.h) instead of exceptions. The torch op layer (tasa_ext/csrc)
// validates tensors, calls these and turns a status into an error message naming the argument.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include "tasa/format.h"

// Activation dtypes understood by the kernels.
enum tasa_dtype { TASA_F32 = 0, TASA_BF16 = 1, TASA_F16 = 2 };

// CPU instruction-set paths. tasa_cpu_isa() is what the kernels use: the best the CPU has,
// unless tasa_cpu_set_isa() capped it (tests use this to exercise every path).
// AVX2 = AVX2 + FMA + F16C; AVX512 = that + AVX-512 F/BW/VL/DQ/VBMI/BF16 (Zen 4+, Sapphire Rapids+);
// AVX512_VNNI = that + AVX512-VNNI and VBMI2 (every CPU above has them): the same kernels except the GEMV
// (M = 1), which multiplies the codes with x split into int8 pieces (gemm_avx512.cpp).
// AMX = that + AMX-TILE/AMX-BF16 with the OS's permission (Sapphire Rapids and later): GEMMs with
// 1 < M run on the tile unit (gemm_avx512.cpp, "AMX"); the GEMV stays the VNNI one.
enum tasa_isa { TASA_ISA_SCALAR = 0, TASA_ISA_AVX2 = 1, TASA_ISA_AVX512 = 2, TASA_ISA_AVX512_VNNI = 3,
                TASA_ISA_AMX = 4 };
int tasa_cpu_isa_detected(void);
int tasa_cpu_isa(void);
int tasa_cpu_set_isa(int isa);   // returns TASA_ERR_SHAPE if the CPU lacks it
// Up to how many rows of x (2 <= M <= it) the AVX2 GEMM shares the GEMV's decode across rows
// instead of dequantizing each group into L1 (gemm_avx2.cpp); 1 turns that path off; at most
// TASA_GEMV_ROWS_MAX. Tests and benchmarks set it; the default is measured (gemm.cpp).
#define TASA_GEMV_ROWS_MAX 16
int tasa_cpu_gemv_rows(void);
int tasa_cpu_set_gemv_rows(int rows);   // TASA_ERR_SHAPE outside 1..TASA_GEMV_ROWS_MAX; < 0: default
// The AVX2 GEMV's int8 path for 2/3/4-bit groups (x as exact int8 pieces): 1 on, 0 off, < 0 default
int tasa_cpu_gemv_i8(void);
int tasa_cpu_set_gemv_i8(int on);
// int8 pieces of fp32 x in the int8 GEMVs (AVX2 vpmaddubsw, AVX-512 VNNI): 3 (error <= 254^-3
// of each group's largest |x|) or 2 (254^-2, bf16 x's); < 0 default. bf16 x always takes 2, fp16 3.
int tasa_cpu_x_pieces(void);
int tasa_cpu_set_x_pieces(int n);   // TASA_ERR_SHAPE unless 2, 3 or < 0

// ---- format helpers (CPU) -------------------------------------------------------------------
// Builds the stored-order group table from per-logical-group bits; returns packed rows in *rows.
int tasa_make_gtable(const int32_t* group_bits, int64_t n_groups, int64_t group_size,
                     int32_t* gtable, int64_t* rows);

// Validates gtable (and perm when not NULL) against K, group_size and R packed rows.
int tasa_check_layout_cpu(const int32_t* gtable, const int32_t* perm, int64_t K,
                          int64_t group_size, int64_t R);

// ---- CPU kernels ------------------------------------------------------------------------------
// codes: uint8 [N, K] in logical row order. qweight: uint32 [NB, R, 16] (zero-filled here).
int tasa_pack_cpu(const uint8_t* codes, int64_t N, int64_t K, const int32_t* gtable,
                  int64_t group_size, int64_t R, uint32_t* qweight);
int tasa_unpack_cpu(const uint32_t* qweight, const int32_t* gtable, int64_t N, int64_t K,
                    int64_t group_size, int64_t R, uint8_t* codes);
// W: fp32 [N, K] in input-channel order (perm applied). scales/zeros are fp16 bit patterns
// [n_groups, N] in stored order; zeros == NULL means symmetric; perm == NULL means identity.
int tasa_dequant_cpu(const uint32_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                     const int32_t* gtable, const int32_t* perm, int64_t N, int64_t K,
                     int64_t group_size, int64_t R, float* W);
// Embedding lookup on a packed matrix: out [n_ids, K] fp32 = rows ids[i] of the dequantized
// W [N, K] (column ids[i] of the packed layout; perm applied). A tied input embedding and
// output projection are one packed matrix: gemm serves the head, embed the lookup.
// Every id must lie in [0, N) (TASA_ERR_INDEX otherwise, checked before anything is written).
int tasa_embed_cpu(const int64_t* ids, int64_t n_ids, const uint32_t* qweight,
                   const uint16_t* scales, const uint16_t* zeros, const int32_t* gtable,
                   const int32_t* perm, int64_t N, int64_t K, int64_t group_size, int64_t R,
                   float* out);
// W^T of column blocks [cb0, cb1) for a dense matmul (the prefill path): out [K, ldw] of dtype
// odt (TASA_F32 or TASA_BF16), row r = logical input row r (perm NOT applied: the caller
// permutes x instead), column c = output column cb0*16 + c (c < min(N, cb1*16) - cb0*16 <= ldw).
// fp32 values equal tasa_dequant_cpu's bit for bit; bf16 ones are those rounded to nearest even.
int tasa_dequant_t_cpu(const uint32_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                       const int32_t* gtable, int64_t N, int64_t K, int64_t group_size, int64_t R,
                       int64_t cb0, int64_t cb1, void* out, int64_t ldw, int odt);
// y [M, N] = x [M, K] . W^T, x and y of dtype xdt, fp32 accumulation.
int tasa_gemm_cpu(const void* x, int xdt, int64_t M, const uint32_t* qweight,
                  const uint16_t* scales, const uint16_t* zeros, const int32_t* gtable,
                  const int32_t* perm, int64_t N, int64_t K, int64_t group_size, int64_t R,
                  void* y);
// The same with the int8 GEMVs' piece count for fp32 x given (2 or 3; tasa_gemm_cpu passes
// tasa_cpu_x_pieces()).
int tasa_gemm_cpu_xp(const void* x, int xdt, int64_t M, const uint32_t* qweight,
                     const uint16_t* scales, const uint16_t* zeros, const int32_t* gtable,
                     const int32_t* perm, int64_t N, int64_t K, int64_t group_size, int64_t R,
                     void* y, int x_pieces);
// GPTQ running-mean Hessian for S sources: for each source s with m_s rows of X [T, K]
// (src[t] == s; src == NULL puts every row in source 0):
//   H_s <- H_s * count_s / (count_s + m_s) + 2 / (count_s + m_s) * sum_t x_t x_t^T,
//   count_s <- count_s + m_s.   H: fp32 [S, K, K], fp32 accumulation.
int tasa_hessian_accumulate_cpu(float* H, int64_t S, const void* X, int xdt, int64_t T,
                                int64_t K, const int64_t* src, int64_t* count);

// GPTQ's column loop over columns [c0, c1) of one block W fp32 [N, B] (row-major), with U fp32
// [B, B] the block of the upper Cholesky factor of the damped inverse Hessian and scale/zero
// fp32 [N] the (one) group's parameters of every row: for each row n and column i in order
//   c = clamp(round_half_even(W[n,i] / scale[n]) + zero[n], 0, maxq); codes[n, i] = c;
//   err[n, i] = (W[n,i] - (c - zero[n]) * scale[n]) / U[i,i];  W[n, j] -= err[n,i] * U[i, j]
// for j in [i, B). codes u8 [N, B] and err fp32 [N, B] are written at columns [c0, c1) only.
// Scales must be finite and > 0, U[i,i] finite and > 0 (TASA_ERR_NONFINITE otherwise).
int tasa_gptq_cols_cpu(float* W, int64_t N, int64_t B, const float* U, int64_t c0, int64_t c1,
                       const float* scale, const float* zero, int64_t maxq, uint8_t* codes,
                       float* err);

// Clipping search of group parameters (tasa.quant.mse.mse_params) for each row of W fp32
// [R, G]: among the ranges shrink[c] * [lo, hi] ([min(w,0), max(w,0)], sym: [-max|w|, max|w|]),
// each turned into (scale, zero) as rtn_params does, the one minimising
// sum_k weight_k (w_k - q(w_k))^2 (weight: NULL = ones, [G] shared (weight_rows 1) or [R, G]
// (weight_rows R)); the first candidate wins ties. scale/zero fp32 [R].
int tasa_mse_params_cpu(const float* W, int64_t R, int64_t G, int64_t bits, int sym,
                        const float* weight, int64_t weight_rows, const float* shrink,
                        int64_t n_shrink, float* scale, float* zero);

// Incoherence rotation (format.h, version 2) of every row of x fp32 [M, K] in place, per block
// of b = tasa_hadamard_block(group_size) columns: forward (inverse == 0) x <- x R, i.e.
// x <- H_b (s * x) / sqrt(b); inverse x <- x R^T, i.e. x <- s * (H_b x) / sqrt(b). The forward
// turns an activation row into the input of a rotated matrix; the inverse turns a rotated
// weight row back (dequantization). K must be a multiple of group_size.
int tasa_hadamard_cpu(float* x, int64_t M, int64_t K, int64_t group_size, int inverse);

// One decode step's attention for a single new token at position pos, fp32: qkv [(H + 2 KV) *
// hd] holds q (H heads), k and v (KV heads each) of the token; q and k are rotated in place
// (x * cos + rotate_half(x) * sin, cos/sin [hd] of position pos, rotate_half(x) = (-x2, x1)),
// k and v written to k_cache / v_cache [KV, max_len, hd] at pos, and out [H * hd] =
// softmax(scale * q_h K_g[0..pos]^T) V_g[0..pos] per head h, g = h / (H / KV).
int tasa_decode_attention_cpu(float* qkv, const float* cos, const float* sin, float* k_cache,
                              float* v_cache, int64_t H, int64_t KV, int64_t hd, int64_t max_len,
                              int64_t pos, float scale, float* out);

// RMSNorm of each row of x fp32 [M, D] into y: w * (x * (1 / sqrt(mean(x^2) + eps))), the mean
// of squares summed in double.
int tasa_rms_norm_cpu(const float* x, const float* w, int64_t M, int64_t D, float eps, float* y);

// One packed matrix of a decode step (the tasa::gemm op's arguments): bias fp32 [N] or NULL,
// zeros / perm NULL when absent, hadamard != 0 for a rotated matrix (format version 2: x is
// rotated, as tasa_hadamard_cpu does, before the product).
typedef struct tasa_packed_cpu {
  const uint32_t* qweight;
  const uint16_t* scales;
  const uint16_t* zeros;
  const int32_t* gtable;
  const int32_t* perm;
  const float* bias;
  int64_t N, K, group_size, R;
  int hadamard;
} tasa_packed_cpu_t;

// One pre-norm decoder layer of the llama family for one token: x = rmsnorm(h, norm1);
// qkv = x W_qkv^T (+ b); attention (tasa_decode_attention_cpu, caches at pos); h += a W_o^T;
// x = rmsnorm(h, norm2); [g, u] = x W_gu^T; h += (silu(g) * u) W_down^T.
// q/k/v come as one fused matrix (n_qkv = 1, N = (H + 2 KV) hd) or three (n_qkv = 3), gate/up
// as one (n_gate_up = 1, N = 2 I: gate, then up) or two; their outputs lie side by side.
typedef struct tasa_decode_layer_cpu {
  const float* norm1;   // [D]
  const float* norm2;   // [D]
  tasa_packed_cpu_t qkv[3], o, gate_up[2], down;   // o: N = D, down: N = D
  int n_qkv, n_gate_up;
  float* k_cache;       // [KV, max_len, hd]
  float* v_cache;
} tasa_decode_layer_cpu_t;

// Floats of scratch tasa_decode_layers_cpu needs.
int64_t tasa_decode_layers_scratch(int64_t D, int64_t H, int64_t KV, int64_t hd, int64_t I);
// One token through n_layers layers: h fp32 [D] (the residual stream) updated in place; cos /
// sin fp32 [max_len, hd] (row pos is used); the shapes of every matrix are checked against D,
// H, KV, hd and I (TASA_ERR_SHAPE); x_pieces: the GEMVs' int8 pieces of x (tasa_gemm_cpu_xp).
int tasa_decode_layers_cpu(float* h, int64_t D, const tasa_decode_layer_cpu_t* layers,
                           int64_t n_layers, int64_t H, int64_t KV, int64_t hd, int64_t I,
                           int64_t max_len, int64_t pos, const float* cos, const float* sin,
                           float eps, float scale, float* scratch, int x_pieces);
// B streams' next tokens at once (batched decode: several requests, speculative drafts): h fp32
// [B, D]; each layer's k_cache / v_cache hold the B streams' caches [B, KV, max_len, hd]; stream
// b at position pos[b]. Each projection is one gemm over the B rows (the weights read once a
// step; for B > 1 the row-shared GEMM, whose rows differ from their B = 1 steps by rounding
// except on AVX2 with x_pieces = 2, where the 2- to 4-bit groups are bit-equal); attention per
// stream. B = 1 is tasa_decode_layers_cpu exactly.
int64_t tasa_decode_layers_batch_scratch(int64_t B, int64_t D, int64_t H, int64_t KV,
                                         int64_t hd, int64_t I);
int tasa_decode_layers_batch_cpu(float* h, int64_t B, int64_t D,
                                 const tasa_decode_layer_cpu_t* layers, int64_t n_layers,
                                 int64_t H, int64_t KV, int64_t hd, int64_t I, int64_t max_len,
                                 const int64_t* pos, const float* cos, const float* sin,
                                 float eps, float scale, float* scratch, int x_pieces);

// ---- CUDA kernels (csrc/cuda; same semantics as the CPU ones, device pointers, a stream) ----
#ifdef TASA_WITH_CUDA
int tasa_pack_cuda(const uint8_t* codes, int64_t N, int64_t K, const int32_t* gtable,
                   int64_t group_size, int64_t R, uint32_t* qweight, void* stream);
int tasa_unpack_cuda(const uint32_t* qweight, const int32_t* gtable, int64_t N, int64_t K,
                     int64_t group_size, int64_t R, uint8_t* codes, void* stream);
int tasa_dequant_cuda(const uint32_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                      const int32_t* gtable, const int32_t* perm, int64_t N, int64_t K,
                      int64_t group_size, int64_t R, float* W, void* stream);
int tasa_embed_cuda(const int64_t* ids, int64_t n_ids, const uint32_t* qweight,
                    const uint16_t* scales, const uint16_t* zeros, const int32_t* gtable,
                    const int32_t* perm, int64_t N, int64_t K, int64_t group_size, int64_t R,
                    float* out, void* stream);
int tasa_gemm_cuda(const void* x, int xdt, int64_t M, const uint32_t* qweight,
                   const uint16_t* scales, const uint16_t* zeros, const int32_t* gtable,
                   const int32_t* perm, int64_t N, int64_t K, int64_t group_size, int64_t R,
                   void* y, void* stream);
int tasa_hessian_accumulate_cuda(float* H, int64_t S, const void* X, int xdt, int64_t T,
                                 int64_t K, const int64_t* src, int64_t* count, void* stream);
int tasa_hadamard_cuda(float* x, int64_t M, int64_t K, int64_t group_size, int inverse,
                       void* stream);
#endif
