// tasa packed weight format -- THE specification. Everything else (C++ and CUDA kernels, the
// pure-torch reference in tasa_ext/reference.py, the cost model used by the bit allocator)
// follows this file. Torch-free, C++17, usable from host and device code.
//
// ============================================================================================
// Format version 1
// ============================================================================================
// A linear layer y = x W^T with W [N out, K in] is quantized in *groups* of `group_size`
// consecutive input rows (K). group_size is a multiple of TASA_TILE_K (32): 32, 64, 128 ...
// Every group has its own bit width b in {2, 3, 4, 8}.
//
// Logical order. An optional act-order permutation `perm` (int32 [K]) says that logical input
// row r is input channel perm[r]; without it logical row r is channel r. Groups are formed
// over logical rows: logical group g covers logical rows [g*G, (g+1)*G).
//
// Stored order. Groups are stored sorted by bit width (ascending, stable in g), so a kernel
// sees a few uniform segments. `gtable` (int32 [n_groups, 3]) has one entry per *stored* group j:
//     gtable[j] = (bits_j, row_offset_j, logical_group_j)
// row_offset_j is the first packed row of group j (see qweight); offsets are cumulative:
// row_offset_{j+1} = row_offset_j + bits_j * G / 32.
//
// Codes. Unsigned integers q in [0, 2^b). Dequantized weight of column n, logical row r in
// stored group j:   w = (q - z) * s   with s = scales[j, n] (fp16) and
//     z = zeros[j, n] (fp16)          in asymmetric mode,
//     z = 2^(b-1)  (implicit)         in symmetric mode (no zeros tensor).
//
// qweight: int32 [NB, R, 16], NB = ceil(N / 16) column blocks of TASA_COL_BLOCK = 16 columns,
// R = sum_j bits_j * G / 32 packed rows. Column n lives in block n / 16, lane n % 16; lanes of
// padding columns (n >= N) hold code 0. One packed row of one block is 16 words = 64 bytes:
// one cache line on the CPU, four 16-byte vector loads on the GPU, two AVX2 registers.
//
// A *tile* is 32 consecutive logical rows of a group. Tile t of stored group j occupies the b
// packed rows row_offset_j + t*b + w, w = 0..b-1. For one column, the b words of a tile,
// concatenated little-endian into a (32*b)-bit integer, hold the code of the tile's row i
// (i = 0..31) in bits [b*i, b*i + b):
//
//   b = 2 (2 words)  word0: |c15|c14|...|c1|c0|        2 bits each, c0 in bits 1:0
//                    word1: |c31|...|c16|
//   b = 3 (3 words)  word0: |c10.lo2|c9|...|c1|c0|     c10 straddles: bits 31:30 of word0
//                    word1: |c21.lo1|c20|...|c11|c10.hi1|   and bit 0 of word1;
//                    word2: |c31|...|c22|c21.hi2|       c21: bit 31 of word1, bits 1:0 of word2
//   b = 4 (4 words)  word w: |c(8w+7)|...|c(8w)|       nibbles, c(8w) in bits 3:0
//   b = 8 (8 words)  word w: |c(4w+3)|c(4w+2)|c(4w+1)|c(4w)|   bytes
//
// Why this layout: SIMD lanes run over columns (16 columns per 64-byte row), so unpacking is a
// shift per code with no cross-lane shuffles, identical for every width (the 3-bit straddles
// are a funnel shift); a column block of a whole matrix is one contiguous stream (no 4 KiB-page
// hopping per row, which defeats CPU prefetchers); on the GPU a warp reads 512 contiguous bytes.
//
// Cost. Every stored bit counts (tasa_cost_bits): codes (padded columns included), fp16 scales,
// fp16 zeros (asymmetric), the group table (3 x int32 per group) and the permutation
// (int32 per input row). "Average bits" in this project = cost_bits / (N * K).
//
// ============================================================================================
// Format version 2 = version 1 + an optional incoherence rotation per matrix
// ============================================================================================
// A matrix may be stored *rotated* (a per-matrix flag in the model's config, "hadamard": true;
// no tensor): its codes then hold W' = W R, and y = x W^T is computed as (x R) W'^T. R is
// block-diagonal over the input channels, blocks of b = tasa_hadamard_block(group_size)
// columns (the largest power of two dividing group_size, at most TASA_HAD_MAX_BLOCK: a block
// never straddles two groups), each block diag(s_k) H_b / sqrt(b) with H_b the Sylvester
// Hadamard matrix (H_1 = [1], H_2m = [[H_m, H_m], [H_m, -H_m]]) and s_k = tasa_hadamard_sign(k)
// of input channel k (a fixed function of k: every matrix with the same K and group size has
// the same R, so fused q/k/v or gate/up matrices share one rotated x). R is orthonormal, so
// W = W' R^T. Rotation is applied to channels in input order, before any act-order
// permutation (perm then indexes the rotated channels). Why: the rotation spreads a group's
// outliers over the whole block, so a group's range shrinks relative to its typical weight;
// GPTQ at 3 bits on SmolLM2 went from KL 0.67 to 0.41 (benchmarks/results/hadamard_probe_*).
// A version-1 file is a version-2 file without rotated matrices; a reader of version 1
// refuses version 2.
// ============================================================================================
#pragma once
#include <stdint.h>

#define TASA_FORMAT_VERSION 2
#define TASA_HAD_MAX_BLOCK 128
#define TASA_TILE_K 32
#define TASA_COL_BLOCK 16
#define TASA_GTABLE_COLS 3
#define TASA_MAX_BITS 8

#ifdef __CUDACC__
#define TASA_HD __host__ __device__ __forceinline__
#else
#define TASA_HD inline
#endif

