// The 16-bit weight prefill GEMM's translation unit: qgemm_tiles.h built twice, plain AVX2 and AVX-512
// under a target pragma, the build picked at run time (qgemm.h). No torch headers, so this compiles in
// parallel with the bindings.

#include "qgemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "qcommon.h"

#define LFQ_GEMM_NS gemm_avx2
#define LFQ_GEMM_512 0
#include "qgemm_tiles.h"
#undef LFQ_GEMM_NS
#undef LFQ_GEMM_512
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl")
#define LFQ_GEMM_NS gemm_avx512
#define LFQ_GEMM_512 1
#include "qgemm_tiles.h"
#undef LFQ_GEMM_NS
#undef LFQ_GEMM_512
#pragma GCC pop_options

namespace lfq {

bool gemm_avx512_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  return ok;
}

bool& gemm_avx512_enabled() {
  static bool on = [] {
    const char* env = std::getenv("LLAMAFORGE_X8_TILES");
    return gemm_avx512_supported() && !(env != nullptr && std::strcmp(env, "avx2") == 0);
  }();
  return on;
}

void gemm_float(int64_t qt, const void* w, int64_t n0, int64_t n1, int64_t K, const float* x, int64_t M, float* y,
                int64_t N) {
  const uint16_t* w16 = static_cast<const uint16_t*>(w);
  const bool wide = gemm_avx512_enabled();
  if (qt == T_F16) {
    if (wide) gemm_avx512::gemm<T_F16>(w16, n0, n1, K, x, M, y, N);
    else gemm_avx2::gemm<T_F16>(w16, n0, n1, K, x, M, y, N);
  } else {
    if (wide) gemm_avx512::gemm<T_BF16>(w16, n0, n1, K, x, M, y, N);
    else gemm_avx2::gemm<T_BF16>(w16, n0, n1, K, x, M, y, N);
  }
}

}  // namespace lfq
