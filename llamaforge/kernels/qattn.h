// Decode attention for the fused step (qdecode.cpp): the G query heads that share one KV head (grouped-
// query attention), one new token, over that KV head's cached keys and values [0, n):
//     out_g = softmax(q_g . K^T / sqrt(hd)) V            for g < G
// where K and V lie in blocks of the KV cache (`KVBlocks`: a sequence's block table, as vLLM's paged
// attention reads them), tiled with an online softmax, as flash attention does: per tile of 64 keys (a
// tile also ends where a block does, so each tile is contiguous rows), the G x 64
// scores (each key row loaded once for all G queries), the tile maxima, the exponentials (8 lanes at a
// time), and the weighted values (each value row loaded once for all G outputs); the running outputs and
// sums are rescaled once per tile by exp(old max - new max). So K and V are read once per KV head, not
// once per query head, and no score vector of the whole context is kept. Enough independent FMA chains
// (keys x queries, output vectors x queries) to hide the FMA latency at every G. Float32 arithmetic;
// against a two-pass softmax the result differs in the last bits (exp256 is within ~2 ulp of expf).
// Rows are in one of the cache's element types (qkv.h), `rb` bytes apart: float16 / bfloat16 rows are
// converted as they are loaded; with q8_0 keys the G queries are quantized to q8_0 once and the scores are
// int8 dot products per block times d_q * d_k (llama.cpp's vec_dot_type for q8_0), and q8_0 values are
// d * q products in the accumulators.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "qcommon.h"
#include "qkv.h"

namespace lfq {

constexpr int64_t ATTN_TILE = 64;

// Where one KV head's cached rows of one sequence lie (kv_cache.py's layout, qdecode.cpp's kv_row): blocks of
// `size` positions, the sequence's j-th block at base + table[j] * stride bytes, rows of `rb` bytes within it.
// Without a table, one run of rows from base (the kernels' tests).
struct KVBlocks {
  const uint8_t* base;   // this KV head's rows in block 0 of the layer
  const int64_t* table;  // the sequence's block table, or nullptr: rows are contiguous
  int64_t stride;        // bytes from one block to the next
  int64_t size;          // positions per block
  int64_t rb;            // bytes per row (kv_row_bytes)
  const uint8_t* rows(int64_t j0) const {
    return table == nullptr ? base + j0 * rb : base + table[j0 / size] * stride + (j0 % size) * rb;
  }
  int64_t run(int64_t j0) const { return table == nullptr ? ATTN_TILE : size - j0 % size; }  // rows left in j0's block
};


// e^x for 8 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r).
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// out[k] = hsum(v[k]) for k < 8, bit for bit (the same additions in the same order: lo + hi, then lanes
// 0 + 2 and 1 + 3, then their sum), eight at a time: 17 vector operations where eight hsums take 48.
inline void hsum8(const __m256* v, float* out) {
  __m256 x[4];  // x[k] = [lo + hi of v[2k] | lo + hi of v[2k + 1]]
  for (int k = 0; k < 4; ++k)
    x[k] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * k], v[2 * k + 1], 0x20),
                         _mm256_permute2f128_ps(v[2 * k], v[2 * k + 1], 0x31));
  // w0 = [v0: s0 + s2, v2: s0 + s2, v0: s1 + s3, v2: s1 + s3 | the same of v1, v3]; w1 of v4..v7
  const __m256 w0 = _mm256_add_ps(_mm256_unpacklo_ps(x[0], x[1]), _mm256_unpackhi_ps(x[0], x[1]));
  const __m256 w1 = _mm256_add_ps(_mm256_unpacklo_ps(x[2], x[3]), _mm256_unpackhi_ps(x[2], x[3]));
  const __m256d a = _mm256_castps_pd(w0), b = _mm256_castps_pd(w1);
  // r = [v0, v2, v4, v6 | v1, v3, v5, v7]: (s0 + s2) + (s1 + s3) of each
  const __m256 r = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
  _mm256_storeu_ps(out, _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

// s[g * ATTN_TILE + j] = q_g . k_(j0 + j) for j < t (not yet divided by the scale: `TileScores` does that):
// KJ keys x G queries of FMA chains per pass. The loops over a and g are unrolled so that the accumulators stay
// in registers (GCC otherwise stored all KJ x G of them on the stack in every iteration).
template <int G, int KJ, class KT>
inline void attn_scores(const float* q, const uint8_t* K, int64_t rb, int64_t j0, int64_t t, int64_t hd, float* s) {
  const int64_t h8 = hd / 8 * 8;
  int64_t j = 0;
  for (; j + KJ <= t; j += KJ) {
    __m256 acc[KJ][G];
#pragma GCC unroll 8
    for (int a = 0; a < KJ; ++a)
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[a][g] = _mm256_setzero_ps();
    for (int64_t i = 0; i < h8; i += 8) {
#pragma GCC unroll 8
      for (int a = 0; a < KJ; ++a) {
        const __m256 kv = KT::load8(K + (j0 + j + a) * rb, i);
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) acc[a][g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * hd + i), kv, acc[a][g]);
      }
    }
    if constexpr (KJ * G % 8 == 0) {  // the sums eight at a time
      alignas(32) float sums[KJ * G];
#pragma GCC unroll 8
      for (int k = 0; k < KJ * G; k += 8) hsum8(&acc[0][0] + k, sums + k);
#pragma GCC unroll 8
      for (int a = 0; a < KJ; ++a)
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) s[g * ATTN_TILE + j + a] = sums[a * G + g];
    } else {
#pragma GCC unroll 8
      for (int a = 0; a < KJ; ++a)
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) s[g * ATTN_TILE + j + a] = hsum(acc[a][g]);
    }
    if (h8 < hd) {
      for (int a = 0; a < KJ; ++a) {
        const uint8_t* k = K + (j0 + j + a) * rb;
        for (int g = 0; g < G; ++g) {
          float v = s[g * ATTN_TILE + j + a];
          for (int64_t i = h8; i < hd; ++i) v += q[g * hd + i] * KT::load1(k, i);
          s[g * ATTN_TILE + j + a] = v;
        }
      }
    }
  }
  if constexpr (KJ > 1) {
    if (j < t) attn_scores<G, 1, KT>(q, K, rb, j0 + j, t - j, hd, s + j);
  }
}

