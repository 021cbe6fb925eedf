// Weight-only quantized matmul for GGUF blocks on x86-64 CPUs with AVX2/FMA/F16C.
//
// The weight stays in GGUF's own block layout (one uint8 row of blocks per output feature):
// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32 weights per block) and Q4_K, Q5_K, Q6_K (256 per super-block).
// As in llama.cpp, each activation row is quantized to int8 in blocks of 32 (float scale d, and
// d * sum(q) for the formats with an offset term); a 32-block dot product is then an integer
// dot product (_mm256_maddubs_epi16 + _mm256_madd_epi16) scaled once in float.
// Every format is written as  w = dscale * q + offset  with q unsigned (Q8_0 uses the sign trick,
// Q6_K folds its two 16-element scales into the integer sum), so one accumulator step serves all.
//
// Rows of the weight are split across threads with at::parallel_for (torch's OpenMP pool); up to
// four activation rows share each decoded weight block. For many activation rows (prefill), tiles
// of the weight are dequantized to float and multiplied with at::mm, which is faster there.
//
// dequantize_* reproduce gguf-py's numpy dequantization bit for bit (same float operations, same
// order; the file is compiled with -ffp-contract=off so no FMA is fused behind our back).

// Only the torch headers needed (torch/extension.h would triple the compile time).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <immintrin.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// GGML type ids (gguf.GGMLQuantizationType values).
constexpr int64_t T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8;
constexpr int64_t T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14;

struct TypeInfo {
  int64_t block;  // weights per block
  int64_t bytes;  // bytes per block
};

TypeInfo type_info(int64_t qt) {
  switch (qt) {
    case T_Q4_0: return {32, 18};
    case T_Q4_1: return {32, 20};
    case T_Q5_0: return {32, 22};
    case T_Q5_1: return {32, 24};
    case T_Q8_0: return {32, 34};
    case T_Q4_K: return {256, 144};
    case T_Q5_K: return {256, 176};
    case T_Q6_K: return {256, 210};
    default: TORCH_CHECK(false, "llamaforge kernels: unsupported GGML type id ", qt);
  }
  return {0, 0};
}

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
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
// Activations: int8 blocks of 32 with a float scale d and s = d * sum(q).

struct Act {
  const int8_t* q;
  const float* d;
  const float* s;
  int64_t K;
  int64_t nb;
};

void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* d, float* s) {
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

// ---------------------------------------------------------------------------------------------
// Accumulators for MR activation rows against one weight row.

template <int MR>
struct Acc {
  __m256 acc[MR];
  float off[MR];
  const int8_t* q[MR];
  const float* d[MR];
  const float* s[MR];

  Acc(const Act& a, int64_t m0) {
    for (int i = 0; i < MR; ++i) {
      acc[i] = _mm256_setzero_ps();
      off[i] = 0.0f;
      q[i] = a.q + (m0 + i) * a.K;
      d[i] = a.d + (m0 + i) * a.nb;
      s[i] = a.s + (m0 + i) * a.nb;
    }
  }

  // 32 weights w = dscale * qw + offset, qw unsigned (< 128), activation block b.
  inline void add_u(__m256i qw, float dscale, float offset, int64_t b) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int i = 0; i < MR; ++i) {
      const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[i] + b * 32));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(qw, qx), ones);
      acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(dscale * d[i][b]), _mm256_cvtepi32_ps(p), acc[i]);
      off[i] += offset * s[i][b];
    }
  }

  // 32 weights w = dscale * qw, qw signed int8 (Q8_0): |qw| * sign(qx, qw).
  inline void add_s(__m256i qw, float dscale, int64_t b) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i ax = _mm256_sign_epi8(qw, qw);
    for (int i = 0; i < MR; ++i) {
      const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[i] + b * 32));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(qx, qw)), ones);
      acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(dscale * d[i][b]), _mm256_cvtepi32_ps(p), acc[i]);
    }
  }

  // Q6_K: 32 weights d * sc16 * (qw - 32), qw in [0, 64), sc16 int16 lanes (two 16-element scales).
  inline void add_q6(__m256i qw, __m256i sc16, float dscale, int64_t b) {
    const __m256i m32 = _mm256_set1_epi8(32);
    for (int i = 0; i < MR; ++i) {
      const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[i] + b * 32));
      const __m256i p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(qw, qx), _mm256_maddubs_epi16(m32, qx));
      const __m256i p = _mm256_madd_epi16(p16, sc16);
      acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(dscale * d[i][b]), _mm256_cvtepi32_ps(p), acc[i]);
    }
  }

  inline void store(float* out, int64_t ldo) const {
    for (int i = 0; i < MR; ++i) out[i * ldo] = hsum(acc[i]) + off[i];
  }
};

