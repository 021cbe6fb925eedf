// The "x8" layout for Q4_0, Q4_1 and Q8_0: eight weight rows interleaved per block of 32 columns,
// so that one integer dot product yields the eight rows' results in the eight int32 lanes of a
// vector (no horizontal sums, one float scaling per 8 rows) - the layout llama.cpp's repacked
// CPU kernels use. Same bytes per weight as GGUF (the rows of a last partial group are zero).
//
// Super-block (one group of 8 rows g*8..g*8+7, one block b of 32 columns):
//   Q4_0: d[8] f16 | q[128]             (144 bytes)
//   Q4_1: d[8] f16 | m[8] f16 | q[128]  (160 bytes)
//   Q8_0: d[8] f16 | q[256]             (272 bytes)
// With W_k(r, t) the weight of row r, column 4k+t (k < 8, t < 4):
//   Q8_0 byte 32k + 4r + t       = W_k(r, t) (int8)
//   Q4_* byte 32(k%4) + 4r + t holds W_k(r, t) in its low nibble for k < 4, high nibble for k >= 4.
// A group's super-blocks are contiguous: the tensor is (ceil(N / 8), K / 32 * bytes).
#pragma once

#include "qcommon.h"

namespace lfq {

inline bool x8_supported(int64_t qt) { return qt == T_Q4_0 || qt == T_Q4_1 || qt == T_Q8_0; }

inline int64_t x8_bytes(int64_t qt) {
  return qt == T_Q4_0 ? 144 : qt == T_Q4_1 ? 160 : qt == T_Q8_0 ? 272 : 0;
}

inline int64_t x8_qoff(int64_t qt) { return qt == T_Q4_1 ? 32 : 16; }

// Repack rows [0, rows) (rows <= 8) of GGUF bytes into one group of x8 super-blocks.
inline void repack_x8_group(int64_t qt, const uint8_t* raw, int64_t bpr, int64_t rows, int64_t K, uint8_t* out) {
  const TypeInfo ti = type_info(qt);
  const int64_t SB = x8_bytes(qt), qoff = x8_qoff(qt);
  for (int64_t b = 0; b < K / 32; ++b) {
    uint8_t* sb = out + b * SB;
    std::memset(sb, 0, SB);
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* blk = raw + r * bpr + b * ti.bytes;
      std::memcpy(sb + 2 * r, blk, 2);
      if (qt == T_Q4_1) std::memcpy(sb + 16 + 2 * r, blk + 2, 2);
      uint8_t q[32];
      if (qt == T_Q8_0) {
        std::memcpy(q, blk + 2, 32);
      } else {
        const uint8_t* qs = blk + (qt == T_Q4_1 ? 4 : 2);
        for (int e = 0; e < 16; ++e) {
          q[e] = qs[e] & 0xF;
          q[e + 16] = qs[e] >> 4;
        }
      }
      for (int k = 0; k < 8; ++k) {
        for (int t = 0; t < 4; ++t) {
          const uint8_t v = q[4 * k + t];
          if (qt == T_Q8_0)
            sb[qoff + 32 * k + 4 * r + t] = v;
          else
            sb[qoff + 32 * (k & 3) + 4 * r + t] |= static_cast<uint8_t>(k < 4 ? v : v << 4);
        }
      }
    }
  }
}

