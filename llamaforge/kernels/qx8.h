// The "x8" layout: eight weight rows interleaved per block of 32 columns, so that one integer dot
// product yields the eight rows' results in the eight int32 lanes of a vector (no horizontal sums,
// one float scaling per 8 rows) - the idea of llama.cpp's repacked CPU kernels. For Q4_0, Q4_1,
// Q8_0 (super-block = 8 rows x 32 columns) and Q4_K, Q5_K, Q6_K (8 rows x 256 columns). Bytes per
// weight are GGUF's (Q4_K/Q5_K +3%: their packed 6-bit scales are stored unpacked); a last partial group
// of rows is zero-filled. The tensor is (ceil(N / 8), K / columns * bytes): a group's super-blocks
// are contiguous.
//
// With W_k(r, t) the weight of row r, column 4k + t of a 32-column sub-block (k < 8, t < 4):
//   int8 plane (Q8_0, 256 bytes):   byte 32k + 4r + t = W_k(r, t)
//   nibble plane (128 bytes):       byte 32(k % 4) + 4r + t holds W_k(r, t) & 15 in its low nibble
//                                   for k < 4, in its high nibble for k >= 4
//   fifth-bit plane (Q5_K, 32 bytes): bit k of byte 4r + t = bit 4 of W_k(r, t)
//   two-bit plane (Q6_K, 64 bytes):  bits 4-5 of W_k(r, t) in byte 32(k / 4) + 4r + t, at bits 4-5, 6-7,
//                                   0-1, 2-3 for k % 4 = 0, 1, 2, 3 (so that one shift and one AND by 0x30
//                                   put them in place: none, >> 2, << 4, << 2)
// Super-blocks (a sub-block's planes are adjacent, so that a tile reads its super-block front to back:
// with the planes apart, Q5_K/Q6_K streamed from DRAM at 40-50% of the rate of the same loop on adjacent ones):
//   Q4_0: d[8] f16 | nibbles                                               (144 bytes)
//   Q4_1: d[8] f16 | m[8] f16 | nibbles                                    (160 bytes)
//   Q8_0: d[8] f16 | int8 plane                                            (272 bytes)
//   Q4_K: d[8] f16 | dmin[8] f16 | sc[8 sub][8 rows] u8 | mn[8 sub][8 rows] u8 | 8 nibble planes
//                                                                          (1184 bytes)
//   Q5_K: as Q4_K, but each sub-block's nibble plane followed by its fifth-bit plane (1440 bytes)
//   Q6_K: d[8] f16 | sc[16 halves][8 rows] i8 | 8 x (nibble plane | two-bit plane) (1680 bytes);
//         the 6-bit value minus 32 times the half's scale times d is w.
#pragma once

#include <cstdlib>

#include "qcommon.h"

