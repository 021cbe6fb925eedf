// The prefill GEMM of 16-bit (F16 / BF16) weights: y (M, N) = x (M, K) @ W.T, float32 sums; F16 weights
// multiply float32 activations, BF16 weights bf16-rounded ones (qgemm.h says how and why).
// qgemm.cpp includes this file twice: as namespace lfq::gemm_avx2 with LFQ_GEMM_512 0 (tiles of 8-lane ymm
// vectors, 16 registers) and inside a `#pragma GCC target` region as lfq::gemm_avx512 with LFQ_GEMM_512 1
// (zmm vectors, each holding two weight rows' 8-lane accumulators side by side, 32 registers).
//
// The contract (shared with the decode tiles, float_tile in qmatmul.cpp): every (weight row n, activation
// row m) pair has one 8-lane float32 accumulator; for F16, lane j sums w[n][k] * x[m][k] for k = j mod 8 in
// k order with fused multiply-adds; for BF16, lane j adds in step s the products of columns 16s + 2j + 1 then
// 16s + 2j, as vdpbf16ps does (qgemm.h); then the 8 lanes are summed by hsum (qcommon.h) and the columns
// past the last multiple of 8 (F16) or 16 (BF16) added one by one. A zmm accumulator is two such 8-lane
// accumulators (weight rows 2p and 2p + 1 against the same activation row, whose columns are broadcast to
// both halves), so its lanes run the very same operations in the same order: both builds, any M, any tile
// or thread split, give the same bits as decode (tests/test_float_kernels.py checks every path against rows
// computed alone). The tiles see only "half-steps" of 8 floats: for F16 8 columns, for BF16 the odd or the
// even 8 of a 16-column step (the weight panel and the split activation rows hold them in that order), so
// one FMA per half-step is exactly the emulation of vdpbf16ps (under DAZ / FTZ). The AVX-512 build runs BF16
// weights with vdpbf16ps itself on bf16 panels (step s: a pair's two rows, 16 bf16 each, in one zmm) where the
// CPU has AVX512_BF16 (gemm<T_BF16, true>), else its float tiles emulate it as for F16 (Skylake-X .. Ice Lake:
// zmm FMAs, 24 accumulators over all K, instead of the AVX2 tiles' 12 over slices).
//
// Blocking: a pass takes up to MB activation rows and packs them (columns [0, kt), kt the whole steps) in
// the order the tiles read them; a thread's weight rows go in panels of NP rows, each converted to float32
// (or copied as bf16, vdpbf16ps; or, AVX2 F16, copied as halves) once per pass (NP x K floats: 64 KiB at
// K = 2048, in L2), and in the AVX-512 build, while a panel computes, the next one's rows are prefetched (the
// conversion reads a panel's rows side by side: one 4 KiB row at a time stalled on every page, -20%). The
// AVX2 build does not prefetch: on Zen 3 the hardware prefetcher keeps up with the ~0.5 GB/s of weights a
// 128-row pass reads, and without it one 1B layer's projections (benchmarks/kernels.py, 4 alternated runs)
// ran BF16 -7% time, F16 level; gemm16_ab at K 2048 x N 16384: BF16 +7%, F16 +4% GFLOP/s.
// An AVX-512 tile (TILE_ROWS activation rows x TILE_PAIRS pairs of weight rows) keeps its accumulators in
// registers over all K columns, reading the panel and its packed rows as two sequential streams from L2; the
// AVX2 tile, with half the registers, reads twice the bytes per FMA, more than L2 feeds, so it runs over
// slices of KC columns of the panel (in L1) with its accumulators waiting in `acc` between slices, and the
// packed rows are laid out slice by slice, so that a slice's tiles read them as one sequential stream. Its
// F16 panel stays in halves, each weight vector converted (vcvtph2ps, exact) as the tile loads it: half the
// panel's bytes in L1, and on Zen 4 the conversions cost no FMA slot (the same 4 x 3 tile in L1 runs at the
// FMA peak either way). Measured (one 1B-shaped (2048, 2048) projection, 128 rows, one thread, AVX2): the
// float32 panel with rows packed tile by tile ran 75-80% of the FMA peak, this 85-90%.
// No include guard on purpose.

