// The x8 matmul tiles (layout in qx8.h). qmatmul.cpp includes this file twice: as namespace
// lfq::tiles_avx2 with LFQ_TILE_VNNI 0 (plain AVX2: _mm256_maddubs_epi16 sums in int16, widened by
// _mm256_madd_epi16), and inside a `#pragma GCC target` region as lfq::tiles_vnni with
// LFQ_TILE_VNNI 1 (AVX-512 VNNI's vpdpbusd on 256-bit vectors: u8 x s8 summed straight into
// int32). Both compute the same exact integer sums followed by the same float operations, so
// their results are identical.
//
// A tile is one group of 8 weight rows against MR activation rows: per 32-column block and
// activation row, one int32 vector holds the 8 rows' integer dot products, scaled once in float:
//     acc += float(isum) * (d_w * d_x) + offset_w * s_x      (s_x = d_x * sum(q_x))
// No include guard on purpose.

namespace lfq {
namespace LFQ_TILE_NS {

constexpr int MR_MAX = LFQ_TILE_VNNI ? 8 : 4;  // activation rows per tile (VNNI has 32 registers)

// Q5_K: bit k of each byte of a fifth-bit plane vector moved to bit 4 (0x10), the rest cleared.
inline __m256i fifth_bit(__m256i h, int k) {
  const __m256i m = _mm256_set1_epi8(0x10);
  switch (k) {
    case 0: return _mm256_and_si256(_mm256_slli_epi16(h, 4), m);
    case 1: return _mm256_and_si256(_mm256_slli_epi16(h, 3), m);
    case 2: return _mm256_and_si256(_mm256_slli_epi16(h, 2), m);
    case 3: return _mm256_and_si256(_mm256_slli_epi16(h, 1), m);
    case 4: return _mm256_and_si256(h, m);
    case 5: return _mm256_and_si256(_mm256_srli_epi16(h, 1), m);
    case 6: return _mm256_and_si256(_mm256_srli_epi16(h, 2), m);
    default: return _mm256_and_si256(_mm256_srli_epi16(h, 3), m);
  }
}

// int32 lanes (one per weight row) += 32-column dot products of a nibble plane (+ the fifth bits at
// q + X8_HI_OFF) with MR activation blocks xb[i].
template <int MR, bool FIVE>
inline void dot_u(const uint8_t* q, const int8_t* const* xb, __m256i* s32) {
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  __m256i h = _mm256_setzero_si256();
  if constexpr (FIVE) h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + X8_HI_OFF));
#if !LFQ_TILE_VNNI
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i s16[MR];
  for (int i = 0; i < MR; ++i) s16[i] = _mm256_setzero_si256();
#endif
  for (int j = 0; j < 4; ++j) {
    const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * j));
    __m256i lo = _mm256_and_si256(p, lo4);                              // W_j
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), lo4);        // W_{j+4}
    if constexpr (FIVE) {
      lo = _mm256_or_si256(lo, fifth_bit(h, j));
      hi = _mm256_or_si256(hi, fifth_bit(h, j + 4));
    }
    for (int i = 0; i < MR; ++i) {
#if LFQ_TILE_VNNI
      s32[i] = _mm256_dpbusd_epi32(s32[i], lo, bcast4(xb[i] + 4 * j));
      s32[i] = _mm256_dpbusd_epi32(s32[i], hi, bcast4(xb[i] + 16 + 4 * j));
#else
      s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(lo, bcast4(xb[i] + 4 * j)));
      s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(hi, bcast4(xb[i] + 16 + 4 * j)));
#endif
    }
#if !LFQ_TILE_VNNI
    // An int16 lane holds at most 8 products of 4-bit weights (8 * 2 * 15 * 127 < 2^15), 4 of 5-bit.
    if (j == 3 || (FIVE && j == 1)) {
      for (int i = 0; i < MR; ++i) {
        s32[i] = _mm256_add_epi32(s32[i], _mm256_madd_epi16(s16[i], ones));
        s16[i] = _mm256_setzero_si256();
      }
    }
#endif
  }
}

// Q6_K: bits 4-5 of value k (k % 4 = j) of a two-bit plane vector, in place (qx8.h: stored at 4-5, 6-7, 0-1, 2-3).
inline __m256i q6_high(__m256i h, int j) {
  const __m256i m = _mm256_set1_epi8(0x30);
  switch (j) {
    case 0: return _mm256_and_si256(h, m);
    case 1: return _mm256_and_si256(_mm256_srli_epi16(h, 2), m);
    case 2: return _mm256_and_si256(_mm256_slli_epi16(h, 4), m);
    default: return _mm256_and_si256(_mm256_slli_epi16(h, 2), m);
  }
}

// Q6_K: int32 lanes += dot products of a sub-block's 6-bit values (nibble plane q + two-bit plane at
// q + X8_HI_OFF) with MR activation blocks, the first 16 columns into sa, the last 16 into sb (their scales differ).
template <int MR>
inline void dot_q6(const uint8_t* q, const int8_t* const* xb, __m256i* sa, __m256i* sb) {
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  const __m256i ha = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + X8_HI_OFF));
  const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + X8_HI_OFF + 32));
