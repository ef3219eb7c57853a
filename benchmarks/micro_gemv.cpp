// Per-tile cost of the CPU GEMV, torch-free (links the CMake library libtasa_kernels.a):
//   cmake -S . -B build/mb -DTASA_CUDA_COMPILE_CHECK=OFF && make -C build/mb tasa_kernels
//   g++ -O2 -fopenmp -Icsrc/include benchmarks/micro_gemv.cpp build/mb/libtasa_kernels.a -o mb
//   ./mb N K copies threads [xdt]   (env BITS=348 picks widths, HUGE=1 madvises huge pages)
// copies x matrix bytes above the last-level cache = DRAM streaming; 1 copy = cache-resident.
// microbench: per-tile cost of the CPU GEMV at each width, 1 thread, weights resident or streamed
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <random>
#include <omp.h>
#include <sys/mman.h>
#include "tasa/kernels.h"
#include "tasa/format.h"
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
// q copied into 2 MB-aligned memory, madvise(MADV_HUGEPAGE)d unless HUGE=0 (never freed: a
// benchmark's lifetime)
static uint32_t* huge_copy(const std::vector<uint32_t>& q) {
  const size_t nb = (q.size() * 4 + (2u << 20) - 1) & ~((size_t)(2u << 20) - 1);
  void* p = aligned_alloc(2u << 20, nb);
  if (atoi(getenv("HUGE"))) madvise(p, nb, MADV_HUGEPAGE);
  memcpy(p, q.data(), q.size() * 4);
  return (uint32_t*)p;
}
struct Mat { std::vector<uint32_t> q; uint32_t* qp = nullptr; std::vector<uint16_t> s; std::vector<int32_t> gt; int64_t R; };
static Mat make(int64_t N, int64_t K, int64_t G, const std::vector<int>& bits, std::mt19937& rng) {
  Mat m; int64_t ng = K / G; std::vector<int32_t> gb(ng);
  for (int64_t g = 0; g < ng; ++g) gb[g] = bits[g % bits.size()];
  m.gt.resize(ng * 3); tasa_make_gtable(gb.data(), ng, G, m.gt.data(), &m.R);
  std::vector<uint8_t> codes(N * K);
  for (int64_t n = 0; n < N; ++n) for (int64_t k = 0; k < K; ++k) codes[n * K + k] = rng() & ((1 << gb[k / G]) - 1);
  m.q.assign(((N + 15) / 16) * m.R * 16, 0);
  tasa_pack_cpu(codes.data(), N, K, m.gt.data(), G, m.R, m.q.data());
  m.s.assign(ng * N, 0x3c00);
  m.qp = getenv("HUGE") ? huge_copy(m.q) : m.q.data();
  return m;
}
// dependent add chain: 1 add/cycle -> frequency
static double ghz() {
  volatile long sink; long a = 0; const long n = 400000000;
  double t = now();
  for (long i = 0; i < n; ++i) { asm volatile("add $1, %0" : "+r"(a)); }
  t = now() - t; sink = a; (void)sink; return n / t / 1e9;
}
int main(int argc, char** argv) {
  int64_t N = argc > 1 ? atol(argv[1]) : 1024, K = argc > 2 ? atol(argv[2]) : 2048;
  int copies = argc > 3 ? atoi(argv[3]) : 1;
  int threads = argc > 4 ? atoi(argv[4]) : 1;
  int xdt = argc > 5 ? atoi(argv[5]) : TASA_BF16;
  omp_set_num_threads(threads);
  std::mt19937 rng(1);
  printf("freq ~%.2f GHz, isa %d, N %ld K %ld copies %d threads %d xdt %d\n", ghz(), tasa_cpu_isa(), N, K, copies, threads, xdt);
  std::vector<float> x(K); for (auto& v : x) v = (rng() % 2001) / 1000.f - 1.f;
  std::vector<uint16_t> xb(K); for (int64_t k = 0; k < K; ++k) { uint32_t u; memcpy(&u, &x[k], 4); xb[k] = u >> 16; }
  std::vector<float> y(N);
  const void* xp = xdt == TASA_BF16 ? (const void*)xb.data() : (const void*)x.data();
  std::vector<std::vector<int>> cfgs = {{2}, {3}, {3, 4}, {4}, {8}};
  if (getenv("BITS")) { cfgs.clear(); for (const char* c = getenv("BITS"); *c; ++c) if (*c != ',') cfgs.push_back({*c - '0'}); }
  for (auto& b : cfgs) {
    std::vector<Mat> ms; ms.push_back(make(N, K, 128, b, rng)); for (int c = 1; c < copies; ++c) { ms.push_back(ms[0]); if (!getenv("HUGE")) ms.back().qp = ms.back().q.data(); else { size_t nb = (ms[0].q.size()*4 + (2u<<20)-1) & ~((size_t)(2u<<20)-1); void* p = aligned_alloc(2u<<20, nb); if (atoi(getenv("HUGE"))) madvise(p, nb, MADV_HUGEPAGE); memcpy(p, ms[0].qp, ms[0].q.size()*4); ms.back().qp = (uint32_t*)p; } }
    double best = 1e9;
    for (int rep = 0; rep < 7; ++rep) {
      int it = 0; double t = now();
      while (now() - t < 0.15) { Mat& m = ms[it % copies]; tasa_gemm_cpu(xp, xdt, 1, m.qp, m.s.data(), nullptr, m.gt.data(), nullptr, N, K, 128, m.R, y.data()); ++it; }
      best = std::min(best, (now() - t) / it);
    }
    double bytes = ms[0].q.size() * 4.0 + ms[0].s.size() * 2;
    double tiles = (double)((N + 15) / 16) * (K / 32);
    printf("bits %-5s %8.1f us  %6.2f GB/s  %6.2f ns/tile/thread\n", b.size() > 1 ? "3/4" : std::to_string(b[0]).c_str(), best * 1e6, bytes / best / 1e9, best * 1e9 / tiles * threads);
  }
}
