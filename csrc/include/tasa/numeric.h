// Scalar fp16 / bf16 <-> fp32 conversions (torch-free, exact IEEE semantics, round-to-nearest-even).
#pragma once
#include <stdint.h>
#include <string.h>

namespace tasa {

inline float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (man << 13));   // Inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal half: value = man * 2^-24
    const float v = (float)man * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t au = u & 0x7FFFFFFFu;
  if (au >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (au > 0x7F800000u ? 0x200u : 0u));
  if (au >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);   // rounds to >= 65520 -> Inf
  if (au < 0x38800000u) {                                      // subnormal or zero half
    const float v = bits_to_float(au) * 16777216.0f;             // scale by 2^24
    uint32_t m = (uint32_t)v;                                    // truncate
    const float rem = v - (float)m;
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return (uint16_t)(sign | m);
  }
  uint32_t r = au + 0xC8000FFFu + ((au >> 13) & 1u);           // rebias exponent, round to even
  return (uint16_t)(sign | (r >> 13));
}

inline float bf16_to_float(uint16_t b) { return bits_to_float((uint32_t)b << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

inline bool half_is_finite(uint16_t h) { return (h & 0x7C00u) != 0x7C00u; }

}  // namespace tasa