// One weight row (nblk blocks of type QT) against MR activation rows starting at m0.
template <int64_t QT, int MR>
void row_dot(const uint8_t* w, int64_t K, const Act& a, int64_t m0, float* out, int64_t ldo) {
  Acc<MR> c(a, m0);
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  if constexpr (QT == T_Q8_0) {
    for (int64_t b = 0; b < K / 32; ++b, w += 34)
      c.add_s(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2)), fp16(w), b);
  } else if constexpr (QT == T_Q4_0) {
    for (int64_t b = 0; b < K / 32; ++b, w += 18) {
      const float dd = fp16(w);
      c.add_u(nibbles(w + 2), dd, -8.0f * dd, b);
    }
  } else if constexpr (QT == T_Q4_1) {
    for (int64_t b = 0; b < K / 32; ++b, w += 20) c.add_u(nibbles(w + 4), fp16(w), fp16(w + 2), b);
  } else if constexpr (QT == T_Q5_0) {
    for (int64_t b = 0; b < K / 32; ++b, w += 22) {
      const float dd = fp16(w);
      c.add_u(_mm256_or_si256(nibbles(w + 6), fifth_bits(w + 2)), dd, -16.0f * dd, b);
    }
  } else if constexpr (QT == T_Q5_1) {
    for (int64_t b = 0; b < K / 32; ++b, w += 24)
      c.add_u(_mm256_or_si256(nibbles(w + 8), fifth_bits(w + 4)), fp16(w), fp16(w + 2), b);
  } else if constexpr (QT == T_Q4_K || QT == T_Q5_K) {
    constexpr int64_t bytes = QT == T_Q4_K ? 144 : 176;
    const __m256i one = _mm256_set1_epi8(1);
    for (int64_t sb = 0; sb < K / 256; ++sb, w += bytes) {
      const float dd = fp16(w), dmin = fp16(w + 2);
      uint8_t sc[8], mn[8];
      scale_min_k4(w + 4, sc, mn);
      const uint8_t* qs = w + (QT == T_Q4_K ? 16 : 48);
      __m256i qh = _mm256_setzero_si256();
      if constexpr (QT == T_Q5_K) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16));
      for (int j = 0; j < 8; j += 2) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 16 * j));
        __m256i q0 = _mm256_and_si256(raw, lo4);
        __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lo4);
        if constexpr (QT == T_Q5_K) {
          q0 = _mm256_or_si256(q0, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, j), one), 4));
          q1 = _mm256_or_si256(q1, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, j + 1), one), 4));
        }
        c.add_u(q0, dd * sc[j], -(dmin * mn[j]), sb * 8 + j);
        c.add_u(q1, dd * sc[j + 1], -(dmin * mn[j + 1]), sb * 8 + j + 1);
      }
    }
  } else if constexpr (QT == T_Q6_K) {
    const __m256i three = _mm256_set1_epi8(3);
    for (int64_t sb = 0; sb < K / 256; ++sb, w += 210) {
      const uint8_t* ql = w;
      const uint8_t* qhp = w + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
      const float dd = fp16(w + 208);
      for (int h = 0; h < 2; ++h) {
        const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * h));
        const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * h + 32));
        const __m256i hv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qhp + 32 * h));
        const __m256i lows[4] = {
            _mm256_and_si256(l0, lo4), _mm256_and_si256(l1, lo4),
            _mm256_and_si256(_mm256_srli_epi16(l0, 4), lo4), _mm256_and_si256(_mm256_srli_epi16(l1, 4), lo4)};
        for (int s4 = 0; s4 < 4; ++s4) {
          const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2 * s4), three), 4);
          const int si = 8 * h + 2 * s4;
          const __m256i sc16 = _mm256_set_m128i(_mm_set1_epi16(sc[si + 1]), _mm_set1_epi16(sc[si]));
          c.add_q6(_mm256_or_si256(lows[s4], hi), sc16, dd, sb * 8 + 4 * h + s4);
        }
      }
    }
  }
  c.store(out, ldo);
}

