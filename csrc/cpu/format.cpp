// Format helpers and the CPU pack / unpack / dequant kernels (scalar: they run once per
// matrix, at quantization time, and are memory-trivial next to GPTQ).
#include <stdlib.h>
#include <string.h>
#include <vector>

#include "tasa/kernels.h"
#include "tasa/numeric.h"

int tasa_make_gtable(const int32_t* group_bits, int64_t n_groups, int64_t group_size,
                     int32_t* gtable, int64_t* rows) {
  if (group_size <= 0 || group_size % TASA_TILE_K != 0) return TASA_ERR_GROUP_SIZE;
  for (int64_t g = 0; g < n_groups; ++g)
    if (!tasa_bits_supported(group_bits[g])) return TASA_ERR_BITS;
  int64_t j = 0, off = 0;
  static const int kBits[4] = {2, 3, 4, 8};
  for (int bi = 0; bi < 4; ++bi)                       // stable sort by bits: one pass per width
    for (int64_t g = 0; g < n_groups; ++g)
      if (group_bits[g] == kBits[bi]) {
        gtable[j * 3 + 0] = kBits[bi];
        gtable[j * 3 + 1] = (int32_t)off;
        gtable[j * 3 + 2] = (int32_t)g;
        off += tasa_group_rows(kBits[bi], group_size);
        ++j;
      }
  *rows = off;
  return TASA_OK;
}

int tasa_check_layout_cpu(const int32_t* gtable, const int32_t* perm, int64_t K,
                          int64_t group_size, int64_t R) {
  if (group_size <= 0 || group_size % TASA_TILE_K != 0 || K % group_size != 0)
    return TASA_ERR_GROUP_SIZE;
  const int64_t n_groups = K / group_size;
  std::vector<uint8_t> seen(n_groups);
  int64_t rows = 0;
  const int st = tasa_check_gtable(gtable, n_groups, group_size, seen.data(), &rows);
  if (st != TASA_OK) return st;
  if (rows != R) return TASA_ERR_SHAPE;
  if (perm) {
    std::vector<uint8_t> pseen(K);
    return tasa_check_perm(perm, K, pseen.data());
  }
  return TASA_OK;
}

int tasa_pack_cpu(const uint8_t* codes, int64_t N, int64_t K, const int32_t* gtable,
                  int64_t group_size, int64_t R, uint32_t* qweight) {
  int st = tasa_check_layout_cpu(gtable, nullptr, K, group_size, R);
  if (st != TASA_OK) return st;
  const int64_t n_groups = K / group_size, NB = tasa_num_col_blocks(N), tiles = group_size / 32;
  memset(qweight, 0, sizeof(uint32_t) * NB * R * TASA_COL_BLOCK);
  int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad)
  for (int64_t n = 0; n < N; ++n) {
    uint32_t* col = qweight + (n / 16) * R * 16 + (n % 16);
    for (int64_t j = 0; j < n_groups; ++j) {
      const int b = gtable[j * 3 + 0];
      const int64_t off = gtable[j * 3 + 1], lg = gtable[j * 3 + 2];
      const uint32_t maxq = (1u << b) - 1u;
      for (int64_t t = 0; t < tiles; ++t) {
        const uint8_t* c = codes + n * K + lg * group_size + t * 32;
        uint32_t* words = col + (off + t * b) * 16;
        for (int i = 0; i < 32; ++i) {
          const uint32_t q = c[i];
          if (q > maxq) { bad = 1; continue; }
          const int bit = b * i, w = bit >> 5, sh = bit & 31;
          words[w * 16] |= q << sh;
          if (sh + b > 32) words[(w + 1) * 16] |= q >> (32 - sh);
        }
      }
    }
  }
  return bad ? TASA_ERR_CODE_RANGE : TASA_OK;
}