// Row n of an x8 tensor dequantized exactly (as gguf-py does for the original GGUF block).
inline void dequant_row_x8(int64_t qt, const uint8_t* w, int64_t n, int64_t K, float* out) {
  const int64_t nb = K / 32, SB = x8_bytes(qt), qoff = x8_qoff(qt);
  const int64_t r = n % 8;
  const uint8_t* g = w + (n / 8) * nb * SB;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* sb = g + b * SB;
    const float dd = fp16(sb + 2 * r);
    const float mm = qt == T_Q4_1 ? fp16(sb + 16 + 2 * r) : 0.0f;
    for (int k = 0; k < 8; ++k) {
      for (int t = 0; t < 4; ++t) {
        float* o = out + b * 32 + 4 * k + t;
        if (qt == T_Q8_0) {
          *o = static_cast<float>(static_cast<int8_t>(sb[qoff + 32 * k + 4 * r + t])) * dd;
        } else {
          const uint8_t byte = sb[qoff + 32 * (k & 3) + 4 * r + t];
          const int q = k < 4 ? (byte & 0xF) : (byte >> 4);
          *o = qt == T_Q4_1 ? dd * static_cast<float>(q) + mm : dd * static_cast<float>(q - 8);
        }
      }
    }
  }
}

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// One group of 8 weight rows against MR activation rows m0..m0+MR-1: y[m][0..nvalid) of the group.
template <int64_t QT, int MR>
inline void x8_tile(const uint8_t* gw, int64_t nb, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t nvalid) {
  constexpr int64_t SB = QT == T_Q4_0 ? 144 : QT == T_Q4_1 ? 160 : 272;
  constexpr int64_t QOFF = QT == T_Q4_1 ? 32 : 16;
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MR];
  const int8_t* xq[MR];
  const float* xd[MR];
  const float* xs[MR];
  for (int i = 0; i < MR; ++i) {
    acc[i] = _mm256_setzero_ps();
    xq[i] = a.q + (m0 + i) * a.K;
    xd[i] = a.d + (m0 + i) * a.nb;
    xs[i] = a.s + (m0 + i) * a.nb;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* sb = gw + b * SB;
    const uint8_t* q = sb + QOFF;
    const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb)));
    if constexpr (QT == T_Q8_0) {
      __m256i s32[MR];
      for (int i = 0; i < MR; ++i) s32[i] = _mm256_setzero_si256();
      for (int k = 0; k < 8; ++k) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * k));
        const __m256i aw = _mm256_sign_epi8(w, w);
        for (int i = 0; i < MR; ++i) {
          const __m256i xv = _mm256_sign_epi8(bcast4(xq[i] + b * 32 + 4 * k), w);
          s32[i] = _mm256_add_epi32(s32[i], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), ones));
        }
      }
      for (int i = 0; i < MR; ++i)
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[i]), _mm256_mul_ps(dv, _mm256_set1_ps(xd[i][b])), acc[i]);
    } else {
      // 4-bit weights times int8 activations: 8 maddubs results (each <= 2*15*127) fit in int16.
      const __m256 mv = QT == T_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 16)))
                                     : _mm256_mul_ps(dv, _mm256_set1_ps(-8.0f));
      __m256i s16[MR];
      for (int i = 0; i < MR; ++i) s16[i] = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * j));
        const __m256i lo = _mm256_and_si256(p, lo4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), lo4);
        for (int i = 0; i < MR; ++i) {
          const int8_t* xb = xq[i] + b * 32;
          s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(lo, bcast4(xb + 4 * j)));
          s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(hi, bcast4(xb + 16 + 4 * j)));
        }
      }
      for (int i = 0; i < MR; ++i) {
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[i], ones));
        acc[i] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dv, _mm256_set1_ps(xd[i][b])), acc[i]);
        acc[i] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[i][b]), acc[i]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* out = y + (m0 + i) * ldy;
    if (nvalid == 8) {
      _mm256_storeu_ps(out, acc[i]);
    } else {
      float tmp[8];
      _mm256_storeu_ps(tmp, acc[i]);
      for (int64_t r = 0; r < nvalid; ++r) out[r] = tmp[r];
    }
  }
}

// The same tile with AVX-512 VNNI (vpdpbusd on 256-bit vectors: u8 x s8 summed in int32, no
// saturation): 4-bit weights go straight into int32 sums; Q8_0 multiplies activations + 128
// (unsigned) with the signed weights and subtracts 128 * sum(w), which one more vpdpbusd gives.
#define LFQ_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

template <int64_t QT, int MR>
LFQ_VNNI inline void x8_tile_vnni(const uint8_t* gw, int64_t nb, const Act& a, int64_t m0, float* y, int64_t ldy,
                                  int64_t nvalid) {
  constexpr int64_t SB = QT == T_Q4_0 ? 144 : QT == T_Q4_1 ? 160 : 272;
  constexpr int64_t QOFF = QT == T_Q4_1 ? 32 : 16;
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  __m256 acc[MR];
  const int8_t* xq[MR];
  const float* xd[MR];
  const float* xs[MR];
  for (int i = 0; i < MR; ++i) {
    acc[i] = _mm256_setzero_ps();
    xq[i] = a.q + (m0 + i) * a.K;
    xd[i] = a.d + (m0 + i) * a.nb;
    xs[i] = a.s + (m0 + i) * a.nb;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* sb = gw + b * SB;
    const uint8_t* q = sb + QOFF;
    const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb)));
    __m256i s32[MR];
    for (int i = 0; i < MR; ++i) s32[i] = _mm256_setzero_si256();
    if constexpr (QT == T_Q8_0) {
      const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
      const __m256i one8 = _mm256_set1_epi8(1);
      __m256i sw = _mm256_setzero_si256();
      for (int k = 0; k < 8; ++k) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * k));
        sw = _mm256_dpbusd_epi32(sw, one8, w);
        for (int i = 0; i < MR; ++i) {
          const __m256i xu = _mm256_xor_si256(bcast4(xq[i] + b * 32 + 4 * k), flip);
          s32[i] = _mm256_dpbusd_epi32(s32[i], xu, w);
        }
      }
      const __m256i corr = _mm256_slli_epi32(sw, 7);
      for (int i = 0; i < MR; ++i) {
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(s32[i], corr));
        acc[i] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dv, _mm256_set1_ps(xd[i][b])), acc[i]);
      }
    } else {
      const __m256 mv = QT == T_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 16)))
                                     : _mm256_mul_ps(dv, _mm256_set1_ps(-8.0f));
      for (int j = 0; j < 4; ++j) {
        const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * j));
        const __m256i lo = _mm256_and_si256(p, lo4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), lo4);
        for (int i = 0; i < MR; ++i) {
          const int8_t* xb = xq[i] + b * 32;
          s32[i] = _mm256_dpbusd_epi32(s32[i], lo, bcast4(xb + 4 * j));
          s32[i] = _mm256_dpbusd_epi32(s32[i], hi, bcast4(xb + 16 + 4 * j));
        }
      }
      for (int i = 0; i < MR; ++i) {
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[i]), _mm256_mul_ps(dv, _mm256_set1_ps(xd[i][b])), acc[i]);
        acc[i] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[i][b]), acc[i]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* out = y + (m0 + i) * ldy;
    if (nvalid == 8) {
      _mm256_storeu_ps(out, acc[i]);
    } else {
      float tmp[8];
      _mm256_storeu_ps(tmp, acc[i]);
      for (int64_t r = 0; r < nvalid; ++r) out[r] = tmp[r];
    }
  }
}

