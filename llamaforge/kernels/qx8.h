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

inline uint32_t ld32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline void st32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
constexpr uint32_t X8_NIB = 0x0F0F0F0Fu;  // the low nibble of each byte of a word

// The integer values of GGUF block `blk` at columns 32j + 4k .. 32j + 4k + 3 (sub-block j of a K-quant's 8;
// j = 0 for the 32-column types), one per byte of a word in column order (x86 is little-endian). Whole
// words, not bytes: a shift moves each byte's bits down, the mask drops what came in from the next byte.
template <int64_t qt>
inline uint32_t block_word(const uint8_t* blk, int j, int k) {
  if constexpr (qt == T_Q8_0) {
    return ld32(blk + 2 + 4 * k);
  } else if constexpr (qt == T_Q4_0 || qt == T_Q4_1) {  // values 0-15 low nibbles, 16-31 high ones
    return (ld32(blk + (qt == T_Q4_1 ? 4 : 2) + 4 * (k & 3)) >> (k < 4 ? 0 : 4)) & X8_NIB;
  } else if constexpr (qt == T_Q6_K) {  // sub-block j = 4h + s4: low nibbles and two high bits
    const int h = j / 4, s4 = j % 4;
    const uint32_t lo = (ld32(blk + 64 * h + 32 * (s4 & 1) + 4 * k) >> (4 * (s4 >> 1))) & X8_NIB;
    const uint32_t hi = (ld32(blk + 128 + 32 * h + 4 * k) >> (2 * s4)) & 0x03030303u;
    return lo | hi << 4;
  } else {  // Q4_K / Q5_K: sub-blocks 2i and 2i + 1 are the low and high nibbles of 32 bytes; Q5_K's fifth bits
    const uint32_t lo = (ld32(blk + (qt == T_Q5_K ? 48 : 16) + 32 * (j / 2) + 4 * k) >> (4 * (j & 1))) & X8_NIB;
    if constexpr (qt == T_Q5_K) return lo | ((ld32(blk + 16 + 4 * k) >> j) & 0x01010101u) << 4;
    return lo;
  }
}

// Repack rows [0, rows) (rows <= 8) of GGUF bytes into one group of x8 super-blocks (a last partial group's
// other rows zero). Each plane's bytes are put together a word (4 columns of one row) at a time, the sub-block
// loop unrolled: one core repacks a 1B file's weights 2.6-3.6x as fast as byte by byte (Q4_K_M 0.72-0.94 ->
// 0.28-0.30 s, Q5_K_M 1.3 -> 0.37, Q6_K 1.6-1.8 -> 0.53; Q4_0 / Q8_0 1.5-2.1x: benchmarks/repack_speed.py).
template <int64_t qt>
void repack_x8_group_t(const uint8_t* raw, int64_t bpr, int64_t rows, int64_t K, uint8_t* out) {
  const TypeInfo ti = type_info(qt);
  const X8Format f = x8_format(qt);
  constexpr bool q6 = qt == T_Q6_K, k45 = qt == T_Q4_K || qt == T_Q5_K;
  for (int64_t sb = 0; sb < K / f.cols; ++sb) {
    uint8_t* p = out + sb * f.bytes;
    if (rows < 8) std::memset(p, 0, f.bytes);
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* blk = raw + r * bpr + sb * ti.bytes;
      std::memcpy(p + 2 * r, blk + (q6 ? 208 : 0), 2);                       // d
      if (qt == T_Q4_1 || k45) std::memcpy(p + 16 + 2 * r, blk + 2, 2);     // m or dmin
      if constexpr (q6) {
        for (int hh = 0; hh < 16; ++hh) p[16 + 8 * hh + r] = blk[192 + hh];
      } else if constexpr (k45) {
        uint8_t sc[8], mn[8];
        scale_min_k4(blk + 4, sc, mn);
        for (int j = 0; j < 8; ++j) {
          p[32 + 8 * j + r] = sc[j];
          p[96 + 8 * j + r] = mn[j];
        }
      }
#pragma GCC unroll 8
      for (int j = 0; j < f.cols / 32; ++j) {  // unrolled: each j's shifts and offsets become constants
        uint8_t* q = p + x8_qoff(qt, j) + 4 * r;
        uint32_t w[8];
        for (int k = 0; k < 8; ++k) w[k] = block_word<qt>(blk, j, k);
        if constexpr (qt == T_Q8_0) {
          for (int k = 0; k < 8; ++k) st32(q + 32 * k, w[k]);
          continue;
        }
        for (int k = 0; k < 4; ++k) st32(q + 32 * k, (w[k] & X8_NIB) | (w[k + 4] & X8_NIB) << 4);  // nibble plane
        if constexpr (qt == T_Q5_K) {  // bit k of a byte: the fifth bit of value k
          uint32_t b = 0;
          for (int k = 0; k < 8; ++k) b |= ((w[k] >> 4) & 0x01010101u) << k;
          st32(q + X8_HI_OFF, b);
        } else if constexpr (q6) {  // two bits of values 4i .. 4i + 3 in byte 32i + 4r + t
          for (int i = 0; i < 2; ++i) {
            uint32_t b = 0;
            for (int k = 4 * i; k < 4 * i + 4; ++k) b |= ((w[k] >> 4) & 0x03030303u) << X8_Q6_SHIFT[k & 3];
            st32(q + X8_HI_OFF + 32 * i, b);
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