template <int64_t QT>
void matmul_rows(const uint8_t* w, int64_t bpr, int64_t n0, int64_t n1, int64_t K, const Act& a,
                 int64_t M, float* y, int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * bpr;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) row_dot<QT, 4>(wr, K, a, m, y + m * N + n, N);
    switch (M - m) {
      case 3: row_dot<QT, 3>(wr, K, a, m, y + m * N + n, N); break;
      case 2: row_dot<QT, 2>(wr, K, a, m, y + m * N + n, N); break;
      case 1: row_dot<QT, 1>(wr, K, a, m, y + m * N + n, N); break;
      default: break;
    }
  }
}

void matmul_dispatch(int64_t qt, const uint8_t* w, int64_t bpr, int64_t n0, int64_t n1, int64_t K,
                     const Act& a, int64_t M, float* y, int64_t N) {
  switch (qt) {
    case T_Q4_0: return matmul_rows<T_Q4_0>(w, bpr, n0, n1, K, a, M, y, N);
    case T_Q4_1: return matmul_rows<T_Q4_1>(w, bpr, n0, n1, K, a, M, y, N);
    case T_Q5_0: return matmul_rows<T_Q5_0>(w, bpr, n0, n1, K, a, M, y, N);
    case T_Q5_1: return matmul_rows<T_Q5_1>(w, bpr, n0, n1, K, a, M, y, N);
    case T_Q8_0: return matmul_rows<T_Q8_0>(w, bpr, n0, n1, K, a, M, y, N);
    case T_Q4_K: return matmul_rows<T_Q4_K>(w, bpr, n0, n1, K, a, M, y, N);
    case T_Q5_K: return matmul_rows<T_Q5_K>(w, bpr, n0, n1, K, a, M, y, N);
    case T_Q6_K: return matmul_rows<T_Q6_K>(w, bpr, n0, n1, K, a, M, y, N);
    default: TORCH_CHECK(false, "llamaforge kernels: unsupported GGML type id ", qt);
  }
}

// ---------------------------------------------------------------------------------------------
// Exact dequantization (same float operations as gguf-py's numpy code).