namespace lfq {
namespace LFQ_GEMM_NS {

constexpr int64_t NP = 8;         // weight rows per panel
constexpr int64_t PAIRS = NP / 2;  // rows go in pairs (2p, 2p + 1)
constexpr int64_t MB = 128;       // activation rows per pass (packed: 128 x K floats)
#if LFQ_GEMM_512
constexpr int TILE_PAIRS = 4, TILE_ROWS = 6;  // 8 weight rows x 6 activation rows: 24 zmm accumulators
constexpr int64_t KC = int64_t{1} << 40;     // columns per tile call: all (the accumulators stay in registers)
#else
constexpr int TILE_PAIRS = 2, TILE_ROWS = 3;  // 4 weight rows x 3 activation rows: 12 ymm accumulators
// Columns per tile call: a panel slice of 8 KiB (BF16's float32) or 4 KiB (F16's halves) beside 3 KiB of a
// tile's rows in L1 (all K at once: 44-62 instead of 62-78 GFLOP/s; 512 columns: BF16 -10%, F16 level;
// 1024: BF16 -30%). Zen 3 (benchmarks/gemm16_ab.cpp, 256 vs each): all K F16 -5%, BF16 -24%; 1024 F16
// level, BF16 -22%; 512 +3% both (noise); 128 F16 -5%. The stores and reloads between slices are 24 of
// ~600 instructions per slice: keeping the accumulators over all K costs more in L2 reads than it saves.
constexpr int64_t KC = 256;
#endif

// Panel rows [0, np) as float32: half-step s (F16: columns 8s .. 8s + 7; BF16: the odd columns of 16-column
// step s / 2 if s is even, else its even columns), pair p holds 16 floats at blk + (s * PAIRS + p) * 16, row
// 2p's 8 then row 2p + 1's (zeros past np).
template <int64_t QT>
inline void convert_panel(const uint16_t* w, int64_t K, int64_t np, int64_t steps, float* blk) {
  for (int64_t r = np; r < NP; ++r)
    for (int64_t s = 0; s < steps; ++s) _mm256_storeu_ps(blk + (s * PAIRS + r / 2) * 16 + (r % 2) * 8, _mm256_setzero_ps());
  if constexpr (QT == T_F16) {
    for (int64_t s = 0; s < steps; ++s)
      for (int64_t r = 0; r < np; ++r) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + 8 * s));
        _mm256_storeu_ps(blk + (s * PAIRS + r / 2) * 16 + (r % 2) * 8, _mm256_cvtph_ps(h));
      }
  } else {  // bf16: a float's top half; 16 columns (one dword per column pair) give two half-steps
    for (int64_t s = 0; s < steps; s += 2)
      for (int64_t r = 0; r < np; ++r) {
        const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + 8 * s));
        float* out = blk + (s * PAIRS + r / 2) * 16 + (r % 2) * 8;
        _mm256_storeu_ps(out, _mm256_castsi256_ps(_mm256_and_si256(d, _mm256_set1_epi32(-65536))));  // odd
        _mm256_storeu_ps(out + PAIRS * 16, _mm256_castsi256_ps(_mm256_slli_epi32(d, 16)));  // even
      }
  }
}

// Activation rows [0, M), columns [0, 8 * steps), packed by slice of KC columns, then by tile: the slice of
// steps [s0, s0 + ss) at xp + s0 * 8 * M, in it the rows m0 .. m0 + mr - 1 of a tile (m0 a multiple of
// TILE_ROWS) at + m0 * 8 * ss, step s0 + s of row m0 + i at + (s * mr + i) * 8. (AVX-512: one slice.)
inline void pack_rows(const float* x, int64_t K, int64_t M, int64_t steps, float* xp) {
  for (int64_t s0 = 0; s0 < steps; s0 += KC / 8) {
    const int64_t ss = std::min(KC / 8, steps - s0);
    for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
      const int64_t mr = std::min<int64_t>(TILE_ROWS, M - m0);
      float* out = xp + s0 * 8 * M + m0 * 8 * ss;
      for (int64_t s = 0; s < ss; ++s)
        for (int64_t i = 0; i < mr; ++i)
          _mm256_storeu_ps(out + (s * mr + i) * 8, _mm256_loadu_ps(x + (m0 + i) * K + 8 * (s0 + s)));
    }
  }
}

