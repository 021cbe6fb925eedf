// Kernels over weights in GGUF's own layout (one row of blocks per output feature), for every
// supported type: a row-by-row int8 dot product (up to 4 activation rows share each decoded weight
// block), and the exact dequantization (same float operations as gguf-py, no FMA contraction).
// The K-quants read the activations' Q8_K form and make the x8 tiles' exact int32 sum per super-block and
// its float operations (qx8_tiles.h), so both layouts give the same bits.
#pragma once

#include <cmath>

#include "qcommon.h"

namespace lfq {
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

  inline void store(float* out, int64_t ldo) const {
    for (int i = 0; i < MR; ++i) out[i * ldo] = hsum(acc[i]) + off[i];
  }
};

// K-quants: MR activation rows in their Q8_K form, one float accumulator each (qx8_tiles.h's operations).
template <int MR>
struct AccK {
  float acc[MR];
  const int8_t* q[MR];
  const float* d[MR];
  const int16_t* bs[MR];

  AccK(const Act& a, int64_t m0) {
    for (int i = 0; i < MR; ++i) {
      acc[i] = 0.0f;
      q[i] = a.kq + (m0 + i) * a.K;
      d[i] = a.kd + (m0 + i) * (a.K / 256);
      bs[i] = a.kbs + (m0 + i) * (a.K / 16);
    }
  }

  // Super-block sb: acc += float(isum) * (dw * d_x), then (Q4_K / Q5_K) -= float(msum) * (dmin * d_x).
  inline void add(int i, int64_t sb, int32_t isum, float dw) {
    acc[i] = std::fma(static_cast<float>(isum), dw * d[i][sb], acc[i]);
  }
  inline void sub(int i, int64_t sb, int32_t msum, float dmin) {
    acc[i] = std::fma(-static_cast<float>(msum), dmin * d[i][sb], acc[i]);
  }

  inline void store(float* out, int64_t ldo) const {
    for (int i = 0; i < MR; ++i) out[i * ldo] = acc[i];
  }
};

// One K-quant weight row against MR activation rows starting at m0 (Q8_K form).
template <int64_t QT, int MR>
void row_dot_k(const uint8_t* w, int64_t K, const Act& a, int64_t m0, float* out, int64_t ldo) {
  AccK<MR> c(a, m0);
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  if constexpr (QT == T_Q4_K || QT == T_Q5_K) {
    constexpr int64_t bytes = QT == T_Q4_K ? 144 : 176;
    const __m256i one = _mm256_set1_epi8(1);
    for (int64_t sb = 0; sb < K / 256; ++sb, w += bytes) {
      const float dd = fp16(w), dmin = fp16(w + 2);
      uint8_t sc[8], mn[8];
      scale_min_k4(w + 4, sc, mn);
      const uint8_t* qs = w + (QT == T_Q4_K ? 16 : 48);
      __m256i qh = _mm256_setzero_si256();
      if constexpr (QT == T_Q5_K) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16));
      __m256i isum[MR];
      for (int i = 0; i < MR; ++i) isum[i] = _mm256_setzero_si256();
      for (int j = 0; j < 8; j += 2) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 16 * j));
        __m256i q0 = _mm256_and_si256(raw, lo4);
        __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lo4);
        if constexpr (QT == T_Q5_K) {
          q0 = _mm256_or_si256(q0, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, j), one), 4));
          q1 = _mm256_or_si256(q1, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, j + 1), one), 4));
        }
        const __m256i s0 = _mm256_set1_epi16(sc[j]), s1 = _mm256_set1_epi16(sc[j + 1]);
        for (int i = 0; i < MR; ++i) {
          const int8_t* x = c.q[i] + sb * 256 + 32 * j;
          const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
          const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
          isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(_mm256_maddubs_epi16(q0, x0), s0));
          isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(_mm256_maddubs_epi16(q1, x1), s1));
        }
      }
      for (int i = 0; i < MR; ++i) {
        const int16_t* b = c.bs[i] + sb * 16;
        int32_t msum = 0;
        for (int j = 0; j < 8; ++j) msum += static_cast<int32_t>(mn[j]) * (b[2 * j] + b[2 * j + 1]);
        c.add(i, sb, hsum_i32(isum[i]), dd);
        c.sub(i, sb, msum, dmin);
      }
    }
  } else {  // Q6_K: values stored + 32
    const __m256i three = _mm256_set1_epi8(3);
    for (int64_t sb = 0; sb < K / 256; ++sb, w += 210) {
      const uint8_t* ql = w;
      const uint8_t* qhp = w + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
      const float dd = fp16(w + 208);
      __m256i isum[MR];
      for (int i = 0; i < MR; ++i) isum[i] = _mm256_setzero_si256();
      for (int h = 0; h < 2; ++h) {
        const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * h));
        const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * h + 32));
        const __m256i hv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qhp + 32 * h));
        const __m256i lows[4] = {
            _mm256_and_si256(l0, lo4), _mm256_and_si256(l1, lo4),
            _mm256_and_si256(_mm256_srli_epi16(l0, 4), lo4), _mm256_and_si256(_mm256_srli_epi16(l1, 4), lo4)};
        for (int s4 = 0; s4 < 4; ++s4) {
          const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2 * s4), three), 4);
          const __m256i qw = _mm256_or_si256(lows[s4], hi);
          const int si = 8 * h + 2 * s4;
          const __m256i sc16 = _mm256_set_m128i(_mm_set1_epi16(sc[si + 1]), _mm_set1_epi16(sc[si]));
          for (int i = 0; i < MR; ++i) {  // int16 pairs below 2 * 63 * 127: no saturation
            const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c.q[i] + sb * 256 + 32 * (4 * h + s4)));
            isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(_mm256_maddubs_epi16(qw, qx), sc16));
          }
        }
      }
      for (int i = 0; i < MR; ++i) {
        const int16_t* b = c.bs[i] + sb * 16;
        int32_t corr = 0;
        for (int hh = 0; hh < 16; ++hh) corr += static_cast<int32_t>(sc[hh]) * b[hh];
        c.add(i, sb, hsum_i32(isum[i]) - 32 * corr, dd);
      }
    }
  }
  c.store(out, ldo);
}

// One weight row (nblk blocks of type QT) against MR activation rows starting at m0.
template <int64_t QT, int MR>
void row_dot(const uint8_t* w, int64_t K, const Act& a, int64_t m0, float* out, int64_t ldo) {
  if constexpr (QT == T_Q4_K || QT == T_Q5_K || QT == T_Q6_K) {
    row_dot_k<QT, MR>(w, K, a, m0, out, ldo);
    return;
  }
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

inline void matmul_dispatch(int64_t qt, const uint8_t* w, int64_t bpr, int64_t n0, int64_t n1, int64_t K,
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
    default: return;
  }
}

// ---------------------------------------------------------------------------------------------
// Exact dequantization (same float operations as gguf-py's numpy code).

inline void dequant_row(int64_t qt, const uint8_t* w, int64_t K, float* out) {
  switch (qt) {
    case T_F16:
      for (int64_t k = 0; k < K; ++k) out[k] = fp16(w + 2 * k);
      break;
    case T_BF16:
      for (int64_t k = 0; k < K; ++k) out[k] = bf16(w + 2 * k);
      break;
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
    default: return;
  }
}

}  // namespace lfq
