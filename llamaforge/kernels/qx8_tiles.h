// The x8 matmul tiles (layout in qx8.h). qkernels.cpp includes this file twice: as namespace
// lfq::tiles_avx2 with LFQ_TILE_VNNI 0 (plain AVX2: _mm256_maddubs_epi16 sums in int16, widened by
// _mm256_madd_epi16), and inside a `#pragma GCC target` region as lfq::tiles_vnni with
// LFQ_TILE_VNNI 1 (AVX-512 VNNI's vpdpbusd: u8 x s8 summed straight into int32). Both compute the
// same exact integer sums followed by the same float operations, so their results are identical.
//
// A tile is one group of 8 weight rows (V8: 256-bit vectors) against MR activation rows: per 32-column
// block (Q4_0 / Q4_1 / Q8_0) or 256-column super-block (the K-quants, on Q8_K activations: see tile) and
// activation row, one int32 vector holds the 8 rows' integer dot products, scaled once in float.
// With VNNI and more than 4 activation rows (prefill, speculative verification, batches), a tile takes
// two adjacent groups in 512-bit vectors instead (V16: group g in the low half, g + 1 in the high half):
// the same operations on each lane, so the same results, in half the instructions (Zen 4 runs a 512-bit
// op as two 256-bit halves,
// so the multiply work per cycle is the same; what halves is the rest: broadcasts, unpacking, scaling,
// loop overhead, and the front end's uops). Up to 4 rows keep V8: one group streams front to back, where
// two groups at once are two streams, and at 1-4 rows the stream is what bounds the time; from 5 rows the
// instructions do (1B Q4_K_M, one thread: 5-8 rows 12-20% faster on V16, 2-4 rows no faster). That holds
// for the K-quants; Q4_0 / Q4_1 / Q8_0 take V16 only from 9 rows: at 5-8 rows (speculative verification)
// their V8 tile in one pass of all the rows is 1.4-2x faster (the default model's Q4_1 layers and Q8_0
// output, one thread: 8 rows 7.3 against 10.0-11.1 ms, 5 rows 4.6-5.4 against 6.8-7.5 ms).
// The tile body is written once over the vector traits.
// What bounds the VNNI tiles from 5 rows on (Zen 4, measured with a register-only loop: 3.6 G vpdpbusd zmm/s
// at 3.4 GHz, about one a cycle): vpdpbusd, vpdpwssd and vpmulld share those pipes (one zmm a cycle in all),
// while and / or / shifts / adds / broadcast loads go beside them up to two zmm ops a cycle in all. A K-quant
// super-block needs one vpmulld per 4 (Q6_K: per 16-column half) or 8 (Q4_K / Q5_K) vpdpbusd to apply its
// sub-block scales exactly, and Q4_K / Q5_K one vpdpwssd per 8 for the mins: so ~80% of the vpdpbusd rate is
// their ceiling (measured in L2: Q4_K 330, Q5_K 320, Q6_K 310 GOP/s a core at M = 8-64, of 460).
// The AVX2 K-quant tiles (no vpdpbusd: vpmaddubsw sums 2 products per int16 lane, vpmaddwd widens by the
// sub-block scales), per 32 weights (one ymm of 8 rows x 4 columns) and activation row, 6 rows per tile:
//   Q4_K (dot_kq): 1 broadcast load, 1 vpmaddubsw + 1/4 vpmaddwd (the multiply pipes: 1.25), 3/4 vpaddw +
//     1/4 vpaddd, unpacking 1.5 / 6 rows, the mins 1/4 (8 vpmaddwd + 8 vpaddd per 256 columns): ~2.75 vector ops;
//   Q5_K: the fifth bits add 3 / 6 rows: ~3.25;
//   Q6_K (half_q6): 1 broadcast, 1 vpmaddubsw + 1/2 vpmaddwd (1.5), 1/2 vpaddw + 1/2 vpaddd, unpacking ~4 / 6
//     rows, the -32 offset 1/4 (one vpmaddwd of the half sums per 32 columns): ~3.4.
// With 2 ymm integer multiplies and 4 vector ops a cycle in all (Zen 3 / Zen 4), Q4_K is bound about as much by
// the multiply pipes (0.63 cycles) as by the vector issue width (0.69), Q6_K by the issue width (0.85); 8 rows
// per tile would amortize the unpacking further but do not fit the registers (measured no faster). Before, the
// tiles kept 4 rows of 2 (Q4_K: int16 + int32) or 4 (Q6_K) vectors, and GCC reassociated each int16 chain into
// a tree holding all of a sub-block's products at once: most vectors went through the stack (see `keep`).
// No include guard on purpose.