#if LFQ_GEMM_512
// BF16 for vdpbf16ps: panel rows [0, np) as bf16, step s (columns 16s .. 16s + 15), pair p's 32 values at
// blk + (s * PAIRS + p) * 32, row 2p's 16 then row 2p + 1's (zeros past np).
inline void copy_panel(const uint16_t* w, int64_t K, int64_t np, int64_t steps, uint16_t* blk) {
  for (int64_t r = np; r < NP; ++r)
    for (int64_t s = 0; s < steps; ++s)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(blk + (s * PAIRS + r / 2) * 32 + (r % 2) * 16), _mm256_setzero_si256());
  for (int64_t s = 0; s < steps; ++s)
    for (int64_t r = 0; r < np; ++r)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(blk + (s * PAIRS + r / 2) * 32 + (r % 2) * 16),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + 16 * s)));
}

// Split bf16-rounded rows (qgemm.h) back to bf16, packed by tile as pack_rows does: step s of row m0 + i
// at xp + m0 * 16 * steps + (s * mr + i) * 16, columns in order (a dword holds columns 2j, 2j + 1).
inline void pack_rows_bf16(const float* xs, int64_t K, int64_t M, int64_t steps, uint16_t* xp) {
  for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
    const int64_t mr = std::min<int64_t>(TILE_ROWS, M - m0);
    uint16_t* out = xp + m0 * 16 * steps;
    for (int64_t s = 0; s < steps; ++s)
      for (int64_t i = 0; i < mr; ++i) {
        const float* r = xs + (m0 + i) * K + 16 * s;
        const __m256i odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r));
        const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 8));
        const __m256i d = _mm256_or_si256(_mm256_and_si256(odd, _mm256_set1_epi32(-65536)), _mm256_srli_epi32(even, 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (s * mr + i) * 16), d);
      }
  }
}

// Pairs [0, P) of a bf16 panel against packed bf16 rows [0, MR) over `steps` steps with vdpbf16ps
// (accumulators as tile's below).
template <int P, int MR>
inline void tile_dot(const uint16_t* blk, const uint16_t* xp, int64_t steps, float* out) {
  __m512 a[P][MR];
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < MR; ++i) a[p][i] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    __m512i wv[P];
    for (int p = 0; p < P; ++p) wv[p] = _mm512_loadu_si512(blk + (s * PAIRS + p) * 32);
    for (int i = 0; i < MR; ++i) {  // activation row i's 16 columns in both halves
      const __m512i xv = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + (s * MR + i) * 16)));
      for (int p = 0; p < P; ++p) a[p][i] = _mm512_dpbf16_ps(a[p][i], (__m512bh)wv[p], (__m512bh)xv);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < MR; ++i) _mm512_storeu_ps(out + (i * NP + 2 * p) * 8, a[p][i]);
}

template <int MR>
inline void tile_rows(const uint16_t* blk, int64_t pairs, const uint16_t* xp, int64_t steps, float* out, bool) {
  switch (pairs) {
    case 4: return tile_dot<4, MR>(blk, xp, steps, out);
    case 3: return tile_dot<3, MR>(blk, xp, steps, out);
    case 2: return tile_dot<2, MR>(blk, xp, steps, out);
    default: return tile_dot<1, MR>(blk, xp, steps, out);
  }
}