// s[g * ATTN_TILE + j] /= scale for j < t, 8 at a time (vdivps rounds as divss does: the same quotients).
template <int G>
inline void divide_scores(float* s, int64_t t, float scale) {
  const __m256 sv = _mm256_set1_ps(scale);
  for (int g = 0; g < G; ++g) {
    float* sg = s + g * ATTN_TILE;
    int64_t j = 0;
    for (; j + 8 <= t; j += 8) _mm256_storeu_ps(sg + j, _mm256_div_ps(_mm256_loadu_ps(sg + j), sv));
    for (; j < t; ++j) sg[j] = sg[j] / scale;
  }
}

// The same for q8_0 keys: qq holds the G queries as q8_0 rows (rb bytes each), qd their blocks' scales (G, nb).
// Per block, the 32 int8 products sum exactly in int32 lanes, which are scaled by d_q * d_k and summed in float.
template <int G, int KJ>
inline void attn_scores_q8(const uint8_t* qq, const float* qd, const uint8_t* K, int64_t rb, int64_t j0, int64_t t,
                           int64_t hd, float scale, float* s) {
  const int64_t nb = hd / KV_Q8_BLOCK;
  int64_t j = 0;
  for (; j + KJ <= t; j += KJ) {
    __m256 acc[KJ][G];
    for (int a = 0; a < KJ; ++a)
      for (int g = 0; g < G; ++g) acc[a][g] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      for (int a = 0; a < KJ; ++a) {
        const uint8_t* kb = K + (j0 + j + a) * rb + b * KV_Q8_BYTES;
        const float dk = fp16(kb);
        const __m256i kq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kb + 2));
        const __m256i kabs = _mm256_sign_epi8(kq, kq);
        for (int g = 0; g < G; ++g) {
          const __m256i dot = dot_q8_block(qq + g * rb + b * KV_Q8_BYTES + 2, kq, kabs);
          acc[a][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(qd[g * nb + b] * dk), acc[a][g]);
        }
      }
    }
    for (int a = 0; a < KJ; ++a)
      for (int g = 0; g < G; ++g) s[g * ATTN_TILE + j + a] = hsum(acc[a][g]) / scale;
  }
  if constexpr (KJ > 1) {
    if (j < t) attn_scores_q8<G, 1>(qq, qd, K, rb, j0 + j, t - j, hd, scale, s + j);
  }
}

