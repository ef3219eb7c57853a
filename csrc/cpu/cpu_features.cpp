#include "tasa/kernels.h"

static int g_isa_cap = -1;   // -1: no cap (use what the CPU has)

#if defined(__x86_64__)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
// AMX-TILE and AMX-BF16 (CPUID.7.0:EDX bits 24, 22), the tile state enabled by the OS (XCR0
// bits 17-18) and, on Linux, this process's permission to use it (arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: without it the first tile instruction faults).
static bool amx_usable() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22)))
    return false;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;     // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;
#if defined(__linux__)
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
  return false;
#endif
}
#else
static bool amx_usable() { return false; }
#endif

int tasa_cpu_isa_detected(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  // (libgcc also checks that the OS saves the zmm state before reporting avx512*.)
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bf16"))
    return !(__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi2"))
               ? TASA_ISA_AVX512 : amx_usable() ? TASA_ISA_AMX : TASA_ISA_AVX512_VNNI;
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