#if !LFQ_TILE_VNNI
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i s16a[MR], s16b[MR];
  for (int i = 0; i < MR; ++i) s16a[i] = s16b[i] = _mm256_setzero_si256();
#endif
  for (int j = 0; j < 4; ++j) {
    const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * j));
    const __m256i lo = _mm256_or_si256(_mm256_and_si256(p, lo4), q6_high(ha, j));
    const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(p, 4), lo4), q6_high(hb, j));
    for (int i = 0; i < MR; ++i) {
#if LFQ_TILE_VNNI
      sa[i] = _mm256_dpbusd_epi32(sa[i], lo, bcast4(xb[i] + 4 * j));
      sb[i] = _mm256_dpbusd_epi32(sb[i], hi, bcast4(xb[i] + 16 + 4 * j));
#else
      s16a[i] = _mm256_add_epi16(s16a[i], _mm256_maddubs_epi16(lo, bcast4(xb[i] + 4 * j)));
      s16b[i] = _mm256_add_epi16(s16b[i], _mm256_maddubs_epi16(hi, bcast4(xb[i] + 16 + 4 * j)));
#endif
    }
#if !LFQ_TILE_VNNI
    if (j & 1) {  // an int16 lane holds 2 products of 6-bit weights (2 * 2 * 63 * 127 < 2^15)
      for (int i = 0; i < MR; ++i) {
        sa[i] = _mm256_add_epi32(sa[i], _mm256_madd_epi16(s16a[i], ones));
        sb[i] = _mm256_add_epi32(sb[i], _mm256_madd_epi16(s16b[i], ones));
        s16a[i] = s16b[i] = _mm256_setzero_si256();
      }
    }
#endif
  }
}

// int32 lanes += 32-column dot products of an int8 plane (Q8_0) with MR activation blocks.
template <int MR>
inline void dot_s8(const uint8_t* q, const int8_t* const* xb, __m256i* s32) {
#if LFQ_TILE_VNNI
  // (x + 128) * w with x + 128 unsigned, minus 128 * sum(w) (one more vpdpbusd against ones).
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i one8 = _mm256_set1_epi8(1);
  __m256i sw = _mm256_setzero_si256();
  for (int k = 0; k < 8; ++k) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * k));
    sw = _mm256_dpbusd_epi32(sw, one8, w);
    for (int i = 0; i < MR; ++i)
      s32[i] = _mm256_dpbusd_epi32(s32[i], _mm256_xor_si256(bcast4(xb[i] + 4 * k), flip), w);
  }
  const __m256i corr = _mm256_slli_epi32(sw, 7);
  for (int i = 0; i < MR; ++i) s32[i] = _mm256_sub_epi32(s32[i], corr);
#else
  // |w| * (x with w's sign): maddubs needs an unsigned operand; pairs stay below 2^15.
  const __m256i ones = _mm256_set1_epi16(1);
  for (int k = 0; k < 8; ++k) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * k));
    const __m256i aw = _mm256_sign_epi8(w, w);
    for (int i = 0; i < MR; ++i) {
      const __m256i xv = _mm256_sign_epi8(bcast4(xb[i] + 4 * k), w);
      s32[i] = _mm256_add_epi32(s32[i], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), ones));
    }
  }
#endif
}