// Pairs [0, P) of the panel against packed rows [0, MR) over `steps` steps: the accumulator of row r of the
// panel and activation row i is at out + (i * NP + r) * 8, started from zero when `first`.
template <int P, int MR>
inline void tile(const float* blk, const float* xp, int64_t steps, float* out, bool first) {
  __m512 a[P][MR];
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < MR; ++i) a[p][i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out + (i * NP + 2 * p) * 8);
  for (int64_t s = 0; s < steps; ++s) {
    __m512 wv[P];
    for (int p = 0; p < P; ++p) wv[p] = _mm512_loadu_ps(blk + (s * PAIRS + p) * 16);
    for (int i = 0; i < MR; ++i) {  // activation row i's 8 columns in both halves
      const __m512 xv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(reinterpret_cast<const double*>(xp + (s * MR + i) * 8))));
      for (int p = 0; p < P; ++p) a[p][i] = _mm512_fmadd_ps(wv[p], xv, a[p][i]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < MR; ++i) _mm512_storeu_ps(out + (i * NP + 2 * p) * 8, a[p][i]);
}

template <int MR>
inline void tile_rows(const float* blk, int64_t pairs, const float* xp, int64_t steps, float* out, bool first) {
  switch (pairs) {
    case 4: return tile<4, MR>(blk, xp, steps, out, first);
    case 3: return tile<3, MR>(blk, xp, steps, out, first);
    case 2: return tile<2, MR>(blk, xp, steps, out, first);
    default: return tile<1, MR>(blk, xp, steps, out, first);
  }
}
#else
// F16 panel rows [0, np) kept as halves, laid out as convert_panel's floats: half-step s of pair p at
// blk + (s * PAIRS + p) * 16, row 2p's 8 then row 2p + 1's (zeros past np).
inline void copy_panel_f16(const uint16_t* w, int64_t K, int64_t np, int64_t steps, uint16_t* blk) {
  for (int64_t r = np; r < NP; ++r)
    for (int64_t s = 0; s < steps; ++s)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(blk + (s * PAIRS + r / 2) * 16 + (r % 2) * 8), _mm_setzero_si128());
  for (int64_t s = 0; s < steps; ++s)
    for (int64_t r = 0; r < np; ++r)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(blk + (s * PAIRS + r / 2) * 16 + (r % 2) * 8),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + 8 * s)));
}

