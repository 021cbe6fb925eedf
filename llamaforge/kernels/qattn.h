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
// (keys x queries, output vectors x queries) to hide the FMA latency at every G. Float32 throughout;
// against a two-pass softmax the result differs in the last bits (exp256 is within ~2 ulp of expf).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "qcommon.h"

namespace lfq {

constexpr int64_t ATTN_TILE = 64;

// Where one KV head's cached rows of one sequence lie (kv_cache.py's layout, qdecode.cpp's kv_row): blocks of
// `size` positions, the sequence's j-th block at base + table[j] * stride, rows of hd floats within it.
struct KVBlocks {
  const float* base;     // this KV head's rows in block 0 of the layer
  const int64_t* table;  // the sequence's block table
  int64_t stride;        // floats from one block to the next
  int64_t size;          // positions per block
  const float* rows(int64_t j0, int64_t hd) const { return base + table[j0 / size] * stride + (j0 % size) * hd; }
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

// s[g * ATTN_TILE + j] = q_g . k_(j0 + j) / scale for j < t: KJ keys x G queries of FMA chains per pass.
template <int G, int KJ>
inline void attn_scores(const float* q, const float* K, int64_t j0, int64_t t, int64_t hd, float scale, float* s) {
  const int64_t h8 = hd / 8 * 8;
  int64_t j = 0;
  for (; j + KJ <= t; j += KJ) {
    __m256 acc[KJ][G];
    for (int a = 0; a < KJ; ++a)
      for (int g = 0; g < G; ++g) acc[a][g] = _mm256_setzero_ps();
    for (int64_t i = 0; i < h8; i += 8) {
      for (int a = 0; a < KJ; ++a) {
        const __m256 kv = _mm256_loadu_ps(K + (j0 + j + a) * hd + i);
        for (int g = 0; g < G; ++g) acc[a][g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * hd + i), kv, acc[a][g]);
      }
    }
    for (int a = 0; a < KJ; ++a) {
      const float* k = K + (j0 + j + a) * hd;
      for (int g = 0; g < G; ++g) {
        float v = hsum(acc[a][g]);
        for (int64_t i = h8; i < hd; ++i) v += q[g * hd + i] * k[i];
        s[g * ATTN_TILE + j + a] = v / scale;
      }
    }
  }
  if constexpr (KJ > 1) {
    if (j < t) attn_scores<G, 1>(q, K, j0 + j, t - j, hd, scale, s + j);
  }
}

// o_g[d0 : d0 + 8 * DC] = o_g * c_g + sum_j p[g * ATTN_TILE + j] v_(j0 + j), for g < G: DC x G chains.
template <int G, int DC>
inline void attn_values(const float* p, const float* V, int64_t j0, int64_t t, int64_t hd, int64_t d0,
                        const float* c, float* o) {
  __m256 acc[DC][G];
  for (int u = 0; u < DC; ++u)
    for (int g = 0; g < G; ++g) acc[u][g] = _mm256_mul_ps(_mm256_loadu_ps(o + g * hd + d0 + 8 * u), _mm256_set1_ps(c[g]));
  for (int64_t j = 0; j < t; ++j) {
    const float* v = V + (j0 + j) * hd + d0;
    for (int u = 0; u < DC; ++u) {
      const __m256 vv = _mm256_loadu_ps(v + 8 * u);
      for (int g = 0; g < G; ++g) acc[u][g] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + g * ATTN_TILE + j), vv, acc[u][g]);
    }
  }
  for (int u = 0; u < DC; ++u)
    for (int g = 0; g < G; ++g) _mm256_storeu_ps(o + g * hd + d0 + 8 * u, acc[u][g]);
}

// out (G, hd) = attention of the G queries q (G, hd) over the cached keys/values [0, n) of kb, vb; n >= 1.
template <int G>
void attend_group(const float* q, const KVBlocks& kb, const KVBlocks& vb, int64_t n, int64_t hd, float scale,
                  float* out) {
  constexpr int KJ = G >= 4 ? 1 : (G == 1 ? 4 : 2);  // key rows per score pass
  constexpr int DC = G >= 4 ? 1 : (G == 1 ? 4 : 2);  // output vectors per value pass
  alignas(32) float s[G * ATTN_TILE];
  float mx[G], sum[G], c[G];
  for (int g = 0; g < G; ++g) {
    mx[g] = -std::numeric_limits<float>::infinity();
    sum[g] = 0.0f;
  }
  std::fill_n(out, G * hd, 0.0f);
  const int64_t h8 = hd / 8 * 8;
  for (int64_t j0 = 0, t = 0; j0 < n; j0 += t) {
    t = std::min({ATTN_TILE, n - j0, kb.size - j0 % kb.size});  // keys [j0, j0 + t): rows of one block
    const float* K = kb.rows(j0, hd);
    const float* V = vb.rows(j0, hd);
    attn_scores<G, KJ>(q, K, 0, t, hd, scale, s);
    for (int g = 0; g < G; ++g) {
      float* sg = s + g * ATTN_TILE;
      float tmax = mx[g];
      for (int64_t j = 0; j < t; ++j) tmax = std::max(tmax, sg[j]);
      c[g] = std::exp(mx[g] - tmax);  // 0 on the first tile (mx = -inf)
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
    int64_t d = 0;
    for (; d + 8 * DC <= h8; d += 8 * DC) attn_values<G, DC>(s, V, 0, t, hd, d, c, out);
    for (; d < h8; d += 8) attn_values<G, 1>(s, V, 0, t, hd, d, c, out);
    for (; d < hd; ++d) {
      for (int g = 0; g < G; ++g) {
        float od = out[g * hd + d] * c[g];
        for (int64_t j = 0; j < t; ++j) od += s[g * ATTN_TILE + j] * V[j * hd + d];
        out[g * hd + d] = od;
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inv = 1.0f / sum[g];
    for (int64_t d = 0; d < hd; ++d) out[g * hd + d] *= inv;
  }
}

// The G = n_heads / n_kv_heads query heads of one KV head: q, out (G, hd). G above 8 in groups of 8 or less.
inline void attend(const float* q, const KVBlocks& K, const KVBlocks& V, int64_t n, int64_t hd, float scale,
                   float* out, int64_t G) {
  for (int64_t g0 = 0; g0 < G; g0 += 8) {
    const int64_t g = std::min<int64_t>(8, G - g0);
    const float* qg = q + g0 * hd;
    float* og = out + g0 * hd;
    switch (g) {
      case 1: attend_group<1>(qg, K, V, n, hd, scale, og); break;
      case 2: attend_group<2>(qg, K, V, n, hd, scale, og); break;
      case 3: attend_group<3>(qg, K, V, n, hd, scale, og); break;
      case 4: attend_group<4>(qg, K, V, n, hd, scale, og); break;
      case 5: attend_group<5>(qg, K, V, n, hd, scale, og); break;
      case 6: attend_group<6>(qg, K, V, n, hd, scale, og); break;
      case 7: attend_group<7>(qg, K, V, n, hd, scale, og); break;
      default: attend_group<8>(qg, K, V, n, hd, scale, og); break;
    }
  }
}

}  // namespace lfq
