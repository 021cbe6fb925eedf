// A/B of two versions of the 16-bit prefill GEMM's AVX2 tiles (llamaforge/kernels/qgemm_tiles.h), without
// building the extension: both headers compiled into one binary, called alternately (order swapped every
// round) on one thread, timed by thread CPU time; prints median / best GFLOP/s and whether the two give
// the same bits. Not run by the tests.
//
// Build (from the repository root; OLD.h e.g. `git show main:llamaforge/kernels/qgemm_tiles.h > /tmp/old.h`):
//   g++ -O3 -mavx2 -mfma -mf16c -ffp-contract=off -std=c++17 -Illamaforge/kernels \
//       -DTILES_A='"/tmp/old.h"' -DTILES_B='"qgemm_tiles.h"' benchmarks/gemm16_ab.cpp -o /tmp/gemm16_ab
// The AVX-512 tiles instead: add -DLFQ_AB_512=1 -mavx512f -mavx512bw -mavx512vl -mavx512bf16; there type 31 is BF16
// by vdpbf16ps and 30 its FMA emulation (the same bits: A = B = the same header compares the two paths' speed
// across runs; on the Sapphire Rapids-class VM of 2026-12-04 the emulation ran 10-18% faster, RESULTS.md).
// Run:  /tmp/gemm16_ab [M 128] [K 2048] [N 2048] [type 1 = F16 | 30 = BF16 | 31] [rounds 15]
#include <immintrin.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <type_traits>
#include <vector>

#include "qcommon.h"

#ifndef LFQ_AB_512
#define LFQ_AB_512 0
#endif
#define LFQ_GEMM_512 LFQ_AB_512
#define LFQ_GEMM_NS tiles_a
#include TILES_A
#undef LFQ_GEMM_NS
#define LFQ_GEMM_NS tiles_b
#include TILES_B
#undef LFQ_GEMM_NS

namespace {

double cpu_s() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

using Gemm = void (*)(const uint16_t*, int64_t, int64_t, int64_t, const float*, int64_t, float*, int64_t);

}  // namespace

int main(int argc, char** argv) {
  using namespace lfq;
  const int64_t M = argc > 1 ? atoll(argv[1]) : 128, K = argc > 2 ? atoll(argv[2]) : 2048, N = argc > 3 ? atoll(argv[3]) : 2048;
  const int qt = argc > 4 ? atoi(argv[4]) : 1, rounds = argc > 5 ? atoi(argv[5]) : 15;
  if (qt != 1 && qt != 30 && !(LFQ_AB_512 && qt == 31))
    return fprintf(stderr, "type: 1 (F16), 30 (BF16) or, AVX-512 only, 31 (BF16 by vdpbf16ps)\n"), 2;
#if LFQ_AB_512
  const Gemm gemm[2] = {qt == 1 ? tiles_a::gemm<T_F16> : qt == 30 ? tiles_a::gemm<T_BF16> : tiles_a::gemm<T_BF16, true>,
                        qt == 1 ? tiles_b::gemm<T_F16> : qt == 30 ? tiles_b::gemm<T_BF16> : tiles_b::gemm<T_BF16, true>};
#else
  const Gemm gemm[2] = {qt == 1 ? tiles_a::gemm<T_F16> : tiles_a::gemm<T_BF16>, qt == 1 ? tiles_b::gemm<T_F16> : tiles_b::gemm<T_BF16>};
#endif
  std::mt19937 g(1);
  std::normal_distribution<float> d(0, 1);
  std::vector<uint16_t> w(N * K);
  for (auto& v : w) {
    const float f = d(g) * 0.05f;
    uint32_t u;
    std::memcpy(&u, &f, 4);
    v = qt == 1 ? _cvtss_sh(f, 0) : static_cast<uint16_t>(u >> 16);
  }
  std::vector<float> x(M * K);  // BF16: bf16 values (any column order is a valid split layout here)
  for (auto& v : x) {
    v = d(g);
    uint32_t u;
    std::memcpy(&u, &v, 4);
    if (qt != 1) u &= 0xFFFF0000u, std::memcpy(&v, &u, 4);
  }
  std::vector<float> y[2] = {std::vector<float>(M * N), std::vector<float>(M * N)};
  std::vector<double> t[2];
  if (qt != 1) _mm_setcsr(_mm_getcsr() | 0x8040u);  // as Bf16Mode: DAZ / FTZ
  for (int r = 0; r < rounds; ++r)
    for (int j = 0; j < 2; ++j) {
      const int v = (j + r) % 2;
      const double t0 = cpu_s();
      gemm[v](w.data(), 0, N, K, x.data(), M, y[v].data(), N);
      t[v].push_back(cpu_s() - t0);
    }
  const double gflop = 2.0 * M * N * K * 1e-9;
  printf("M=%lld K=%lld N=%lld %s:", (long long)M, (long long)K, (long long)N, qt == 1 ? "F16" : qt == 30 ? "BF16" : "BF16 vdpbf16ps");
  for (int v = 0; v < 2; ++v) {
    std::sort(t[v].begin(), t[v].end());
    printf("  %s %.1f / %.1f", v ? "B" : "A", gflop / t[v][rounds / 2], gflop / t[v][0]);
  }
  printf(" GFLOP/s (median / best of %d)  same bits: %s\n", rounds, std::memcmp(y[0].data(), y[1].data(), 4 * M * N) ? "NO" : "yes");
}
