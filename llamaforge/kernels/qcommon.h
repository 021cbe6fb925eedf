// Shared helpers of the quantized matmul kernels: GGML type ids, AVX2 bit tricks, and the two int8
// quantizations of activation rows: blocks of 32 with a float scale d and s = d * sum(q) (as llama.cpp's
// Q8_1, for Q4_0 / Q4_1 / Q5_x / Q8_0 weights), and blocks of 256 with one float d and int16 sums per 16
// (llama.cpp's Q8_K, for the K-quants: their sub-block scales then multiply integer sums). Torch-free, so
// these headers compile quickly.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace lfq {

// Whether the CPU is an Intel one (GCC's cpuid reading, as the __builtin_cpu_supports checks): some defaults
// measured per vendor follow it (the x8 tiles' prefetch distance, the prefill GEMM's BF16 path).
inline bool intel_cpu() { return __builtin_cpu_is("intel"); }

// GGML type ids (gguf.GGMLQuantizationType values).
constexpr int64_t T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8;
constexpr int64_t T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14;
// Plain float weights (no blocks): the kernels convert them on the fly and multiply in float32.
constexpr int64_t T_F32 = 0, T_F16 = 1, T_BF16 = 30;
inline bool is_float_type(int64_t qt) { return qt == T_F32 || qt == T_F16 || qt == T_BF16; }

struct TypeInfo {
  int64_t block;  // weights per block
  int64_t bytes;  // bytes per block
};

inline TypeInfo type_info(int64_t qt) {
  switch (qt) {
    case T_Q4_0: return {32, 18};
    case T_Q4_1: return {32, 20};
    case T_Q5_0: return {32, 22};
    case T_Q5_1: return {32, 24};
    case T_Q8_0: return {32, 34};
    case T_Q4_K: return {256, 144};
    case T_Q5_K: return {256, 176};
    case T_Q6_K: return {256, 210};
    case T_F32: return {1, 4};
    case T_F16: return {1, 2};
    case T_BF16: return {1, 2};
    default: return {0, 0};
  }
}

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float bf16(const uint8_t* p) {
  uint32_t b = 0;
  std::memcpy(reinterpret_cast<uint8_t*>(&b) + 2, p, 2);
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
  return _mm_cvtsi128_si32(s);
}

// 16 bytes of packed nibbles -> 32 bytes in element order (low nibbles are elements 0..15).
inline __m256i nibbles(const uint8_t* p) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i b = _mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
  return _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
}

// 32 bits -> 32 bytes, 0x10 where the bit is set (the fifth bit of Q5_0/Q5_1).
inline __m256i fifth_bits(const uint8_t* p) {
  uint32_t x32;
  std::memcpy(&x32, p, 4);
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                         0x0101010101010101, 0x0000000000000000);
  __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(x32)), shuf);
  bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  bytes = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
  return _mm256_and_si256(bytes, _mm256_set1_epi8(0x10));
}

