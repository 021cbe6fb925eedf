// Decode attention for R rows of one sequence at once (the fused step's verification rows of speculative
// decoding: consecutive positions of one sequence, row r seeing keys [0, n_r)), with each row's result bit for
// bit what attend (qattn.h) gives that row alone. Every row's tiles start at the same keys (0, then the end
// of each full tile: a tile is 64 keys or the rest of a block, and only a row's last tile is shorter), so
// per tile start j0 the rows still active share one read of the tile: its key and value rows are converted to
// float32 once (exact: float16 / bfloat16 widen, q8_0 values are the same d * q products) and every active
// row's G queries (GQA: the query heads of this KV head, of every row) take their scores over it in register
// blocks of up to 4 queries. What decides a query's bits stays per row: a score is one FMA chain per (query,
// key) whatever the blocking, and the online softmax (exp256 for the first t / 8 * 8 keys, expf for the rest,
// the tile's sum) and the value pass (one chain per output element over the tile's keys in order) run over
// that row's own t keys of the tile, as attend_group does. q8_0 keys keep their int8 scores over the stored
// blocks, with each query quantized as TileScores quantizes it.
#pragma once

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

#include "qattn.h"

namespace lfq {

constexpr int64_t ROWS_BLOCK = 4;  // queries per register block over a converted tile

// Key rows per score pass over float32 rows for G queries: at least 8 FMA chains (KJ x G) in 16 registers.
template <int G>
constexpr int rows_kj() { return G == 1 ? 8 : G == 2 ? 4 : G == 3 ? 3 : 2; }

// f(std::integral_constant<int, g>) for a block of g = 1..4 queries.
template <class F>
inline void with_block(int64_t g, F&& f) {
  switch (g) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// f (t, hd) = the t rows of type KT from rows (rb bytes apart) as float32, the values KT's loads give.
template <class KT>
inline void rows_to_f32(const uint8_t* rows, int64_t rb, int64_t t, int64_t hd, float* f) {
  const int64_t h8 = hd / 8 * 8;
  for (int64_t j = 0; j < t; ++j) {
    const uint8_t* r = rows + j * rb;
    int64_t i = 0;
    for (; i < h8; i += 8) _mm256_storeu_ps(f + j * hd + i, KT::load8(r, i));
    for (; i < hd; ++i) f[j * hd + i] = KT::load1(r, i);
  }
}

template <class KT>
void attend_rows_typed(const float* q, int64_t q_stride, const KVBlocks& kb, const KVBlocks& vb, const int64_t* n,
                       int64_t R, int64_t hd, int64_t rb, float scale, float* out, int64_t out_stride, int64_t G) {
  constexpr bool q8 = std::is_same_v<KT, KvQ8>, f32 = std::is_same_v<KT, KvF32>;
  // Rows by n, longest first: the rows still active at a tile are a prefix, and so are their queries.
  std::vector<int64_t> order(R);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return n[a] > n[b]; });
  const int64_t Q = R * G, nb = hd / KV_Q8_BLOCK;
  std::vector<float> qp(Q * hd), op(Q * hd, 0.0f), mx(Q, -std::numeric_limits<float>::infinity()), sum(Q, 0.0f),
      c(Q), s(Q * ATTN_TILE), kf(f32 || q8 ? 0 : ATTN_TILE * hd), vf(f32 ? 0 : ATTN_TILE * hd);
  std::vector<uint8_t> qq(q8 ? Q * rb : 0);
  std::vector<float> qd(q8 ? Q * nb : 0);
  for (int64_t i = 0; i < R; ++i) std::copy_n(q + order[i] * q_stride, G * hd, qp.data() + i * G * hd);  // (Q, hd)
  if constexpr (q8) {
    for (int64_t i = 0; i < Q; ++i) {
      kv_store_row(KvType::Q8_0, qp.data() + i * hd, hd, qq.data() + i * rb);
      for (int64_t b = 0; b < nb; ++b) qd[i * nb + b] = fp16(qq.data() + i * rb + b * KV_Q8_BYTES);
    }
  }
  std::vector<int64_t> tr(R);  // each active row's keys in this tile
  const int64_t n_max = n[order[0]];
  for (int64_t j0 = 0, full = 0; j0 < n_max; j0 += full) {
    full = std::min(ATTN_TILE, kb.run(j0));  // a tile of every row that has more than `full` keys from j0
    int64_t A = 0;  // active rows
    while (A < R && n[order[A]] > j0) {
      tr[A] = std::min(full, n[order[A]] - j0);
      ++A;
    }
    const int64_t t = tr[0];
    const uint8_t* K = kb.rows(j0);
    const uint8_t* V = vb.rows(j0);
    const float* kt = reinterpret_cast<const float*>(K);
    const float* vt = reinterpret_cast<const float*>(V);
    if constexpr (!f32) {
      if constexpr (!q8) {
        rows_to_f32<KT>(K, rb, t, hd, kf.data());
        kt = kf.data();
      }
      rows_to_f32<KT>(V, rb, t, hd, vf.data());
      vt = vf.data();
    }
    const uint8_t* vrows = reinterpret_cast<const uint8_t*>(vt);
    // Scores of every active query over the tile's t keys (a row with fewer uses its first tr).
    for (int64_t q0 = 0; q0 < A * G; q0 += ROWS_BLOCK) {
      with_block(std::min(ROWS_BLOCK, A * G - q0), [&](auto gb) {
        constexpr int B = decltype(gb)::value;
        float* sb = s.data() + q0 * ATTN_TILE;
        if constexpr (q8) {
          attn_scores_q8<B, B >= 4 ? 1 : (B == 1 ? 4 : 2)>(qq.data() + q0 * rb, qd.data() + q0 * nb, K, rb, 0, t, hd,
                                                          scale, sb);
        } else {
          attn_scores<B, rows_kj<B>(), KvF32>(qp.data() + q0 * hd, reinterpret_cast<const uint8_t*>(kt), 4 * hd, 0, t,
                                              hd, sb);
          divide_scores<B>(sb, t, scale);
        }
      });
    }
    for (int64_t i = 0; i < A; ++i)
      softmax_tile(s.data() + i * G * ATTN_TILE, G, tr[i], mx.data() + i * G, sum.data() + i * G, c.data() + i * G);
    // Values: runs of rows with the same t, in blocks of up to 4 queries.
    for (int64_t i0 = 0, i1 = 0; i0 < A; i0 = i1) {
      for (i1 = i0 + 1; i1 < A && tr[i1] == tr[i0];) ++i1;
      for (int64_t q0 = i0 * G; q0 < i1 * G; q0 += ROWS_BLOCK) {
        with_block(std::min(ROWS_BLOCK, i1 * G - q0), [&](auto gb) {
          constexpr int B = decltype(gb)::value;
          values_tile<B, KvF32>(s.data() + q0 * ATTN_TILE, vrows, 4 * hd, tr[i0], hd, c.data() + q0,
                                op.data() + q0 * hd);
        });
      }
    }
  }
  finish_rows(sum.data(), Q, hd, op.data());
  for (int64_t i = 0; i < R; ++i) std::copy_n(op.data() + i * G * hd, G * hd, out + order[i] * out_stride);
}

// Row r's G queries q + r * q_stride (G, hd) over its keys/values [0, n[r]) of kb, vb (rows of type t, the
// blocks of one sequence: every row's positions lie where kb / vb say): out + r * out_stride (G, hd), each row
// as attend gives it.
inline void attend_rows(KvType t, const float* q, int64_t q_stride, const KVBlocks& K, const KVBlocks& V,
                        const int64_t* n, int64_t R, int64_t hd, float scale, float* out, int64_t out_stride,
                        int64_t G) {
  const int64_t rb = kv_row_bytes(t, hd);
  switch (t) {
    case KvType::F32: attend_rows_typed<KvF32>(q, q_stride, K, V, n, R, hd, rb, scale, out, out_stride, G); break;
    case KvType::F16: attend_rows_typed<KvF16>(q, q_stride, K, V, n, R, hd, rb, scale, out, out_stride, G); break;
    case KvType::BF16: attend_rows_typed<KvBF16>(q, q_stride, K, V, n, R, hd, rb, scale, out, out_stride, G); break;
    case KvType::Q8_0: attend_rows_typed<KvQ8>(q, q_stride, K, V, n, R, hd, rb, scale, out, out_stride, G); break;
  }
}

}  // namespace lfq