// Error codes returned by every C-style launcher (0 = success).
enum tasa_status {
  TASA_OK = 0,
  TASA_ERR_BITS = 1,          // a group has a bit width outside {2,3,4,8}
  TASA_ERR_GROUP_SIZE = 2,    // group_size not a positive multiple of 32, or K % group_size
  TASA_ERR_GTABLE = 3,        // gtable inconsistent (offsets, logical groups not a permutation)
  TASA_ERR_CODE_RANGE = 4,    // a code does not fit its group's bit width
  TASA_ERR_PERM = 5,          // perm is not a permutation of [0, K)
  TASA_ERR_NONFINITE = 6,     // a scale or zero is NaN/Inf
  TASA_ERR_SHAPE = 7,         // inconsistent sizes
  TASA_ERR_CUDA = 8,          // a CUDA launch failed
  TASA_ERR_ALLOC = 9,         // scratch allocation failed
  TASA_ERR_INDEX = 10,        // a row index (token id) outside [0, N)
};

TASA_HD bool tasa_bits_supported(int b) { return b == 2 || b == 3 || b == 4 || b == 8; }

TASA_HD int64_t tasa_num_col_blocks(int64_t N) {
  return (N + TASA_COL_BLOCK - 1) / TASA_COL_BLOCK;
}

// Packed rows used by one group of `group_size` rows at `bits`.
TASA_HD int64_t tasa_group_rows(int bits, int64_t group_size) {
  return (int64_t)bits * (group_size / TASA_TILE_K);
}

// Exact storage cost in bits of one packed matrix (see "Cost" above).
//   group_bits: bit width of each group (any order), n_groups = K / group_size.
inline int64_t tasa_cost_bits(int64_t N, int64_t K, int64_t group_size, const int32_t* group_bits,
                              int64_t n_groups, bool has_zeros, bool has_perm) {
  const int64_t n_pad = tasa_num_col_blocks(N) * TASA_COL_BLOCK;
  int64_t code_bits = 0;
  for (int64_t g = 0; g < n_groups; ++g) code_bits += (int64_t)group_bits[g] * group_size * n_pad;
  const int64_t scale_bits = 16 * n_groups * N * (has_zeros ? 2 : 1);
  const int64_t table_bits = 32 * TASA_GTABLE_COLS * n_groups;
  const int64_t perm_bits = has_perm ? 32 * K : 0;
  return code_bits + scale_bits + table_bits + perm_bits;
}

// Validates a group table against K / group_size and returns the total packed rows in *rows.
// Checks: supported bits, sorted ascending, cumulative offsets, logical groups a permutation.
// `seen` is caller scratch of n_groups bytes.
inline int tasa_check_gtable(const int32_t* gtable, int64_t n_groups, int64_t group_size,
                             uint8_t* seen, int64_t* rows) {
  if (group_size <= 0 || group_size % TASA_TILE_K != 0) return TASA_ERR_GROUP_SIZE;
  for (int64_t g = 0; g < n_groups; ++g) seen[g] = 0;
  int64_t off = 0;
  int prev_bits = 0;
  for (int64_t j = 0; j < n_groups; ++j) {
    const int32_t b = gtable[j * 3 + 0], o = gtable[j * 3 + 1], lg = gtable[j * 3 + 2];
    if (!tasa_bits_supported(b)) return TASA_ERR_BITS;
    if (b < prev_bits || o != off || lg < 0 || lg >= n_groups || seen[lg]) return TASA_ERR_GTABLE;
    seen[lg] = 1;
    prev_bits = b;
    off += tasa_group_rows(b, group_size);
  }
  *rows = off;
  return TASA_OK;
}

// Checks that perm (int32 [K]) is a permutation of [0, K). `seen` is caller scratch of K bytes.
inline int tasa_check_perm(const int32_t* perm, int64_t K, uint8_t* seen) {
  for (int64_t k = 0; k < K; ++k) seen[k] = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t p = perm[k];
    if (p < 0 || p >= K || seen[p]) return TASA_ERR_PERM;
    seen[p] = 1;
  }
  return TASA_OK;
}

// Reads the code of tile row i (0..31) of one column from the tile's b words (little-endian
// concatenation, code i at bits [b*i, b*i+b)). Reference unpacking used by scalar paths.
TASA_HD uint32_t tasa_tile_code(const uint32_t* words, int stride, int bits, int i) {
  const int bit = bits * i, w = bit >> 5, sh = bit & 31;
  uint64_t v = words[(int64_t)w * stride];
  if (sh + bits > 32) v |= (uint64_t)words[(int64_t)(w + 1) * stride] << 32;
  return (uint32_t)(v >> sh) & ((1u << bits) - 1u);
}

// ---- format version 2: the incoherence rotation ------------------------------------------------
// Rotation block of a group size: the largest power of two dividing it, at most
// TASA_HAD_MAX_BLOCK (groups of 128 -> 128, 96 -> 32, 64 -> 64).
TASA_HD int64_t tasa_hadamard_block(int64_t group_size) {
  if (group_size <= 0) return 0;
  const int64_t low = group_size & -group_size;
  return low < TASA_HAD_MAX_BLOCK ? low : TASA_HAD_MAX_BLOCK;
}

// Sign s_k of input channel k: +1 or -1 from the top bit of output k of splitmix64 seeded 0
// (z = (k + 1) * 0x9E3779B97F4A7C15, then splitmix64's two xor-shift-multiply rounds). A fixed
// function of k so no tensor is stored; tasa_ext.reference.hadamard_signs is its Python twin.
TASA_HD float tasa_hadamard_sign(int64_t k) {
  uint64_t z = ((uint64_t)k + 1u) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (z >> 63) ? -1.0f : 1.0f;
}