void dequant_row(int64_t qt, const uint8_t* w, int64_t K, float* out) {
  switch (qt) {
    case T_Q8_0:
      for (int64_t b = 0; b < K / 32; ++b, w += 34) {
        const float dd = fp16(w);
        const int8_t* qs = reinterpret_cast<const int8_t*>(w + 2);
        for (int j = 0; j < 32; ++j) out[b * 32 + j] = static_cast<float>(qs[j]) * dd;
      }
      break;
    case T_Q4_0:
      for (int64_t b = 0; b < K / 32; ++b, w += 18) {
        const float dd = fp16(w);
        for (int j = 0; j < 16; ++j) {
          out[b * 32 + j] = dd * static_cast<float>((w[2 + j] & 0xF) - 8);
          out[b * 32 + j + 16] = dd * static_cast<float>((w[2 + j] >> 4) - 8);
        }
      }
      break;
    case T_Q4_1:
      for (int64_t b = 0; b < K / 32; ++b, w += 20) {
        const float dd = fp16(w), mm = fp16(w + 2);
        for (int j = 0; j < 16; ++j) {
          out[b * 32 + j] = dd * static_cast<float>(w[4 + j] & 0xF) + mm;
          out[b * 32 + j + 16] = dd * static_cast<float>(w[4 + j] >> 4) + mm;
        }
      }
      break;
    case T_Q5_0:
      for (int64_t b = 0; b < K / 32; ++b, w += 22) {
        const float dd = fp16(w);
        uint32_t qh;
        std::memcpy(&qh, w + 2, 4);
        for (int j = 0; j < 16; ++j) {
          const int q0 = (w[6 + j] & 0xF) | (((qh >> j) & 1) << 4);
          const int q1 = (w[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
          out[b * 32 + j] = dd * static_cast<float>(q0 - 16);
          out[b * 32 + j + 16] = dd * static_cast<float>(q1 - 16);
        }
      }
      break;
    case T_Q5_1:
      for (int64_t b = 0; b < K / 32; ++b, w += 24) {
        const float dd = fp16(w), mm = fp16(w + 2);
        uint32_t qh;
        std::memcpy(&qh, w + 4, 4);
        for (int j = 0; j < 16; ++j) {
          const int q0 = (w[8 + j] & 0xF) | (((qh >> j) & 1) << 4);
          const int q1 = (w[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
          out[b * 32 + j] = dd * static_cast<float>(q0) + mm;
          out[b * 32 + j + 16] = dd * static_cast<float>(q1) + mm;
        }
      }
      break;
    case T_Q4_K:
    case T_Q5_K: {
      const bool q5 = qt == T_Q5_K;
      const int64_t bytes = q5 ? 176 : 144;
      for (int64_t sb = 0; sb < K / 256; ++sb, w += bytes) {
        const float dd = fp16(w), dmin = fp16(w + 2);
        uint8_t sc[8], mn[8];
        scale_min_k4(w + 4, sc, mn);
        const uint8_t* qh = w + 16;
        const uint8_t* qs = w + (q5 ? 48 : 16);
        for (int j = 0; j < 8; ++j) {
          const float dl = dd * static_cast<float>(sc[j]);
          const float ml = dmin * static_cast<float>(mn[j]);
          for (int e = 0; e < 32; ++e) {
            int q = (qs[32 * (j / 2) + e] >> (4 * (j & 1))) & 0xF;
            if (q5) q |= ((qh[e] >> j) & 1) << 4;
            out[sb * 256 + j * 32 + e] = dl * static_cast<float>(q) - ml;
          }
        }
      }
      break;
    }
    case T_Q6_K:
      for (int64_t sb = 0; sb < K / 256; ++sb, w += 210) {
        const float dd = fp16(w + 208);
        const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
        for (int h = 0; h < 2; ++h) {
          for (int s4 = 0; s4 < 4; ++s4) {
            for (int e = 0; e < 32; ++e) {
              const int l = (w[64 * h + 32 * (s4 & 1) + e] >> (4 * (s4 >> 1))) & 0xF;
              const int hb = (w[128 + 32 * h + e] >> (2 * s4)) & 3;
              const int idx = 128 * h + 32 * s4 + e;
              const float dl = dd * static_cast<float>(sc[idx / 16]);
              out[sb * 256 + idx] = dl * static_cast<float>((l | (hb << 4)) - 32);
            }
          }
        }
      }
      break;
    default: TORCH_CHECK(false, "llamaforge kernels: unsupported GGML type id ", qt);
  }
}

void check_weight(const at::Tensor& w, int64_t qt, int64_t N, int64_t K) {
  const TypeInfo ti = type_info(qt);
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "llamaforge kernels: weight must be a contiguous 2-D uint8 CPU tensor");
  TORCH_CHECK(K % ti.block == 0 && w.size(0) == N && w.size(1) == K / ti.block * ti.bytes,
              "llamaforge kernels: weight bytes ", w.sizes(), " do not match shape (", N, ", ", K, ")");
}

}  // namespace

// y = x @ dequantize(w).T (+ bias). x: (..., K) float tensor; returns (..., N) in x's dtype.
// Rows of x >= gemm_rows (and gemm_rows > 0) go through dequantized tiles and at::mm instead.
at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, int64_t qt, int64_t N, int64_t K,
                      const std::optional<at::Tensor>& bias, int64_t gemm_rows) {
  check_weight(w, qt, N, K);
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.size(-1) == K,
              "llamaforge kernels: input must be a CPU tensor with last dimension ", K, ", got ", x.sizes());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = K > 0 ? xf.numel() / K : 0;
  std::vector<int64_t> oshape(x.sizes().begin(), x.sizes().end());
  oshape.back() = N;
  at::Tensor y = at::empty(oshape, xf.options());
  const int64_t bpr = w.size(1);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  if (M == 0 || N == 0) {
  } else if (gemm_rows > 0 && M >= gemm_rows) {
    // Dequantize tiles of weight rows (float tile stays in L2) and let MKL do the GEMM.
    const int64_t tile = std::max<int64_t>(16, std::min<int64_t>(N, (1 << 19) / std::max<int64_t>(K, 1)));
    at::Tensor wt = at::empty({tile, K}, xf.options());
    const at::Tensor x2 = xf.view({M, K});
    at::Tensor y2 = y.view({M, N});
    float* wtp = wt.data_ptr<float>();
    for (int64_t t0 = 0; t0 < N; t0 += tile) {
      const int64_t nt = std::min(tile, N - t0);
      at::parallel_for(0, nt, 8, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) dequant_row(qt, wp + (t0 + r) * bpr, K, wtp + r * K);
      });
      at::Tensor ys = y2.narrow(1, t0, nt);
      at::mm_out(ys, x2, wt.narrow(0, 0, nt).t());
    }
  } else {
    const int64_t nb = K / 32;
    std::vector<int8_t> q(static_cast<size_t>(M * K));
    std::vector<float> d(static_cast<size_t>(M * nb)), s(static_cast<size_t>(M * nb));
    quantize_rows(xf.data_ptr<float>(), M, K, q.data(), d.data(), s.data());
    const Act a{q.data(), d.data(), s.data(), K, nb};
    // Split rows so each thread gets at least ~64 KiB of weights (less is not worth the wake-up).
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(bpr * ((M + 3) / 4), 1));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      matmul_dispatch(qt, wp, bpr, n0, n1, K, a, M, yp, N);
    });
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// All rows of w dequantized to float32: (N, K).
at::Tensor dequantize(const at::Tensor& w, int64_t qt, int64_t N, int64_t K) {
  check_weight(w, qt, N, K);
  at::Tensor out = at::empty({N, K}, at::kFloat);
  const int64_t bpr = w.size(1);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) dequant_row(qt, wp + r * bpr, K, op + r * K);
  });
  return out;
}