template <int64_t QT, int MR>
inline void tile(const uint8_t* gw, int64_t nsb, const Act& a, int64_t m0, float* y, int64_t ldy, int64_t nvalid) {
  constexpr bool KQ = QT == T_Q4_K || QT == T_Q5_K;
  constexpr int64_t SB = QT == T_Q4_0   ? 144
                         : QT == T_Q4_1 ? 160
                         : QT == T_Q8_0 ? 272
                         : QT == T_Q4_K ? 1184
                         : QT == T_Q5_K ? 1440
                                        : 1680;
  __m256 acc[MR];
  const int8_t* xq[MR];
  const float* xd[MR];
  const float* xs[MR];
  const int32_t* xh[MR];
  const int8_t* xb[MR];
  __m256i s32[MR];
  for (int i = 0; i < MR; ++i) {
    acc[i] = _mm256_setzero_ps();
    xq[i] = a.q + (m0 + i) * a.K;
    xd[i] = a.d + (m0 + i) * a.nb;
    xs[i] = a.s + (m0 + i) * a.nb;
    xh[i] = a.h + (m0 + i) * a.nb * 2;
  }
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* p = gw + sb * SB;
    const __m256 dvec = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    if constexpr (QT == T_Q6_K) {
      __m256i s32b[MR];
      for (int64_t j = 0; j < 8; ++j) {
        const int64_t b = sb * 8 + j;
        const __m256 sca = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 16 + 16 * j))));
        const __m256 scb = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 24 + 16 * j))));
        const __m256 dva = _mm256_mul_ps(dvec, sca), dvb = _mm256_mul_ps(dvec, scb);
        for (int i = 0; i < MR; ++i) {
          xb[i] = xq[i] + 32 * b;
          s32[i] = s32b[i] = _mm256_setzero_si256();
        }
        dot_q6<MR>(p + x8_qoff(QT, j), xb, s32, s32b);
        for (int i = 0; i < MR; ++i) {  // the values are stored + 32: subtract 32 * sum(x) per half
          const __m256i ia = _mm256_sub_epi32(s32[i], _mm256_set1_epi32(32 * xh[i][2 * b]));
          const __m256i ib = _mm256_sub_epi32(s32b[i], _mm256_set1_epi32(32 * xh[i][2 * b + 1]));
          const __m256 xdv = _mm256_set1_ps(xd[i][b]);
          acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia), _mm256_mul_ps(dva, xdv), acc[i]);
          acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ib), _mm256_mul_ps(dvb, xdv), acc[i]);
        }
      }
    } else if constexpr (!KQ) {
      const int64_t b = sb;
      for (int i = 0; i < MR; ++i) {
        xb[i] = xq[i] + 32 * b;
        s32[i] = _mm256_setzero_si256();
      }
      if constexpr (QT == T_Q8_0)
        dot_s8<MR>(p + 16, xb, s32);
      else
        dot_u<MR, false>(p + x8_qoff(QT, 0), xb, s32);
      const __m256 mv = QT == T_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)))
                                     : _mm256_mul_ps(dvec, _mm256_set1_ps(-8.0f));
      for (int i = 0; i < MR; ++i) {
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[i]), _mm256_mul_ps(dvec, _mm256_set1_ps(xd[i][b])), acc[i]);
        if constexpr (QT != T_Q8_0) acc[i] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[i][b]), acc[i]);
      }
    } else {
      const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
      for (int64_t j = 0; j < 8; ++j) {
        const int64_t b = sb * 8 + j;
        const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 32 + 8 * j))));
        const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 96 + 8 * j))));
        const __m256 dv = _mm256_mul_ps(dvec, sc);
        const __m256 mv = _mm256_mul_ps(dmin, mn);  // subtracted: w = d * sc * q - dmin * mn
        for (int i = 0; i < MR; ++i) {
          xb[i] = xq[i] + 32 * b;
          s32[i] = _mm256_setzero_si256();
        }
        dot_u<MR, QT == T_Q5_K>(p + x8_qoff(QT, j), xb, s32);
        for (int i = 0; i < MR; ++i) {
          acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[i]), _mm256_mul_ps(dv, _mm256_set1_ps(xd[i][b])), acc[i]);
          acc[i] = _mm256_fnmadd_ps(mv, _mm256_set1_ps(xs[i][b]), acc[i]);
        }
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

// Groups [g0, g1) of an x8 weight against all M activation rows; y is (M, N) row-major.
template <int64_t QT>
void groups(const uint8_t* w, int64_t g0, int64_t g1, int64_t N, int64_t K, const Act& a, int64_t M, float* y) {
  const X8Format f = x8_format(QT);
  const int64_t nsb = K / f.cols, gbytes = nsb * f.bytes;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* gw = w + g * gbytes;
    const int64_t nvalid = std::min<int64_t>(8, N - g * 8);
    float* yg = y + g * 8;
    int64_t m = 0;
    for (; m + MR_MAX <= M; m += MR_MAX) tile<QT, MR_MAX>(gw, nsb, a, m, yg, N, nvalid);
    if (MR_MAX > 4 && M - m >= 4) {
      tile<QT, 4>(gw, nsb, a, m, yg, N, nvalid);
      m += 4;
    }
    switch (M - m) {
      case 3: tile<QT, 3>(gw, nsb, a, m, yg, N, nvalid); break;
      case 2: tile<QT, 2>(gw, nsb, a, m, yg, N, nvalid); break;
      case 1: tile<QT, 1>(gw, nsb, a, m, yg, N, nvalid); break;
      default: break;
    }
  }
}

inline void dispatch(int64_t qt, const uint8_t* w, int64_t g0, int64_t g1, int64_t N, int64_t K, const Act& a,
                     int64_t M, float* y) {
  switch (qt) {
    case T_Q4_0: return groups<T_Q4_0>(w, g0, g1, N, K, a, M, y);
    case T_Q4_1: return groups<T_Q4_1>(w, g0, g1, N, K, a, M, y);
    case T_Q8_0: return groups<T_Q8_0>(w, g0, g1, N, K, a, M, y);
    case T_Q4_K: return groups<T_Q4_K>(w, g0, g1, N, K, a, M, y);
    case T_Q5_K: return groups<T_Q5_K>(w, g0, g1, N, K, a, M, y);
    case T_Q6_K: return groups<T_Q6_K>(w, g0, g1, N, K, a, M, y);
    default: return;
  }
}

}  // namespace LFQ_TILE_NS
}  // namespace lfq