namespace lfq {

struct X8Format {
  int64_t cols;   // columns per super-block
  int64_t bytes;  // bytes per super-block (8 rows)
};

inline X8Format x8_format(int64_t qt) {
  switch (qt) {
    case T_Q4_0: return {32, 144};
    case T_Q4_1: return {32, 160};
    case T_Q8_0: return {32, 272};
    case T_Q4_K: return {256, 1184};
    case T_Q5_K: return {256, 1440};
    case T_Q6_K: return {256, 1680};
    default: return {0, 0};
  }
}

inline bool x8_supported(int64_t qt) { return x8_format(qt).cols > 0; }

// Offset inside a super-block of the quants (nibble or int8 plane) of 32-column sub-block j; a Q5_K
// fifth-bit or Q6_K two-bit plane follows its nibble plane at + X8_HI_OFF.
constexpr int64_t x8_qoff(int64_t qt, int64_t j) {
  return qt == T_Q4_1 ? 32 : qt == T_Q4_K ? 160 + 128 * j : qt == T_Q5_K ? 160 + 160 * j : qt == T_Q6_K ? 144 + 192 * j : 16;
}
constexpr int64_t X8_HI_OFF = 128;
constexpr int X8_Q6_SHIFT[4] = {4, 6, 0, 2};  // bit position in the two-bit plane of value k, by k % 4

// The integer values of one GGUF block (32 for Q4_0/Q4_1/Q8_0, 256 for the K-quants), in column order.
inline void gguf_block_values(int64_t qt, const uint8_t* blk, uint8_t* v) {
  if (qt == T_Q8_0) {
    std::memcpy(v, blk + 2, 32);
  } else if (qt == T_Q4_0 || qt == T_Q4_1) {
    const uint8_t* qs = blk + (qt == T_Q4_1 ? 4 : 2);
    for (int e = 0; e < 16; ++e) {
      v[e] = qs[e] & 0xF;
      v[e + 16] = qs[e] >> 4;
    }
  } else if (qt == T_Q6_K) {
    for (int h = 0; h < 2; ++h)
      for (int s4 = 0; s4 < 4; ++s4)
        for (int e = 0; e < 32; ++e) {
          const int l = (blk[64 * h + 32 * (s4 & 1) + e] >> (4 * (s4 >> 1))) & 0xF;
          const int hb = (blk[128 + 32 * h + e] >> (2 * s4)) & 3;
          v[128 * h + 32 * s4 + e] = static_cast<uint8_t>(l | (hb << 4));
        }
  } else {
    const bool five = qt == T_Q5_K;
    const uint8_t* qs = blk + (five ? 48 : 16);
    const uint8_t* qh = blk + 16;
    for (int j = 0; j < 8; ++j)
      for (int e = 0; e < 32; ++e)
        v[32 * j + e] = ((qs[32 * (j / 2) + e] >> (4 * (j & 1))) & 0xF) | (five ? ((qh[e] >> j) & 1) << 4 : 0);
  }
}

// Repack rows [0, rows) (rows <= 8) of GGUF bytes into one group of x8 super-blocks.
template <int64_t qt>
void repack_x8_group_t(const uint8_t* raw, int64_t bpr, int64_t rows, int64_t K, uint8_t* out) {
  const TypeInfo ti = type_info(qt);
  const X8Format f = x8_format(qt);
  const bool kquant = f.cols == 256;
  uint8_t v[256];
  for (int64_t sb = 0; sb < K / f.cols; ++sb) {
    uint8_t* p = out + sb * f.bytes;
    std::memset(p, 0, f.bytes);
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* blk = raw + r * bpr + sb * ti.bytes;
      const bool q6 = qt == T_Q6_K;
      std::memcpy(p + 2 * r, blk + (q6 ? 208 : 0), 2);                                // d
      if (qt == T_Q4_1 || (kquant && !q6)) std::memcpy(p + 16 + 2 * r, blk + 2, 2);  // m or dmin
      if (q6) {
        for (int hh = 0; hh < 16; ++hh) p[16 + 8 * hh + r] = blk[192 + hh];
      } else if (kquant) {
        uint8_t sc[8], mn[8];
        scale_min_k4(blk + 4, sc, mn);
        for (int j = 0; j < 8; ++j) {
          p[32 + 8 * j + r] = sc[j];
          p[96 + 8 * j + r] = mn[j];
        }
      }
      gguf_block_values(qt, blk, v);
      for (int64_t j = 0; j < f.cols / 32; ++j) {
        uint8_t* q = p + x8_qoff(qt, j);
        for (int k = 0; k < 8; ++k) {
          for (int t = 0; t < 4; ++t) {
            const uint8_t val = v[32 * j + 4 * k + t];
            if (qt == T_Q8_0) {
              q[32 * k + 4 * r + t] = val;
            } else {
              q[32 * (k & 3) + 4 * r + t] |= static_cast<uint8_t>(k < 4 ? (val & 0xF) : (val & 0xF) << 4);
              if (qt == T_Q5_K) q[X8_HI_OFF + 4 * r + t] |= static_cast<uint8_t>(((val >> 4) & 1) << k);
              if (q6) q[X8_HI_OFF + 32 * (k / 4) + 4 * r + t] |= static_cast<uint8_t>(((val >> 4) & 3) << X8_Q6_SHIFT[k & 3]);
            }
          }
        }
      }
    }
  }
}