namespace lfq {
namespace LFQ_TILE_NS {

// Activation rows per tile: VNNI has 32 registers; AVX2's 16 hold 4 rows of dot_u's two accumulators (int16
// and int32 sums: Q4_0 / Q4_1) or 6 rows of the K-quant tiles' one (dot_kq, half_q6; 8 rows measured no faster).
template <int64_t QT>
constexpr int mr_max() {
  return LFQ_TILE_VNNI ? 8 : QT == T_Q4_K || QT == T_Q5_K || QT == T_Q6_K ? 6 : 4;
}

// One group of 8 weight rows per vector. `gs` (the byte distance to the next group) is unused here.
struct V8 {
  using I = __m256i;
  using F = __m256;
  static I load(const uint8_t* p, int64_t) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static F f16(const uint8_t* p, int64_t) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F u8(const uint8_t* p, int64_t) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static I i8(const uint8_t* p, int64_t) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static I u8i(const uint8_t* p, int64_t) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static I bcast(const void* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  }
  static I set8(char c) { return _mm256_set1_epi8(c); }
  static I set32(int32_t v) { return _mm256_set1_epi32(v); }
  static I zero() { return _mm256_setzero_si256(); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  static I srli16(I a, int n) { return _mm256_srli_epi16(a, n); }
  static I slli16(I a, int n) { return _mm256_slli_epi16(a, n); }
  static I slli32(I a, int n) { return _mm256_slli_epi32(a, n); }
  static I add32(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub32(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I mullo32(I a, I b) { return _mm256_mullo_epi32(a, b); }
  static I madd16(I a, I b) { return _mm256_madd_epi16(a, b); }
#if LFQ_TILE_VNNI
  static I dpbusd(I acc, I u, I s) { return _mm256_dpbusd_epi32(acc, u, s); }
  static I dpwssd(I acc, I a, I b) { return _mm256_dpwssd_epi32(acc, a, b); }
#endif
  static F fzero() { return _mm256_setzero_ps(); }
  static F setf(float v) { return _mm256_set1_ps(v); }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static void store(float* out, F v, int64_t nvalid) {
    if (nvalid == 8) {
      _mm256_storeu_ps(out, v);
      return;
    }
    float tmp[8];
    _mm256_storeu_ps(tmp, v);
    for (int64_t r = 0; r < nvalid; ++r) out[r] = tmp[r];
  }
};

#if LFQ_TILE_VNNI
// Two adjacent groups (16 weight rows) per vector: lanes 0-7 from the group at p, 8-15 from p + gs.
struct V16 {
  using I = __m512i;
  using F = __m512;
  static __m128i lo64(const uint8_t* p, int64_t gs) {  // 8 bytes of each group
    return _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)),
                              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + gs)));
  }
  static I load(const uint8_t* p, int64_t gs) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + gs)), 1);
  }
  static F f16(const uint8_t* p, int64_t gs) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + gs));
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1));
  }
  static F u8(const uint8_t* p, int64_t gs) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo64(p, gs))); }
  static I i8(const uint8_t* p, int64_t gs) { return _mm512_cvtepi8_epi32(lo64(p, gs)); }
  static I u8i(const uint8_t* p, int64_t gs) { return _mm512_cvtepu8_epi32(lo64(p, gs)); }
  static I bcast(const void* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  static I set8(char c) { return _mm512_set1_epi8(c); }
  static I set32(int32_t v) { return _mm512_set1_epi32(v); }
  static I zero() { return _mm512_setzero_si512(); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
  static I srli16(I a, int n) { return _mm512_srli_epi16(a, n); }
  static I slli16(I a, int n) { return _mm512_slli_epi16(a, n); }
  static I slli32(I a, int n) { return _mm512_slli_epi32(a, n); }
  static I add32(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub32(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I mullo32(I a, I b) { return _mm512_mullo_epi32(a, b); }
  static I madd16(I a, I b) { return _mm512_madd_epi16(a, b); }
  static I dpbusd(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
  static I dpwssd(I acc, I a, I b) { return _mm512_dpwssd_epi32(acc, a, b); }
  static F fzero() { return _mm512_setzero_ps(); }
  static F setf(float v) { return _mm512_set1_ps(v); }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static void store(float* out, F v, int64_t nvalid) {
    _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << nvalid) - 1), v);
  }
};
#endif

#if !LFQ_TILE_VNNI
// GCC reassociates a chain of integer adds into a tree that keeps every product live at once (the AVX2
// tiles then spilled most of their vectors to the stack: 1.3-1.6x slower); an empty asm on the accumulator
// keeps the chain in program order. No instruction.
inline __m256i keep(__m256i v) {
  asm("" : "+x"(v));
  return v;
}
#endif

// Q5_K: bit k of each byte of a fifth-bit plane vector moved to bit 4 (0x10), the rest cleared.
template <class V>
inline typename V::I fifth_bit(typename V::I h, int k) {
  const typename V::I m = V::set8(0x10);
  return V::and_(k < 4 ? V::slli16(h, 4 - k) : k == 4 ? h : V::srli16(h, k - 4), m);
}

// int32 lanes (one per weight row) += 32-column dot products of a nibble plane (+ the fifth bits at
// q + X8_HI_OFF) with MR activation blocks xb[i]. VNNI, decode (MR <= 4): the low and high nibbles' products
// go into two int32 chains of 4 vpdpbusd, added at the end (one chain of 8 waits 8 latencies per block:
// at M = 1 that, not the loads, bounded the tile in L2 to ~25 GB/s a core); integer sums, so the same bits.
// AVX2 (Q4_0 / Q4_1 only: its K-quants take dot_kq) multiplies the sums by the int16 pairs `mul16` of each lane
// as it widens them (ones); VNNI ignores it.
template <class V, int MR, bool FIVE>
inline void dot_u(const uint8_t* q, int64_t gs, const int8_t* const* xb, typename V::I* s32,
                  [[maybe_unused]] typename V::I mul16) {
  using I = typename V::I;
  const I lo4 = V::set8(0x0F);
  I h = V::zero();
  if constexpr (FIVE) h = V::load(q + X8_HI_OFF, gs);
#if LFQ_TILE_VNNI
  constexpr bool TWO = MR <= 4;
  I t32[TWO ? MR : 1];
  if constexpr (TWO)
    for (int i = 0; i < MR; ++i) t32[i] = V::zero();
#else
  static_assert(!FIVE, "the AVX2 Q5_K tiles take dot_kq");
  __m256i s16[MR];
  for (int i = 0; i < MR; ++i) s16[i] = _mm256_setzero_si256();
#endif
  for (int j = 0; j < 4; ++j) {
    const I p = V::load(q + 32 * j, gs);
    I lo = V::and_(p, lo4);                // W_j
    I hi = V::and_(V::srli16(p, 4), lo4);  // W_{j+4}
    if constexpr (FIVE) {
      lo = V::or_(lo, fifth_bit<V>(h, j));
      hi = V::or_(hi, fifth_bit<V>(h, j + 4));
    }
    for (int i = 0; i < MR; ++i) {
#if LFQ_TILE_VNNI
      s32[i] = V::dpbusd(s32[i], lo, V::bcast(xb[i] + 4 * j));
      if constexpr (TWO) t32[i] = V::dpbusd(t32[i], hi, V::bcast(xb[i] + 16 + 4 * j));
      else s32[i] = V::dpbusd(s32[i], hi, V::bcast(xb[i] + 16 + 4 * j));
#else
      s16[i] = keep(_mm256_add_epi16(s16[i], _mm256_maddubs_epi16(lo, V::bcast(xb[i] + 4 * j))));
      s16[i] = keep(_mm256_add_epi16(s16[i], _mm256_maddubs_epi16(hi, V::bcast(xb[i] + 16 + 4 * j))));
#endif
    }
#if !LFQ_TILE_VNNI
    // An int16 lane holds at most 8 products of 4-bit weights (8 * 2 * 15 * 127 < 2^15).
    if (j == 3) {
      for (int i = 0; i < MR; ++i) {
        s32[i] = _mm256_add_epi32(s32[i], _mm256_madd_epi16(s16[i], mul16));
        s16[i] = _mm256_setzero_si256();
      }
    }
#endif
  }
#if LFQ_TILE_VNNI
  if constexpr (TWO)
    for (int i = 0; i < MR; ++i) s32[i] = V::add32(s32[i], t32[i]);
#endif
}

#if !LFQ_TILE_VNNI
// Q4_K / Q5_K, AVX2: int32 lanes s32[i] += the sub-block's 32-column dot products with activation block xb[i],
// times the sub-block scales (int16 pairs mul16: vpmaddwd widens and scales at once). Two nibble vectors (16
// columns) at a time: their four vpmaddubsw per activation row are summed in int16 (|4 * 2 * 31 * 127| < 2^15)
// and widened at once, so only s32 stays live per row and MR_K rows fit the 16 registers (dot_u keeps an int16
// sum per row across the sub-block: 4 rows).
template <class V, int MR, bool FIVE>
inline void dot_kq(const uint8_t* q, const int8_t* const* xb, __m256i* s32, __m256i mul16) {
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  __m256i h = _mm256_setzero_si256();
  if constexpr (FIVE) h = V::load(q + X8_HI_OFF, 0);
  for (int j = 0; j < 4; j += 2) {
    __m256i w[4];  // values j, j + 4, j + 1, j + 5 (columns 4j.., 4j + 16.., 4j + 4.., 4j + 20..)
    for (int u = 0; u < 2; ++u) {
      const __m256i p = V::load(q + 32 * (j + u), 0);
      w[2 * u] = _mm256_and_si256(p, lo4);
      w[2 * u + 1] = _mm256_and_si256(_mm256_srli_epi16(p, 4), lo4);
      if constexpr (FIVE) {
        w[2 * u] = _mm256_or_si256(w[2 * u], fifth_bit<V>(h, j + u));
        w[2 * u + 1] = _mm256_or_si256(w[2 * u + 1], fifth_bit<V>(h, j + u + 4));
      }
    }
    for (int i = 0; i < MR; ++i) {
      const __m256i a = _mm256_add_epi16(_mm256_maddubs_epi16(w[0], V::bcast(xb[i] + 4 * j)),
                                         _mm256_maddubs_epi16(w[1], V::bcast(xb[i] + 16 + 4 * j)));
      const __m256i b = _mm256_add_epi16(_mm256_maddubs_epi16(w[2], V::bcast(xb[i] + 4 * j + 4)),
                                         _mm256_maddubs_epi16(w[3], V::bcast(xb[i] + 20 + 4 * j)));
      s32[i] = keep(_mm256_add_epi32(s32[i], _mm256_madd_epi16(_mm256_add_epi16(a, b), mul16)));
    }
  }
}
#endif

// Q6_K: bits 4-5 of value k (k % 4 = j) of a two-bit plane vector, in place (qx8.h: stored at 4-5, 6-7, 0-1, 2-3).
template <class V>
inline typename V::I q6_high(typename V::I h, int j) {
  const typename V::I m = V::set8(0x30);
  return V::and_(j == 0 ? h : j == 1 ? V::srli16(h, 2) : j == 2 ? V::slli16(h, 4) : V::slli16(h, 2), m);
}

#if LFQ_TILE_VNNI
// Q6_K, VNNI: tot[i] += sc * s_i for one 16-column half (HALF 0: the first 16 columns of the sub-block at q,
// low nibbles with the two-bit plane at q + X8_HI_OFF; HALF 1: the last 16, high nibbles with the plane at
// + 32), where s_i starts at the activations' -32 * sum of the half (start[i][h], int32) and gathers the
// dot products of the 6-bit values with activation row i: so s_i = sum_16 (q - 32) x exactly. One half at
// a time keeps two vectors per activation row (s, tot), so 8 rows fit the 32 registers; p holds the
// sub-block's four nibble vectors, loaded once for both halves.
template <class V, int MR, int HALF>
inline void half_q6(const typename V::I* p, typename V::I h, typename V::I sc, const int8_t* const* xb,
                    const int32_t (*start)[16], int64_t hh, typename V::I* tot) {
  using I = typename V::I;
  const I lo4 = V::set8(0x0F);
  I s[MR];
  for (int i = 0; i < MR; ++i) s[i] = V::bcast(start[i] + hh);
  for (int k = 0; k < 4; ++k) {
    const I w = V::or_(V::and_(HALF ? V::srli16(p[k], 4) : p[k], lo4), q6_high<V>(h, k));
    for (int i = 0; i < MR; ++i) s[i] = V::dpbusd(s[i], w, V::bcast(xb[i] + 16 * HALF + 4 * k));
  }
  for (int i = 0; i < MR; ++i) tot[i] = V::add32(tot[i], V::mullo32(s[i], sc));
}
#else
// Q6_K, AVX2: tot[i] += sc * s_i for one 16-column half (HALF as half_q6), where s_i is the dot product of
// the half's 6-bit values (0..63, the -32 applied once per super-block from the activations' sums) with
// activation row i: vpmaddubsw sums two products per int16 lane, two of those are added (|2 * 2 * 63 * 127| <
// 2^15), and vpmaddwd by the int16 pairs (sc, sc) widens and scales them at once; exact int32 sums. Only
// tot stays live per activation row (the pair's int16 sum is transient), so 6 rows fit the 16 registers.
template <class V, int MR, int HALF>
inline void half_q6(const uint8_t* q, int64_t gs, typename V::I h, typename V::I sc, const int8_t* const* xb,
                    typename V::I* tot) {
  using I = typename V::I;
  const I lo4 = V::set8(0x0F);
  for (int k = 0; k < 4; k += 2) {
    const I p0 = V::load(q + 32 * k, gs), p1 = V::load(q + 32 * (k + 1), gs);
    const I w0 = V::or_(V::and_(HALF ? V::srli16(p0, 4) : p0, lo4), q6_high<V>(h, k));
    const I w1 = V::or_(V::and_(HALF ? V::srli16(p1, 4) : p1, lo4), q6_high<V>(h, k + 1));
    for (int i = 0; i < MR; ++i) {
      const I s16 = _mm256_add_epi16(_mm256_maddubs_epi16(w0, V::bcast(xb[i] + 16 * HALF + 4 * k)),
                                     _mm256_maddubs_epi16(w1, V::bcast(xb[i] + 16 * HALF + 4 * k + 4)));
      tot[i] = keep(V::add32(tot[i], V::madd16(s16, sc)));
    }
  }
}
#endif

// int32 lanes += 32-column dot products of an int8 plane (Q8_0) with MR activation blocks. VNNI reads the
// activations flipped (x + 128 as unsigned bytes: `groups` makes them once per call, not once per weight group).
template <class V, int MR>
inline void dot_s8(const uint8_t* q, int64_t gs, const int8_t* const* xb, typename V::I* s32) {
#if LFQ_TILE_VNNI
  using I = typename V::I;
  // (x + 128) * w with x + 128 unsigned, minus 128 * sum(w) (one more vpdpbusd against ones).
  const I one8 = V::set8(1);
  I sw = V::zero();
  for (int k = 0; k < 8; ++k) {
    const I w = V::load(q + 32 * k, gs);
    sw = V::dpbusd(sw, one8, w);
    for (int i = 0; i < MR; ++i) s32[i] = V::dpbusd(s32[i], V::bcast(xb[i] + 4 * k), w);
  }
  const I corr = V::slli32(sw, 7);
  for (int i = 0; i < MR; ++i) s32[i] = V::sub32(s32[i], corr);
#else
  // |w| * (x with w's sign): maddubs needs an unsigned operand; pairs stay below 2^15.
  const __m256i ones = _mm256_set1_epi16(1);
  for (int k = 0; k < 8; ++k) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * k));
    const __m256i aw = _mm256_sign_epi8(w, w);
    for (int i = 0; i < MR; ++i) {
      const __m256i xv = _mm256_sign_epi8(V::bcast(xb[i] + 4 * k), w);
      s32[i] = _mm256_add_epi32(s32[i], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), ones));
    }
  }