int tasa_unpack_cpu(const uint32_t* qweight, const int32_t* gtable, int64_t N, int64_t K,
                    int64_t group_size, int64_t R, uint8_t* codes) {
  int st = tasa_check_layout_cpu(gtable, nullptr, K, group_size, R);
  if (st != TASA_OK) return st;
  const int64_t n_groups = K / group_size, tiles = group_size / 32;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const uint32_t* col = qweight + (n / 16) * R * 16 + (n % 16);
    for (int64_t j = 0; j < n_groups; ++j) {
      const int b = gtable[j * 3 + 0];
      const int64_t off = gtable[j * 3 + 1], lg = gtable[j * 3 + 2];
      for (int64_t t = 0; t < tiles; ++t) {
        uint8_t* c = codes + n * K + lg * group_size + t * 32;
        for (int i = 0; i < 32; ++i) c[i] = (uint8_t)tasa_tile_code(col + (off + t * b) * 16, 16, b, i);
      }
    }
  }
  return TASA_OK;
}

namespace {
// Dequantizes column n of the packed matrix (W[n, :], input-channel order) into Wn [K].
// Returns false on a NaN/Inf scale or zero. Shared by dequant (every column) and embed (the
// columns a batch of token ids names).
bool dequant_column(const uint32_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                    const int32_t* gtable, const int32_t* perm, int64_t N, int64_t K,
                    int64_t group_size, int64_t R, int64_t n, float* Wn) {
  const int64_t n_groups = K / group_size, tiles = group_size / 32;
  const uint32_t* col = qweight + (n / 16) * R * 16 + (n % 16);
  bool ok = true;
  for (int64_t j = 0; j < n_groups; ++j) {
    const int b = gtable[j * 3 + 0];
    const int64_t off = gtable[j * 3 + 1], lg = gtable[j * 3 + 2];
    const uint16_t sh = scales[j * N + n];
    const uint16_t zh = zeros ? zeros[j * N + n] : 0;
    if (!tasa::half_is_finite(sh) || !tasa::half_is_finite(zh)) { ok = false; continue; }
    // (q - z) * s in double, rounded once: bit-identical to the spec's exact value rounded
    // to fp32 (q - z alone may need more than 24 bits when z is tiny).
    const double s = tasa::half_to_float(sh);
    const double z = zeros ? tasa::half_to_float(zh) : (double)(1 << (b - 1));
    for (int64_t t = 0; t < tiles; ++t)
      for (int i = 0; i < 32; ++i) {
        const int64_t r = lg * group_size + t * 32 + i;
        const double q = tasa_tile_code(col + (off + t * b) * 16, 16, b, i);
        Wn[perm ? perm[r] : r] = (float)((q - z) * s);
      }
  }
  return ok;
}
}  // namespace

int tasa_dequant_cpu(const uint32_t* qweight, const uint16_t* scales, const uint16_t* zeros,
                     const int32_t* gtable, const int32_t* perm, int64_t N, int64_t K,
                     int64_t group_size, int64_t R, float* W) {
  int st = tasa_check_layout_cpu(gtable, perm, K, group_size, R);
  if (st != TASA_OK) return st;
  int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad)
  for (int64_t n = 0; n < N; ++n)
    if (!dequant_column(qweight, scales, zeros, gtable, perm, N, K, group_size, R, n, W + n * K))
      bad = 1;
  return bad ? TASA_ERR_NONFINITE : TASA_OK;
}

int tasa_embed_cpu(const int64_t* ids, int64_t n_ids, const uint32_t* qweight,
                   const uint16_t* scales, const uint16_t* zeros, const int32_t* gtable,
                   const int32_t* perm, int64_t N, int64_t K, int64_t group_size, int64_t R,
                   float* out) {
  int st = tasa_check_layout_cpu(gtable, perm, K, group_size, R);
  if (st != TASA_OK) return st;
  for (int64_t i = 0; i < n_ids; ++i)          // every id checked before any row is read
    if (ids[i] < 0 || ids[i] >= N) return TASA_ERR_INDEX;
  int bad = 0;
  // One row is K codes read with a 64-byte stride (one word per packed row of its column
  // block): ~9 KB of cache lines per token at K = 576, 8 bits -- a lookup, never the decode's
  // bottleneck, so a scalar loop; threads only pay off for a prefill's hundreds of ids.
#pragma omp parallel for schedule(static) reduction(| : bad) if (n_ids * K >= (1 << 16))
  for (int64_t i = 0; i < n_ids; ++i)
    if (!dequant_column(qweight, scales, zeros, gtable, perm, N, K, group_size, R, ids[i],
                        out + i * K))
      bad = 1;
  return bad ? TASA_ERR_NONFINITE : TASA_OK;
}