// o_g[d0 : d0 + 8 * DC] = o_g * c_g + sum_j p[g * ATTN_TILE + j] v_(j0 + j), for g < G: DC x G chains.
template <int G, int DC, class KT>
inline void attn_values(const float* p, const uint8_t* V, int64_t rb, int64_t j0, int64_t t, int64_t hd, int64_t d0,
                        const float* c, float* o) {
  __m256 acc[DC][G];
#pragma GCC unroll 8
  for (int u = 0; u < DC; ++u)
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) acc[u][g] = _mm256_mul_ps(_mm256_loadu_ps(o + g * hd + d0 + 8 * u), _mm256_set1_ps(c[g]));
  for (int64_t j = 0; j < t; ++j) {
    const uint8_t* v = V + (j0 + j) * rb;
#pragma GCC unroll 8
    for (int u = 0; u < DC; ++u) {
      const __m256 vv = KT::load8(v, d0 + 8 * u);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[u][g] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + g * ATTN_TILE + j), vv, acc[u][g]);
    }
  }
  for (int u = 0; u < DC; ++u)
    for (int g = 0; g < G; ++g) _mm256_storeu_ps(o + g * hd + d0 + 8 * u, acc[u][g]);
}

// The scores of G queries over keys of type KT, a tile at a time: for q8_0 keys the queries are quantized once
// (as stored keys are: qkv.h), with their blocks' scales beside them.
template <int G, class KT>
struct TileScores {
  static constexpr int KJ = G >= 4 ? 1 : (G == 1 ? 4 : 2);  // key rows per score pass
  static constexpr bool q8 = std::is_same_v<KT, KvQ8>;
  const float* q;
  std::vector<uint8_t> qq;
  std::vector<float> qd;

  TileScores(const float* q_, int64_t hd, int64_t rb) : q(q_) {
    if constexpr (q8) {
      const int64_t nb = hd / KV_Q8_BLOCK;
      qq.resize(G * rb);
      qd.resize(G * nb);
      for (int g = 0; g < G; ++g) {
        kv_store_row(KvType::Q8_0, q + g * hd, hd, qq.data() + g * rb);
        for (int64_t b = 0; b < nb; ++b) qd[g * nb + b] = fp16(qq.data() + g * rb + b * KV_Q8_BYTES);
      }
    }
  }

  // s[g * ATTN_TILE + j] for keys j0 + j, j < t.
  void operator()(const uint8_t* K, int64_t rb, int64_t j0, int64_t t, int64_t hd, float scale, float* s) const {
    if constexpr (q8) {
      attn_scores_q8<G, KJ>(qq.data(), qd.data(), K, rb, j0, t, hd, scale, s);
    } else {
      attn_scores<G, KJ, KT>(q, K, rb, j0, t, hd, s);
      divide_scores<G>(s, t, scale);
    }
  }
};