#endif
}

// Each lane of a (int32: the same in both) as an int16 pair (v, v), for vpmaddwd.
template <class V>
inline typename V::I pair16(typename V::I v) {
  return V::or_(V::and_(v, V::set32(0xFFFF)), V::slli32(v, 16));
}

// acc + the vpmaddwd of int16 pairs a, b (VNNI: one vpdpwssd).
template <class V>
inline typename V::I madd_acc(typename V::I acc, typename V::I a, typename V::I b) {
#if LFQ_TILE_VNNI
  return V::dpwssd(acc, a, b);
#else
  return V::add32(acc, V::madd16(a, b));
#endif
}

// The weight rows of the group(s) at gw (8 per group; the next group gs bytes on) against activation rows
// m0 .. m0 + MR - 1; the first nvalid rows are stored into y (row-major, ldy floats per row).
// Q4_0 / Q4_1 / Q8_0 read the activations' blocks of 32: per block, acc += float(isum) * (d_w * d_x) + m_w * s_x.
// The K-quants read their Q8_K form (one d_x per 256 columns, int16 sums per 16) as llama.cpp's
// ggml_vec_dot_q*_K_q8_K: the sub-block scales (and Q4_K/Q5_K's mins) multiply integer sums, so a super-block
// is one exact int32 sum per weight row and activation row, scaled once in float:
//     Q6_K:        acc += float(sum_h sc_h * sum_16(q - 32) x) * (d_w * d_x)
//     Q4_K / Q5_K: acc += float(sum_j sc_j * sum_32 q x) * (d_w * d_x) - float(sum_j mn_j * sum_32 x) * (dmin_w * d_x)
// (|sums| < 2^29: 256 columns of 6-bit values times 8-bit scales times 127.)
template <class V, int64_t QT, int MR>
inline void tile(const uint8_t* gw, int64_t gs, int64_t nsb, const Act& a, int64_t m0, float* y, int64_t ldy,
                 int64_t nvalid, int64_t pf) {
  using I = typename V::I;
  using F = typename V::F;
  constexpr bool KQ = QT == T_Q4_K || QT == T_Q5_K || QT == T_Q6_K;
  constexpr int64_t SB = QT == T_Q4_0   ? 144
                         : QT == T_Q4_1 ? 160
                         : QT == T_Q8_0 ? 272
                         : QT == T_Q4_K ? 1184
                         : QT == T_Q5_K ? 1440
                                        : 1680;
  F acc[MR];
  const int8_t* xq[MR];  // blocks of 32: q, d, s; Q8_K: q, d, bsums
  const float* xd[MR];
  const float* xs[MR];
  const int16_t* xbs[MR];
  const int8_t* xb[MR];
  I s32[MR];
  for (int i = 0; i < MR; ++i) {
    acc[i] = V::fzero();
    if constexpr (KQ) {
      xq[i] = a.kq + (m0 + i) * a.K;
      xd[i] = a.kd + (m0 + i) * (a.K / 256);
      xbs[i] = a.kbs + (m0 + i) * (a.K / 16);
    } else {
      xq[i] = a.q + (m0 + i) * a.K;
      xd[i] = a.d + (m0 + i) * a.nb;
      xs[i] = a.s + (m0 + i) * a.nb;
    }
  }
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* p = gw + sb * SB;
    if (pf > 0)  // decode sizes (tile_rows): the lines `pf` bytes ahead of this super-block (past the weight: no fault)
      for (int64_t l = 0; l < SB; l += 64)
        _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + pf + l), _MM_HINT_T0);
    const F dvec = V::f16(p, gs);
    if constexpr (QT == T_Q6_K) {
      I tot[MR];  // this super-block's int32 sum
      for (int i = 0; i < MR; ++i) tot[i] = V::zero();
#if LFQ_TILE_VNNI
      // The values are stored + 32: each half's sum starts at -32 times the activations' sum of its 16 columns.
      alignas(64) int32_t start[MR][16];
      for (int i = 0; i < MR; ++i) {
        const __m512i bs = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xbs[i] + 16 * sb)));
        _mm512_store_si512(start[i], _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(bs, 5)));
      }
      for (int64_t j = 0; j < 8; ++j) {
        const uint8_t* q = p + x8_qoff(QT, j);
        I pk[4];
        for (int k = 0; k < 4; ++k) pk[k] = V::load(q + 32 * k, gs);
        for (int i = 0; i < MR; ++i) xb[i] = xq[i] + 256 * sb + 32 * j;
        half_q6<V, MR, 0>(pk, V::load(q + X8_HI_OFF, gs), V::i8(p + 16 + 16 * j, gs), xb, start, 2 * j, tot);
        half_q6<V, MR, 1>(pk, V::load(q + X8_HI_OFF + 32, gs), V::i8(p + 24 + 16 * j, gs), xb, start, 2 * j + 1, tot);
      }