// A panel's 8 floats: as they are (BF16), or 8 halves converted exactly (F16).
inline __m256 panel_vec(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 panel_vec(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Pairs [p0, p0 + P) of the panel against packed rows [0, MR) over `steps` steps (accumulators as above).
template <int P, int MR, class E>
inline void tile(const E* blk, int64_t p0, const float* xp, int64_t steps, float* out, bool first) {
  __m256 a[2 * P][MR];
  for (int r = 0; r < 2 * P; ++r)
    for (int i = 0; i < MR; ++i) a[r][i] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + (i * NP + 2 * p0 + r) * 8);
  for (int64_t s = 0; s < steps; ++s) {
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(xp + (s * MR + i) * 8);
    for (int r = 0; r < 2 * P; ++r) {
      const __m256 wv = panel_vec(blk + (s * PAIRS + p0 + r / 2) * 16 + (r % 2) * 8);
      for (int i = 0; i < MR; ++i) a[r][i] = _mm256_fmadd_ps(wv, xv[i], a[r][i]);
    }
  }
  for (int r = 0; r < 2 * P; ++r)
    for (int i = 0; i < MR; ++i) _mm256_storeu_ps(out + (i * NP + 2 * p0 + r) * 8, a[r][i]);
}

template <int MR, class E>
inline void tile_rows(const E* blk, int64_t pairs, const float* xp, int64_t steps, float* out, bool first) {
  int64_t p = 0;
  for (; p + TILE_PAIRS <= pairs; p += TILE_PAIRS) tile<TILE_PAIRS, MR>(blk, p, xp, steps, out, first);
  if (p < pairs) tile<1, MR>(blk, p, xp, steps, out, first);
}
#endif

// The first 64-byte boundary at or after p (a buffer over-allocated by 16 floats).
inline float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

// hsum (qcommon.h) of the 8 accumulators at a, a + 8, .., a + 56, as one vector: the same additions in the
// same order, (v0 + v4) + (v2 + v6) and (v1 + v5) + (v3 + v7), then their sum, 8 rows side by side.
inline __m256 hsum8(const float* a) {
  __m256 t[4];  // t[j]: rows 2j, 2j + 1, each as its 4 sums v[i] + v[i + 4]
  for (int j = 0; j < 4; ++j) {
    const __m256 r0 = _mm256_loadu_ps(a + 16 * j), r1 = _mm256_loadu_ps(a + 16 * j + 8);
    t[j] = _mm256_add_ps(_mm256_permute2f128_ps(r0, r1, 0x20), _mm256_permute2f128_ps(r0, r1, 0x31));
  }
  __m256 u[2];  // u[h]: rows 4h, 4h + 2 (low half) and 4h + 1, 4h + 3 (high half), each as (s0 + s2, s1 + s3)
  for (int h = 0; h < 2; ++h)
    u[h] = _mm256_add_ps(_mm256_shuffle_ps(t[2 * h], t[2 * h + 1], 0x44), _mm256_shuffle_ps(t[2 * h], t[2 * h + 1], 0xEE));
  // rows 0, 2, 4, 6 | 1, 3, 5, 7, then in order
  const __m256 v = _mm256_add_ps(_mm256_shuffle_ps(u[0], u[1], 0x88), _mm256_shuffle_ps(u[0], u[1], 0xDD));
  return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// y[:, n0:n1] for a pass of M <= MB activation rows (y row-major with N columns; BF16: x split, qgemm.h).
// DOT: vdpbf16ps on bf16 panels and rows (AVX-512 build, BF16 weights, a CPU with AVX512_BF16).
template <int64_t QT, bool DOT>
void gemm_pass(const uint16_t* w, int64_t n0, int64_t n1, int64_t K, const float* x, int64_t M, float* y,
               int64_t N) {
  static_assert(!DOT || (LFQ_GEMM_512 && QT == T_BF16), "vdpbf16ps: BF16 weights in the AVX-512 build only");
  const int64_t kt = QT == T_BF16 ? K / 16 * 16 : K / 8 * 8;  // the columns the tiles take
  const int64_t steps = DOT ? kt / 16 : kt / 8, lines = (K * 2 + 63) / 64;  // tile steps, weight row lines
  using elem = std::conditional_t<DOT, uint16_t, float>;  // what the packed rows hold
  constexpr bool HALVES = !LFQ_GEMM_512 && QT == T_F16;  // an AVX2 F16 panel: halves (converted in the tile)
  using pelem = std::conditional_t<DOT || HALVES, uint16_t, float>;  // what the panel holds
  constexpr int64_t PW = DOT ? 32 : 16, RW = DOT ? 16 : 8;  // elements per step: of a pair, of a packed row
  thread_local std::vector<float> blk_buf, x_buf;  // DOT: bf16 in their first halves
  blk_buf.resize(static_cast<size_t>(NP * kt + 16));
  x_buf.resize(static_cast<size_t>(M * kt + 16));
  // 16-bit: only read and written by vector intrinsics. Both on 64-byte boundaries, so that no panel vector and
  // no packed row's step straddles two cache lines (malloc gives 16 bytes: then every zmm load split in two).
  pelem* blk = reinterpret_cast<pelem*>(align64(blk_buf.data()));
  elem* xpk = reinterpret_cast<elem*>(align64(x_buf.data()));
#if LFQ_GEMM_512
  if constexpr (DOT) pack_rows_bf16(x, K, M, steps, xpk);
  else
#endif
    pack_rows(x, K, M, steps, xpk);
  thread_local std::vector<float> acc_buf;  // (pass row, panel row) accumulators, 8 floats each
  acc_buf.resize(static_cast<size_t>(MB * NP * 8 + 16));
  float* acc = align64(acc_buf.data());
  const int64_t tiles = (M + TILE_ROWS - 1) / TILE_ROWS, slices = std::max<int64_t>(1, (steps * 8 + KC - 1) / KC);  // K < 8: one empty slice zeroes acc
  for (int64_t p0 = n0; p0 < n1; p0 += NP) {
    const int64_t np = std::min(NP, n1 - p0), pairs = (np + 1) / 2, next = std::min(NP, n1 - p0 - NP);
#if LFQ_GEMM_512
    if constexpr (DOT) copy_panel(w + p0 * K, K, np, steps, blk);
    else
#else
    if constexpr (HALVES) copy_panel_f16(w + p0 * K, K, np, steps, blk);
    else
#endif
      convert_panel<QT>(w + p0 * K, K, np, steps, blk);
    for (int64_t c = 0; c < slices; ++c) {
      const int64_t s0 = c * KC / 8, ss = std::min(KC / 8, steps - s0);  // this slice's steps
      for (int64_t t = 0; t < tiles; ++t) {
        // A share of the next panel's weight rows towards L2, so its conversion does not wait on memory
        // (AVX-512 build only: not needed by the AVX2 build on Zen 3, see the top).
        if constexpr (LFQ_GEMM_512) {
          const int64_t u = c * tiles + t, l0 = u * lines / (slices * tiles), l1 = (u + 1) * lines / (slices * tiles);
          for (int64_t r = 0; r < next; ++r)
            for (int64_t l = l0; l < l1; ++l)
              _mm_prefetch(reinterpret_cast<const char*>(w + (p0 + NP + r) * K) + 64 * l, _MM_HINT_T1);
        }
        const int64_t m0 = t * TILE_ROWS, mr = std::min<int64_t>(TILE_ROWS, M - m0);
        const pelem* b = blk + s0 * PAIRS * PW;
        const elem* xp = xpk + s0 * RW * M + m0 * ss * RW;  // pack_rows' layout (AVX-512: s0 = 0, ss = steps)
        float* out = acc + m0 * NP * 8;
        switch (mr) {
#if LFQ_GEMM_512
          case 6: tile_rows<6>(b, pairs, xp, ss, out, c == 0); break;
          case 5: tile_rows<5>(b, pairs, xp, ss, out, c == 0); break;
          case 4: tile_rows<4>(b, pairs, xp, ss, out, c == 0); break;
#endif
          case 3: tile_rows<3>(b, pairs, xp, ss, out, c == 0); break;
          case 2: tile_rows<2>(b, pairs, xp, ss, out, c == 0); break;
          default: tile_rows<1>(b, pairs, xp, ss, out, c == 0); break;
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) {  // as float_tile finishes a pair: the lanes' sum, then the tail
      const float* xm = x + m * K;
      if (np == NP && kt == K) {  // a whole panel row, no tail: its 8 lane sums at once
        _mm256_storeu_ps(y + m * N + p0, hsum8(acc + m * NP * 8));
        continue;
      }
      for (int64_t r = 0; r < np; ++r) {
        float s = hsum(_mm256_loadu_ps(acc + (m * NP + r) * 8));
        const uint16_t* row = w + (p0 + r) * K;
        for (int64_t k = kt; k < K; ++k) {
          float wk;
          if constexpr (QT == T_F16) wk = _cvtsh_ss(row[k]);
          else { const uint32_t b = static_cast<uint32_t>(row[k]) << 16; std::memcpy(&wk, &b, 4); }
          s += wk * xm[k];
        }
        y[m * N + p0 + r] = s;
      }
    }
  }
}

// y[:, n0:n1] = x (M, K) @ W[n0:n1].T for a 16-bit weight W (N, K), x (M, K) (BF16: split) and y (M, N): in
// passes of MB rows; DOT as gemm_pass's.
template <int64_t QT, bool DOT = false>
void gemm(const uint16_t* w, int64_t n0, int64_t n1, int64_t K, const float* x, int64_t M, float* y, int64_t N) {
  for (int64_t m = 0; m < M; m += MB)
    gemm_pass<QT, DOT>(w, n0, n1, K, x + m * K, std::min(MB, M - m), y + m * N, N);
}

}  // namespace LFQ_GEMM_NS
}  // namespace lfq
