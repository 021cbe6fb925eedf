// The kernels translation unit: GGUF-layout row kernels (qrows.h) and x8 tiles (qx8_tiles.h, built
// twice: plain AVX2, and AVX-512 VNNI under a target pragma, chosen at run time by the caller).
// No torch headers here, so this compiles in parallel with the bindings in qmatmul.cpp.

#include "qkernels.h"

#include <vector>
#include "qcommon.h"
#include "qrows.h"
#include "qx8.h"

#define LFQ_TILE_NS tiles_avx2
#define LFQ_TILE_VNNI 0
#include "qx8_tiles.h"
#undef LFQ_TILE_NS
#undef LFQ_TILE_VNNI
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define LFQ_TILE_NS tiles_vnni
#define LFQ_TILE_VNNI 1
#include "qx8_tiles.h"
#undef LFQ_TILE_NS
#undef LFQ_TILE_VNNI
#pragma GCC pop_options

namespace lfq {

// What it does depends on the core, so the default follows the CPU's vendor: 1 KiB ahead on Intel, off elsewhere.
// On the Zen 5 VM of 2026-12-01 (AVX-512 VNNI tiles, 1 thread, 1B shapes, the weights in the x8 cache's file
// pages) 8 KiB ahead took 6-17% off a decode step (Q4_0 24.2 -> 20.7 ms, Q6_K 30.7 -> 27.0; 2 threads within
// noise); on the Zen 4 VM of 2026-12-02 the same 8 KiB made every type slower at 1 thread, the K-quants most
// (Q4_K_M 28.5 -> 40.8 ms, Q5_K_M 41.8 -> 56.3, Q6_K 38.0 -> 61.1, Q4_0 29.1 -> 30.9; an L2 hint (T2) instead
// of T0 lost less and gained nothing). On the Intel Sapphire Rapids-class VM of 2026-12-04, whose core streams
// ~19 GB/s alone against a Zen 4's ~30, 1 KiB ahead took 12-18% off every x8 type's 1B step at 1 and 2 threads,
// in the VNNI and the AVX2 tiles alike (2 threads, VNNI: Q4_0 27.9 -> 24.4 ms, Q4_K_M 30.4 -> 26.3, Q5_K_M
// 35.9 -> 29.7, Q6_K 38.2 -> 32.8; 3B Q4_K_M 81.3 -> 71.1), 512 B-2 KiB about as much, 4 KiB and more lost.
// benchmarks/RESULTS.md, "Eighth session", "Ninth session" and "Seventeenth session".
int64_t& x8_prefetch_bytes() {
  static int64_t bytes = intel_cpu() ? 1024 : 0;
  return bytes;
}

void matmul_gguf(int64_t qt, const uint8_t* w, int64_t bpr, int64_t n0, int64_t n1, int64_t K, const Act& a,
                 int64_t M, float* y, int64_t N) {
  matmul_dispatch(qt, w, bpr, n0, n1, K, a, M, y, N);
}

void matmul_x8_avx2(int64_t qt, const uint8_t* w, int64_t g0, int64_t g1, int64_t N, int64_t K, const Act& a,
                    int64_t M, float* y) {
  tiles_avx2::dispatch(qt, w, g0, g1, N, K, a, M, y);
}

void matmul_x8_vnni(int64_t qt, const uint8_t* w, int64_t g0, int64_t g1, int64_t N, int64_t K, const Act& a,
                    int64_t M, float* y) {
  tiles_vnni::dispatch(qt, w, g0, g1, N, K, a, M, y);
}

void dequant_any(int64_t layout, int64_t qt, const uint8_t* w, int64_t bpr, int64_t n, int64_t K, float* out) {
  if (layout == LAYOUT_X8)
    dequant_row_x8(qt, w, n, K, out);
  else
    dequant_row(qt, w + n * bpr, K, out);
}

}  // namespace lfq