#else
      // The values are stored + 32: -32 * (sca * sum_a(x) + scb * sum_b(x)) per sub-block, one vpmaddwd of the
      // int16 pairs (-32 sca, -32 scb) (the 16 scale bytes interleaved) with the activations' sums of the two
      // halves (|32 * 128|, |16 * 127| < 2^15).
      for (int64_t j = 0; j < 8; ++j) {
        const uint8_t* q = p + x8_qoff(QT, j);
        const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 + 16 * j));  // sca[8] | scb[8]
        const I ab = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(sc8, _mm_srli_si128(sc8, 8)));  // (sca, scb) per lane
        const I neg = _mm256_sub_epi16(V::zero(), _mm256_slli_epi16(ab, 5));
        const I sca = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(sc8, sc8));  // (sca, sca) per lane
        const I scb = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(sc8, sc8));
        for (int i = 0; i < MR; ++i) {
          xb[i] = xq[i] + 256 * sb + 32 * j;
          tot[i] = V::add32(tot[i], V::madd16(V::bcast(xbs[i] + 16 * sb + 2 * j), neg));
        }
        half_q6<V, MR, 0>(q, gs, V::load(q + X8_HI_OFF, gs), sca, xb, tot);
        half_q6<V, MR, 1>(q, gs, V::load(q + X8_HI_OFF + 32, gs), scb, xb, tot);
      }