// Row n of an x8 tensor dequantized exactly (the float operations gguf-py applies to the GGUF block).
template <int64_t qt>
void dequant_row_x8_t(const uint8_t* w, int64_t n, int64_t K, float* out) {
  const X8Format f = x8_format(qt);
  const int64_t nsb = K / f.cols, r = n % 8;
  const uint8_t* g = w + (n / 8) * nsb * f.bytes;
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* p = g + sb * f.bytes;
    const bool q6 = qt == T_Q6_K, k45 = qt == T_Q4_K || qt == T_Q5_K;
    const float dd = fp16(p + 2 * r);
    const float mm = (qt == T_Q4_1 || k45) ? fp16(p + 16 + 2 * r) : 0.0f;
    for (int64_t j = 0; j < f.cols / 32; ++j) {
      const uint8_t* q = p + x8_qoff(qt, j);
      const float dl = k45 ? dd * static_cast<float>(p[32 + 8 * j + r]) : 0.0f;
      const float ml = k45 ? mm * static_cast<float>(p[96 + 8 * j + r]) : 0.0f;
      for (int k = 0; k < 8; ++k) {
        for (int t = 0; t < 4; ++t) {
          float* o = out + sb * f.cols + 32 * j + 4 * k + t;
          if (qt == T_Q8_0) {
            *o = static_cast<float>(static_cast<int8_t>(q[32 * k + 4 * r + t])) * dd;
            continue;
          }
          const uint8_t byte = q[32 * (k & 3) + 4 * r + t];
          int val = k < 4 ? (byte & 0xF) : (byte >> 4);
          if (qt == T_Q5_K) val |= ((q[X8_HI_OFF + 4 * r + t] >> k) & 1) << 4;
          if (q6) {
            val |= ((q[X8_HI_OFF + 32 * (k / 4) + 4 * r + t] >> X8_Q6_SHIFT[k & 3]) & 3) << 4;
            const float dh = dd * static_cast<float>(static_cast<int8_t>(p[16 + 8 * (2 * j + k / 4) + r]));
            *o = dh * static_cast<float>(val - 32);
          } else if (qt == T_Q4_0)
            *o = dd * static_cast<float>(val - 8);
          else if (qt == T_Q4_1)
            *o = dd * static_cast<float>(val) + mm;
          else
            *o = dl * static_cast<float>(val) - ml;
        }
      }
    }
  }
}

// The two above for a type id known at run time (templates, so each type's loops are specialized).
inline void repack_x8_group(int64_t qt, const uint8_t* raw, int64_t bpr, int64_t rows, int64_t K, uint8_t* out) {
  switch (qt) {
    case T_Q4_0: return repack_x8_group_t<T_Q4_0>(raw, bpr, rows, K, out);
    case T_Q4_1: return repack_x8_group_t<T_Q4_1>(raw, bpr, rows, K, out);
    case T_Q8_0: return repack_x8_group_t<T_Q8_0>(raw, bpr, rows, K, out);
    case T_Q4_K: return repack_x8_group_t<T_Q4_K>(raw, bpr, rows, K, out);
    case T_Q5_K: return repack_x8_group_t<T_Q5_K>(raw, bpr, rows, K, out);
    case T_Q6_K: return repack_x8_group_t<T_Q6_K>(raw, bpr, rows, K, out);
    default: return;
  }
}

inline void dequant_row_x8(int64_t qt, const uint8_t* w, int64_t n, int64_t K, float* out) {
  switch (qt) {
    case T_Q4_0: return dequant_row_x8_t<T_Q4_0>(w, n, K, out);
    case T_Q4_1: return dequant_row_x8_t<T_Q4_1>(w, n, K, out);
    case T_Q8_0: return dequant_row_x8_t<T_Q8_0>(w, n, K, out);
    case T_Q4_K: return dequant_row_x8_t<T_Q4_K>(w, n, K, out);
    case T_Q5_K: return dequant_row_x8_t<T_Q5_K>(w, n, K, out);
    case T_Q6_K: return dequant_row_x8_t<T_Q6_K>(w, n, K, out);
    default: return;
  }
}

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Whether this CPU (and OS) can run the AVX-512 VNNI tiles, and whether they are used: by default where
// supported, unless LLAMAFORGE_X8_TILES=avx2 in the environment (the AVX2 tiles, as AVX2-only CPUs such as
// Zen 3 run them; for tests and benchmarks on AVX-512 machines); use_vnni() switches at run time.
inline bool vnni_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return ok;
}

inline bool& vnni_enabled() {
  static bool on = [] {
    const char* env = std::getenv("LLAMAFORGE_X8_TILES");
    return vnni_supported() && !(env != nullptr && std::strcmp(env, "avx2") == 0);
  }();
  return on;
}

}  // namespace lfq