// Q4_K / Q5_K: 8 six-bit scales and mins packed in 12 bytes.
inline void scale_min_k4(const uint8_t* q, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = q[j] & 63;
    mn[j] = q[j + 4] & 63;
  }
  for (int j = 4; j < 8; ++j) {
    sc[j] = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    mn[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// ---------------------------------------------------------------------------------------------
// Activations: int8 blocks of 32 with a float scale d and s = d * sum(q); and/or the Q8_K form.

struct Act {
  const int8_t* q;   // (M, K)
  const float* d;    // (M, nb)
  const float* s;    // (M, nb)
  int64_t K;
  int64_t nb;
  // The Q8_K form (K-quant weights; null where no weight needs it): int8 (M, K), one float d per 256
  // columns (M, K / 256), the int16 sums of q per 16 columns (M, K / 16).
  const int8_t* kq = nullptr;
  const float* kd = nullptr;
  const int16_t* kbs = nullptr;

  // Rows [m, ...) of this one.
  Act from_row(int64_t m) const {
    const int64_t nk = K / 256;
    return Act{q ? q + m * K : nullptr, d ? d + m * nb : nullptr, s ? s + m * nb : nullptr, K, nb,
               kq ? kq + m * K : nullptr, kd ? kd + m * nk : nullptr, kbs ? kbs + m * (K / 16) : nullptr};
  }
};

// The activation forms a weight type reads: the blocks of 32 (ACT_Q8_32) or Q8_K's of 256 (ACT_Q8_K).
constexpr int ACT_Q8_32 = 1, ACT_Q8_K = 2;
inline bool reads_q8k(int64_t qt) { return qt == T_Q4_K || qt == T_Q5_K || qt == T_Q6_K; }
inline int act_form(int64_t qt) { return is_float_type(qt) ? 0 : reads_q8k(qt) ? ACT_Q8_K : ACT_Q8_32; }

// Q8_K (ggml-quants.c quantize_row_q8_K_ref, the same float operations): per 256 values, max = the first value
// of the largest magnitude amax, iscale = -127 / max, q = min(127, round_half_even(iscale * x)) (ggml's
// nearest_int), d = 1 / iscale; all zero where amax is 0. bsums: the sums of q per 16.
inline void quantize_rows_q8k(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int16_t* bs) {
  const int64_t nb = K / 256;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  constexpr int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* p = x + m * K + b * 256;
      int8_t* qo = q + m * K + b * 256;
      int16_t* so = bs + m * (K / 16) + b * 16;
      __m256 mx = _mm256_setzero_ps();
      for (int j = 0; j < 256; j += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(p + j), absmask));
      __m128 h = _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float amax = _mm_cvtss_f32(h);
      if (!(amax > 0.0f)) {  // all zero (a NaN amax quantizes to zeros as well, not to garbage)
        std::memset(qo, 0, 256);
        std::memset(so, 0, 32);
        d[m * nb + b] = 0.0f;
        continue;
      }
      int j0 = 0;
      while (j0 < 255 && std::fabs(p[j0]) != amax) ++j0;  // amax is one of the |x|: the first of them
      const float iscale = -127.0f / p[j0];
      const __m256 id = _mm256_set1_ps(iscale);
      const __m256i top = _mm256_set1_epi32(127);
      for (int j = 0; j < 256; j += 32) {
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(p + j), id), rnd));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(p + j + 8), id), rnd));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(p + j + 16), id), rnd));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(p + j + 24), id), rnd));
        i0 = _mm256_min_epi32(i0, top);
        i1 = _mm256_min_epi32(i1, top);
        i2 = _mm256_min_epi32(i2, top);
        i3 = _mm256_min_epi32(i3, top);
        so[j / 16] = static_cast<int16_t>(hsum_i32(_mm256_add_epi32(i0, i1)));
        so[j / 16 + 1] = static_cast<int16_t>(hsum_i32(_mm256_add_epi32(i2, i3)));
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qo + j), _mm256_permutevar8x32_epi32(packed, perm));
      }
      d[m * nb + b] = 1.0f / iscale;
    }
  }
}

inline void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* d, float* s) {
  const int64_t nb = K / 32;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* p = x + m * K + b * 32;
      __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8);
      __m256 v2 = _mm256_loadu_ps(p + 16), v3 = _mm256_loadu_ps(p + 24);
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
      __m128 h = _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float amax = _mm_cvtss_f32(h);
      const float dd = amax / 127.0f;
      const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
      constexpr int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, id), rnd));
      __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, id), rnd));
      __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, id), rnd));
      __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, id), rnd));
      const int32_t sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
      __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
      packed = _mm256_permutevar8x32_epi32(packed, perm);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + m * K + b * 32), packed);
      d[m * nb + b] = dd;
      s[m * nb + b] = dd * static_cast<float>(sum);
    }
  }
}

}  // namespace lfq