#endif
      for (int i = 0; i < MR; ++i) acc[i] = V::fma(V::cvt(tot[i]), V::mul(dvec, V::setf(xd[i][sb])), acc[i]);
    } else if constexpr (!KQ) {
      const int64_t b = sb;
      for (int i = 0; i < MR; ++i) {
        xb[i] = xq[i] + 32 * b;
        s32[i] = V::zero();
      }
      if constexpr (QT == T_Q8_0)
        dot_s8<V, MR>(p + 16, gs, xb, s32);
      else
        dot_u<V, MR, false>(p + x8_qoff(QT, 0), gs, xb, s32, V::set32(0x00010001));
      const F mv = QT == T_Q4_1 ? V::f16(p + 16, gs) : V::mul(dvec, V::setf(-8.0f));
      for (int i = 0; i < MR; ++i) {
        acc[i] = V::fma(V::cvt(s32[i]), V::mul(dvec, V::setf(xd[i][b])), acc[i]);
        if constexpr (QT != T_Q8_0) acc[i] = V::fma(mv, V::setf(xs[i][b]), acc[i]);
      }
    } else {  // Q4_K, Q5_K
      const F dmin = V::f16(p + 16, gs);
      I tot[MR];
      for (int i = 0; i < MR; ++i) tot[i] = V::zero();
      for (int64_t j = 0; j < 8; ++j) {
        const I sc = V::u8i(p + 32 + 8 * j, gs);  // int32 lanes
        for (int i = 0; i < MR; ++i) xb[i] = xq[i] + 256 * sb + 32 * j;
#if LFQ_TILE_VNNI
        for (int i = 0; i < MR; ++i) s32[i] = V::zero();
        dot_u<V, MR, QT == T_Q5_K>(p + x8_qoff(QT, j), gs, xb, s32, sc);
        for (int i = 0; i < MR; ++i) tot[i] = V::add32(tot[i], V::mullo32(s32[i], sc));
#else
        dot_kq<V, MR, QT == T_Q5_K>(p + x8_qoff(QT, j), xb, tot, pair16<V>(sc));
#endif
      }
      // The mins' sum: sum_j mn_j * (bsum_2j + bsum_2j+1), one vpmaddwd of (mn_j, mn_j) with the pair of sums.
      for (int i = 0; i < MR; ++i) s32[i] = V::zero();
      for (int64_t j = 0; j < 8; ++j) {
        const I mn = pair16<V>(V::u8i(p + 96 + 8 * j, gs));
        for (int i = 0; i < MR; ++i) s32[i] = madd_acc<V>(s32[i], V::bcast(xbs[i] + 16 * sb + 2 * j), mn);
      }
      for (int i = 0; i < MR; ++i) {
        const F dx = V::setf(xd[i][sb]);
        acc[i] = V::fma(V::cvt(tot[i]), V::mul(dvec, dx), acc[i]);
        acc[i] = V::fnma(V::cvt(s32[i]), V::mul(dmin, dx), acc[i]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) V::store(y + (m0 + i) * ldy, acc[i], nvalid);
}

// The rows at gw against all M activation rows: mr_max rows per tile, then one tile of the rest (each tile
// unpacks the weights once: at 5-7 rows, 4 + 3 cost two unpackings). VNNI's Q6_K tiles keep two vectors per
// activation row (half_q6), so 8 rows fit the 32 registers (they were 6 rows with four vectors per row).
template <class V, int64_t QT>
inline void tile_rows(const uint8_t* gw, int64_t gs, int64_t nsb, const Act& a, int64_t M, float* yg, int64_t N,
                      int64_t nvalid) {
  constexpr int MR = mr_max<QT>();
  const int64_t pf = M <= 4 ? x8_prefetch_bytes() : 0;  // decode sizes only: one group of 8 rows per tile
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile<V, QT, MR>(gw, gs, nsb, a, m, yg, N, nvalid, pf);
  if constexpr (MR > 4) {  // 5-7 rows left: one tile (each tile unpacks the weights once)
    switch (M - m) {
      case 7: return tile<V, QT, 7>(gw, gs, nsb, a, m, yg, N, nvalid, pf);
      case 6: return tile<V, QT, 6>(gw, gs, nsb, a, m, yg, N, nvalid, pf);
      case 5: return tile<V, QT, 5>(gw, gs, nsb, a, m, yg, N, nvalid, pf);
      case 4: return tile<V, QT, 4>(gw, gs, nsb, a, m, yg, N, nvalid, pf);
      default: break;
    }
  }
  switch (M - m) {
    case 3: tile<V, QT, 3>(gw, gs, nsb, a, m, yg, N, nvalid, pf); break;
    case 2: tile<V, QT, 2>(gw, gs, nsb, a, m, yg, N, nvalid, pf); break;
    case 1: tile<V, QT, 1>(gw, gs, nsb, a, m, yg, N, nvalid, pf); break;
    default: break;
  }
}

// Groups [g0, g1) of an x8 weight against all M activation rows; y is (M, N) row-major.
template <int64_t QT>
void groups(const uint8_t* w, int64_t g0, int64_t g1, int64_t N, int64_t K, const Act& a_in, int64_t M, float* y) {
  const X8Format f = x8_format(QT);
  const int64_t nsb = K / f.cols, gbytes = nsb * f.bytes;
  Act a = a_in;
#if LFQ_TILE_VNNI
  constexpr bool KQ = QT == T_Q4_K || QT == T_Q5_K || QT == T_Q6_K;
  constexpr int64_t V16_FROM = KQ ? 5 : 9;  // activation rows from which two groups share a 512-bit tile
  thread_local std::vector<int8_t> flipped;  // Q8_0: the activations as x + 128 (dot_s8)
  if constexpr (QT == T_Q8_0) {
    flipped.resize(static_cast<size_t>(M * K));
    const __m256i bit7 = _mm256_set1_epi8(static_cast<char>(0x80));
    for (int64_t i = 0; i < M * K; i += 32)  // K is a multiple of 32
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(flipped.data() + i),
                          _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a_in.q + i)), bit7));
    a.q = flipped.data();
  }
#endif
  for (int64_t g = g0; g < g1;) {
#if LFQ_TILE_VNNI
    if (M >= V16_FROM && g + 1 < g1) {  // two groups per 512-bit tile: prefill, verification, batches
      tile_rows<V16, QT>(w + g * gbytes, gbytes, nsb, a, M, y + g * 8, N, std::min<int64_t>(16, N - g * 8));
      g += 2;
      continue;
    }
#endif
    tile_rows<V8, QT>(w + g * gbytes, gbytes, nsb, a, M, y + g * 8, N, std::min<int64_t>(8, N - g * 8));
    g += 1;
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
