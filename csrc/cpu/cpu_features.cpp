#include "tasa/kernels.h"

static int g_isa_cap = -1;   // -1: no cap (use what the CPU has)

int tasa_cpu_isa_detected(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  // (libgcc also checks that the OS saves the zmm state before reporting avx512*.)
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bf16"))
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi2")
               ? TASA_ISA_AVX512_VNNI : TASA_ISA_AVX512;
  if (avx2) return TASA_ISA_AVX2;
#endif
  return TASA_ISA_SCALAR;
}

int tasa_cpu_isa(void) {
  static const int detected = tasa_cpu_isa_detected();
  return g_isa_cap >= 0 && g_isa_cap < detected ? g_isa_cap : detected;
}

int tasa_cpu_set_isa(int isa) {
  if (isa < 0) { g_isa_cap = -1; return TASA_OK; }
  if (isa > tasa_cpu_isa_detected()) return TASA_ERR_SHAPE;
  g_isa_cap = isa;
  return TASA_OK;
}