// Rows idx (any shape, int64) of w dequantized: idx.shape + (K,). The embedding lookup.
at::Tensor dequantize_rows(const at::Tensor& w, const at::Tensor& idx, int64_t qt, int64_t N, int64_t K) {
  check_weight(w, qt, N, K);
  const at::Tensor ix = idx.to(at::kLong).contiguous();
  std::vector<int64_t> oshape(ix.sizes().begin(), ix.sizes().end());
  oshape.push_back(K);
  at::Tensor out = at::empty(oshape, at::kFloat);
  const int64_t R = ix.numel(), bpr = w.size(1);
  const int64_t* ip = ix.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(ip[r] >= 0 && ip[r] < N, "llamaforge kernels: index ", ip[r], " out of range for ", N, " rows");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) dequant_row(qt, wp + ip[r] * bpr, K, op + r * K);
  });
  return out;
}

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llamaforge GGUF weight-only quantized matmul kernels (AVX2/FMA/F16C)";
  m.def("qlinear", &qlinear, "y = x @ dequantize(w).T + bias", py::arg("x"), py::arg("w"), py::arg("qt"),
        py::arg("N"), py::arg("K"), py::arg("bias") = py::none(), py::arg("gemm_rows") = 0);
  m.def("dequantize", &dequantize, "dequantize all rows (exact)");
  m.def("dequantize_rows", &dequantize_rows, "dequantize selected rows (exact)");
}
