// The 16-bit weight prefill GEMM's translation unit: qgemm_tiles.h built twice, plain AVX2 and AVX-512
// (with AVX512_BF16 for vdpbf16ps, used only where the CPU has it) under a target pragma, the build picked at run time (qgemm.h); and
// the BF16 weights' activation rounding. No torch headers, so this compiles in parallel with the bindings.

#include "qgemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "qcommon.h"

#define LFQ_GEMM_NS gemm_avx2
#define LFQ_GEMM_512 0
#include "qgemm_tiles.h"
#undef LFQ_GEMM_NS
#undef LFQ_GEMM_512
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bf16")
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

bool gemm_bf16dot_supported() {
  static const bool ok = gemm_avx512_supported() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

bool& gemm_bf16dot_enabled() {
  static bool on = gemm_bf16dot_supported() && gemm_avx512_enabled();
  return on;
}

// Off on Intel CPUs: on the Sapphire Rapids-class VM of 2026-12-04 vdpbf16ps ran at half the zmm FMA's rate in
// flops (110-123 against 218-245 GFLOP/s, one core), so the GEMM's exact FMA emulation of it was the faster
// (M 128 x K 2048 x N 2048, one thread: 138.5 against 101.1 GFLOP/s; the 1B shape's BF16 prefill of 128 tokens
// 44.7 -> 54.2 tok/s at 1 thread, 83.5 -> 99.1 at 2), while at decode, held by memory, vdpbf16ps stayed ~3%
// ahead. On AMD (Zen 4) vdpbf16ps does twice an FMA's work per instruction and stays on.
bool& gemm_bf16dot_prefill() {
  static bool on = gemm_bf16dot_supported() && !intel_cpu();
  return on;
}

namespace {

// torch's round_to_nearest_even to bf16, as the float32 with a zero low half: NaN -> 0x7FC0, else add
// half an ulp of bf16 (ties to even) and cut.
inline float round_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = v != v ? 0x7FC00000u : (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

inline uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace

void bf16_split_rows(const float* x, int64_t M, int64_t K, float* xs) {
  const int64_t k16 = K / 16 * 16;
  for (int64_t m = 0; m < M; ++m) {
    const float* in = x + m * K;
    float* out = xs + m * K;
    for (int64_t k = 0; k < k16; k += 16)
      for (int j = 0; j < 8; ++j) {  // step k / 16: odd columns, then even ones
        out[k + j] = round_bf16(in[k + 2 * j + 1]);
        out[k + 8 + j] = round_bf16(in[k + 2 * j]);
      }
    for (int64_t k = k16; k < K; ++k) out[k] = round_bf16(in[k]);
  }
}

void bf16_rows(const float* xs, int64_t M, int64_t K, uint16_t* xb) {
  const int64_t k16 = K / 16 * 16;
  for (int64_t m = 0; m < M; ++m) {
    const float* in = xs + m * K;
    uint16_t* out = xb + m * K;
    for (int64_t k = 0; k < k16; k += 16)
      for (int j = 0; j < 8; ++j) {
        out[k + 2 * j + 1] = bf16_bits(in[k + j]);
        out[k + 2 * j] = bf16_bits(in[k + 8 + j]);
      }
    for (int64_t k = k16; k < K; ++k) out[k] = bf16_bits(in[k]);
  }
}

void gemm_float(int64_t qt, const void* w, int64_t n0, int64_t n1, int64_t K, const float* x, int64_t M, float* y,
                int64_t N) {
  const uint16_t* w16 = static_cast<const uint16_t*>(w);
  const bool wide = gemm_avx512_enabled();
  if (qt == T_F16) {
    if (wide) gemm_avx512::gemm<T_F16>(w16, n0, n1, K, x, M, y, N);
    else gemm_avx2::gemm<T_F16>(w16, n0, n1, K, x, M, y, N);
  } else {  // vdpbf16ps, or its emulation in 512- or 256-bit tiles (the same bits)
    if (wide && gemm_bf16dot_enabled() && gemm_bf16dot_prefill()) gemm_avx512::gemm<T_BF16, true>(w16, n0, n1, K, x, M, y, N);
    else if (wide) gemm_avx512::gemm<T_BF16>(w16, n0, n1, K, x, M, y, N);
    else gemm_avx2::gemm<T_BF16>(w16, n0, n1, K, x, M, y, N);
  }
}

}  // namespace lfq