// The online softmax of one tile for G queries (each on its own: the same bits in any grouping): s[g * ATTN_TILE + j] (j < t) turn from scores into
// exp(s - new max); mx, sum carry each query's running max and sum, c the factor exp(old max - new max) the
// outputs are rescaled by (0 on the first tile, where mx = -inf).
inline void softmax_tile(float* s, int64_t G, int64_t t, float* mx, float* sum, float* c) {
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * ATTN_TILE;
    float tmax = mx[g];
    for (int64_t j = 0; j < t; ++j) tmax = std::max(tmax, sg[j]);
    c[g] = std::exp(mx[g] - tmax);
    const __m256 mv = _mm256_set1_ps(tmax);
    __m256 ps = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= t; j += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sg + j), mv));
      _mm256_storeu_ps(sg + j, e);
      ps = _mm256_add_ps(ps, e);
    }
    float tsum = hsum(ps);
    for (; j < t; ++j) {
      sg[j] = std::exp(sg[j] - tmax);
      tsum += sg[j];
    }
    sum[g] = sum[g] * c[g] + tsum;
    mx[g] = tmax;
  }
}

// out_g = out_g * c_g + sum_(j < t) p[g * ATTN_TILE + j] v_j for the t value rows V (type VT, rb bytes apart).
template <int G, class VT>
inline void values_tile(const float* p, const uint8_t* V, int64_t rb, int64_t t, int64_t hd, const float* c,
                        float* out) {
  // Output vectors per value pass: DC x G FMA chains, at least 8 where 16 registers allow (fewer leave the
  // pass waiting on the FMA latency); the pass's last vectors in passes of 2 and 1.
  constexpr int DC = G == 1 || G == 2 ? 4 : G == 3 ? 3 : G == 4 ? 2 : 1;
  const int64_t h8 = hd / 8 * 8;
  int64_t d = 0;
  for (; d + 8 * DC <= h8; d += 8 * DC) attn_values<G, DC, VT>(p, V, rb, 0, t, hd, d, c, out);
  if constexpr (DC > 2) {
    for (; d + 16 <= h8; d += 16) attn_values<G, 2, VT>(p, V, rb, 0, t, hd, d, c, out);
  }
  for (; d < h8; d += 8) attn_values<G, 1, VT>(p, V, rb, 0, t, hd, d, c, out);
  for (; d < hd; ++d) {
    for (int g = 0; g < G; ++g) {
      float od = out[g * hd + d] * c[g];
      for (int64_t j = 0; j < t; ++j) od += p[g * ATTN_TILE + j] * VT::load1(V + j * rb, d);
      out[g * hd + d] = od;
    }
  }
}

// out_g /= sum_g: the softmax's denominators, applied once at the end.
inline void finish_rows(const float* sum, int64_t G, int64_t hd, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.0f / sum[g];
    for (int64_t d = 0; d < hd; ++d) out[g * hd + d] *= inv;
  }
}

// out (G, hd) = attention of the G queries q (G, hd) over the cached keys/values [0, n) of kb, vb (rows of type
// KT, rb bytes each); n >= 1.
template <int G, class KT>
void attend_group(const float* q, const KVBlocks& kb, const KVBlocks& vb, int64_t n, int64_t hd, int64_t rb,
                  float scale, float* out) {
  const TileScores<G, KT> scores(q, hd, rb);
  alignas(32) float s[G * ATTN_TILE];
  float mx[G], sum[G], c[G];
  for (int g = 0; g < G; ++g) {
    mx[g] = -std::numeric_limits<float>::infinity();
    sum[g] = 0.0f;
  }
  std::fill_n(out, G * hd, 0.0f);
  for (int64_t j0 = 0, t = 0; j0 < n; j0 += t) {
    t = std::min({ATTN_TILE, n - j0, kb.run(j0)});  // keys [j0, j0 + t): rows of one block
    scores(kb.rows(j0), rb, 0, t, hd, scale, s);
    softmax_tile(s, G, t, mx, sum, c);
    values_tile<G, KT>(s, vb.rows(j0), rb, t, hd, c, out);
  }
  finish_rows(sum, G, hd, out);
}

// Only the scores, s (G, n) = q K^T / scale, as attend_group computes them (for the tests of the kernels).
template <int G, class KT>
void scores_group(const float* q, const KVBlocks& kb, const KVBlocks& /*vb*/, int64_t n, int64_t hd, int64_t rb,
                  float scale, float* out) {
  const TileScores<G, KT> scores(q, hd, rb);
  alignas(32) float s[G * ATTN_TILE];
  for (int64_t j0 = 0, t = 0; j0 < n; j0 += t) {
    t = std::min({ATTN_TILE, n - j0, kb.run(j0)});
    scores(kb.rows(j0), rb, 0, t, hd, scale, s);
    for (int g = 0; g < G; ++g) std::copy_n(s + g * ATTN_TILE, t, out + g * n + j0);
  }
}

