// Element types of the KV cache in the fused decode step (llamaforge/model/kv_types.py is the PyTorch twin and
// defines them): how one row (one position of one KV head, hd values) is stored and loaded.
//   F32   hd floats;  F16 / BF16   hd halves (F16C conversion; bf16 by shifting), rounded to nearest even
//   Q8_0  hd / 32 blocks of ggml's block_q8_0: an fp16 scale d, then 32 int8 q with x ~= d * q, where
//         d = amax / 127 and q = round_half_even(x * (127 / amax)) (ggml's AVX2 quantize_row_q8_0)
// Stores are bit-identical to kv_types.encode. Torch-free, as the other headers.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "qcommon.h"

namespace lfq {

enum class KvType : int { F32 = 0, F16 = 1, BF16 = 2, Q8_0 = 3 };

constexpr int64_t KV_Q8_BLOCK = 32, KV_Q8_BYTES = 34;

inline int64_t kv_row_bytes(KvType t, int64_t hd) {
  switch (t) {
    case KvType::F32: return 4 * hd;
    case KvType::F16:
    case KvType::BF16: return 2 * hd;
    case KvType::Q8_0: return hd / KV_Q8_BLOCK * KV_Q8_BYTES;
  }
  return 0;
}

// Loads of a row's values as float32: 8 from element i on (load8), or element i alone (load1).
struct KvF32 {
  static __m256 load8(const uint8_t* row, int64_t i) { return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + i); }
  static float load1(const uint8_t* row, int64_t i) {
    float f;
    std::memcpy(&f, row + 4 * i, 4);
    return f;
  }
};

struct KvF16 {
  static __m256 load8(const uint8_t* row, int64_t i) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i)));
  }
  static float load1(const uint8_t* row, int64_t i) { return fp16(row + 2 * i); }
};

struct KvBF16 {
  static __m256 load8(const uint8_t* row, int64_t i) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  static float load1(const uint8_t* row, int64_t i) { return bf16(row + 2 * i); }
};

// Q8_0: element i is d * q of its block (a float32 product, as kv_types.decode); 8 values never cross a block.
struct KvQ8 {
  static __m256 load8(const uint8_t* row, int64_t i) {
    const uint8_t* b = row + (i / KV_Q8_BLOCK) * KV_Q8_BYTES;
    const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + i % KV_Q8_BLOCK));
    return _mm256_mul_ps(_mm256_set1_ps(fp16(b)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
  }
  static float load1(const uint8_t* row, int64_t i) {
    const uint8_t* b = row + (i / KV_Q8_BLOCK) * KV_Q8_BYTES;
    return fp16(b) * static_cast<float>(static_cast<int8_t>(b[2 + i % KV_Q8_BLOCK]));
  }
};

inline uint16_t to_bf16(float f) {  // round to nearest even; NaN stays a (quiet) NaN, as torch's conversion
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// One block of 32 floats -> block_q8_0 (34 bytes at out).
inline void quantize_q8_0_block(const float* p, uint8_t* out) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8), v2 = _mm256_loadu_ps(p + 16),
               v3 = _mm256_loadu_ps(p + 24);
  const __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                  _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
  __m128 h = _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float amax = _mm_cvtss_f32(h);
  const uint16_t d = _cvtss_sh(amax / 127.0f, _MM_FROUND_TO_NEAREST_INT);
  std::memcpy(out, &d, 2);
  const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
  constexpr int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, id), rnd));
  const __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, id), rnd));
  const __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, id), rnd));
  const __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, id), rnd));
  const __m256i packed = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3)), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2), packed);
}

// Store the hd floats x as one row of type t at row.
inline void kv_store_row(KvType t, const float* x, int64_t hd, uint8_t* row) {
  switch (t) {
    case KvType::F32: std::memcpy(row, x, 4 * hd); return;
    case KvType::F16: {
      int64_t i = 0;
      for (; i + 8 <= hd; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 2 * i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
      for (; i < hd; ++i) {
        const uint16_t h = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
        std::memcpy(row + 2 * i, &h, 2);
      }
      return;
    }
    case KvType::BF16:
      for (int64_t i = 0; i < hd; ++i) {
        const uint16_t h = to_bf16(x[i]);
        std::memcpy(row + 2 * i, &h, 2);
      }
      return;
    case KvType::Q8_0:
      for (int64_t b = 0; b < hd / KV_Q8_BLOCK; ++b) quantize_q8_0_block(x + b * KV_Q8_BLOCK, row + b * KV_Q8_BYTES);
      return;
  }
}

// sum over one block of q_a * q_b (two blocks' 32 int8), as 8 int32 lanes (ggml's mul_sum_i8_pairs).
inline __m256i dot_q8_block(const uint8_t* qa, const __m256i qb, const __m256i abs_qb) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa));
  const __m256i signed_a = _mm256_sign_epi8(a, qb);  // a * sign(b): |b| * (a * sign(b)) = a * b, pairs in int16
  return _mm256_madd_epi16(_mm256_maddubs_epi16(abs_qb, signed_a), _mm256_set1_epi16(1));
}

}  // namespace lfq
