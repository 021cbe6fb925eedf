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

// 8 KiB, as the float tiles' (qmatmul.cpp): on the Zen 5 VM (AVX-512 VNNI tiles, 1 thread, 1B shapes, the
// weights in the x8 cache's file pages) a decode step took 6-17% less time with it (Q4_0 24.2 -> 20.7 ms, Q5_K_M
// 28.2 -> 23.4, Q6_K 30.7 -> 27.0, Q8_0 37.6 -> 35.4; the AVX2 tiles Q4_0 -8%, Q4_K_M -14%; the default
// model 5.2 -> 4.9), and at 2 threads, where the two cores share the memory bus, within noise of none
// (benchmarks/RESULTS.md, "Eighth session").
int64_t& x8_prefetch_bytes() {
  static int64_t bytes = 8192;
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