// Whether this CPU (and OS) can run the VNNI tiles, and whether they are used (tests switch them off).
inline bool vnni_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return ok;
}

inline bool& vnni_enabled() {
  static bool on = vnni_supported();
  return on;
}

// Groups [g0, g1) of an x8 weight against all M activation rows; y is (M, N) row-major.
template <int64_t QT>
void x8_groups(const uint8_t* w, int64_t g0, int64_t g1, int64_t N, int64_t K, const Act& a, int64_t M, float* y) {
  constexpr int MR = 4;
  const int64_t nb = K / 32, gbytes = nb * x8_bytes(QT);
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* gw = w + g * gbytes;
    const int64_t nvalid = std::min<int64_t>(8, N - g * 8);
    float* yg = y + g * 8;
    int64_t m = 0;
    for (; m + MR <= M; m += MR) x8_tile<QT, MR>(gw, nb, a, m, yg, N, nvalid);
    switch (M - m) {
      case 3: x8_tile<QT, 3>(gw, nb, a, m, yg, N, nvalid); break;
      case 2: x8_tile<QT, 2>(gw, nb, a, m, yg, N, nvalid); break;
      case 1: x8_tile<QT, 1>(gw, nb, a, m, yg, N, nvalid); break;
      default: break;
    }
  }
}

template <int64_t QT>
LFQ_VNNI void x8_groups_vnni(const uint8_t* w, int64_t g0, int64_t g1, int64_t N, int64_t K, const Act& a, int64_t M,
                             float* y) {
  constexpr int MR = 8;  // 32 vector registers with AVX-512VL
  const int64_t nb = K / 32, gbytes = nb * x8_bytes(QT);
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* gw = w + g * gbytes;
    const int64_t nvalid = std::min<int64_t>(8, N - g * 8);
    float* yg = y + g * 8;
    int64_t m = 0;
    for (; m + MR <= M; m += MR) x8_tile_vnni<QT, MR>(gw, nb, a, m, yg, N, nvalid);
    if (M - m >= 4) {
      x8_tile_vnni<QT, 4>(gw, nb, a, m, yg, N, nvalid);
      m += 4;
    }
    switch (M - m) {
      case 3: x8_tile_vnni<QT, 3>(gw, nb, a, m, yg, N, nvalid); break;
      case 2: x8_tile_vnni<QT, 2>(gw, nb, a, m, yg, N, nvalid); break;
      case 1: x8_tile_vnni<QT, 1>(gw, nb, a, m, yg, N, nvalid); break;
      default: break;
    }
  }
}

inline void x8_dispatch(int64_t qt, const uint8_t* w, int64_t g0, int64_t g1, int64_t N, int64_t K, const Act& a,
                        int64_t M, float* y) {
  const bool vnni = vnni_enabled();
  switch (qt) {
    case T_Q4_0:
      return vnni ? x8_groups_vnni<T_Q4_0>(w, g0, g1, N, K, a, M, y) : x8_groups<T_Q4_0>(w, g0, g1, N, K, a, M, y);
    case T_Q4_1:
      return vnni ? x8_groups_vnni<T_Q4_1>(w, g0, g1, N, K, a, M, y) : x8_groups<T_Q4_1>(w, g0, g1, N, K, a, M, y);
    case T_Q8_0:
      return vnni ? x8_groups_vnni<T_Q8_0>(w, g0, g1, N, K, a, M, y) : x8_groups<T_Q8_0>(w, g0, g1, N, K, a, M, y);
    default: return;
  }
}

}  // namespace lfq