// FN<g, KT>(q_g, K, V, n, hd, rb, scale, out_g) for the query heads in groups g of 8 or less.
template <template <int, class> class FN, class KT>
void per_group(const float* q, const KVBlocks& K, const KVBlocks& V, int64_t n, int64_t hd, int64_t rb, float scale,
               float* out, int64_t out_stride, int64_t G) {
  for (int64_t g0 = 0; g0 < G; g0 += 8) {
    const int64_t g = std::min<int64_t>(8, G - g0);
    const float* qg = q + g0 * hd;
    float* og = out + g0 * out_stride;
    switch (g) {
      case 1: FN<1, KT>::run(qg, K, V, n, hd, rb, scale, og); break;
      case 2: FN<2, KT>::run(qg, K, V, n, hd, rb, scale, og); break;
      case 3: FN<3, KT>::run(qg, K, V, n, hd, rb, scale, og); break;
      case 4: FN<4, KT>::run(qg, K, V, n, hd, rb, scale, og); break;
      case 5: FN<5, KT>::run(qg, K, V, n, hd, rb, scale, og); break;
      case 6: FN<6, KT>::run(qg, K, V, n, hd, rb, scale, og); break;
      case 7: FN<7, KT>::run(qg, K, V, n, hd, rb, scale, og); break;
      default: FN<8, KT>::run(qg, K, V, n, hd, rb, scale, og); break;
    }
  }
}

template <int G, class KT>
struct Attend {
  static void run(const float* q, const KVBlocks& K, const KVBlocks& V, int64_t n, int64_t hd, int64_t rb,
                  float scale, float* out) { attend_group<G, KT>(q, K, V, n, hd, rb, scale, out); }
};

template <int G, class KT>
struct Scores {
  static void run(const float* q, const KVBlocks& K, const KVBlocks& V, int64_t n, int64_t hd, int64_t rb,
                  float scale, float* out) { scores_group<G, KT>(q, K, V, n, hd, rb, scale, out); }
};

template <template <int, class> class FN>
void per_type(KvType t, const float* q, const KVBlocks& K, const KVBlocks& V, int64_t n, int64_t hd, float scale,
              float* out, int64_t out_stride, int64_t G) {
  const int64_t rb = kv_row_bytes(t, hd);
  switch (t) {
    case KvType::F32: per_group<FN, KvF32>(q, K, V, n, hd, rb, scale, out, out_stride, G); break;
    case KvType::F16: per_group<FN, KvF16>(q, K, V, n, hd, rb, scale, out, out_stride, G); break;
    case KvType::BF16: per_group<FN, KvBF16>(q, K, V, n, hd, rb, scale, out, out_stride, G); break;
    case KvType::Q8_0: per_group<FN, KvQ8>(q, K, V, n, hd, rb, scale, out, out_stride, G); break;
  }
}

// The G = n_heads / n_kv_heads query heads of one KV head: q, out (G, hd); K, V: n rows of type t (K.rb =
// kv_row_bytes(t, hd) bytes each) in their blocks. G above 8 in groups of 8 or less.
inline void attend(KvType t, const float* q, const KVBlocks& K, const KVBlocks& V, int64_t n, int64_t hd, float scale,
                   float* out, int64_t G) {
  per_type<Attend>(t, q, K, V, n, hd, scale, out, hd, G);
}

// s (G, n) = q K^T / scale as attend computes the scores (the kernels' tests read them).
inline void attention_scores(KvType t, const float* q, const KVBlocks& K, int64_t n, int64_t hd, float scale, float* s,
                             int64_t G) {
  per_type<Scores>(t, q, K, K, n, hd, scale, s, n, G);
}

}  // namespace lfq
