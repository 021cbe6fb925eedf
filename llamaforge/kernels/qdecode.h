// The fused decode step: a Llama's blocks, final norm and output projection for one new token per
// row, in one call from Python (qdecode.cpp); weights quantized or float. Same maths as llamaforge/model/layers.py for T == 1.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "qkv.h"
#include "qlora.h"
#include "qops.h"

namespace lfq {

// The element type of a KV cache tensor (..., row): float32 / float16 / bfloat16 rows of hd values, or uint8 rows of
// q8_0 blocks (qkv.h); an error for anything else.
KvType kv_type_of(const at::Tensor& cache, int64_t hd);
// Rows x float32 (n, hd) stored as a cache of like's dtype would store them: (n, row) (tests, kv_types.encode's twin).
at::Tensor kv_store(const at::Tensor& x, const at::Tensor& like);
// The fused step's attention of G queries q float32 (G, hd) over one KV head's rows k, v (n, row): float32 (G, hd).
at::Tensor kv_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
// The attention of R rows at once (qattn_rows.h, as the fused step attends a sequence's verification rows): row r's
// queries q[r] (G, hd) over k, v [0, n[r]) (n: int64 (R,), each in [1, k rows]): float32 (R, G, hd).
at::Tensor kv_attend_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& n);
// Each row's T query positions (B, T, H, hd) over its sequence's keys and values [0, n[b, t]) in one layer of
// a paged KV cache (NB, Hkv, BS, row), read in place through the rows' block tables (B, W): a prompt chunk.
at::Tensor kv_attend_blocks(const at::Tensor& q, const at::Tensor& k_layer, const at::Tensor& v_layer,
                            const at::Tensor& tables, const at::Tensor& n);
// kv_attend's scores q k^T / sqrt(hd): float32 (G, n).
at::Tensor kv_scores(const at::Tensor& q, const at::Tensor& k);

struct DecoderLayer {
  at::Tensor attention_norm, ffn_norm;  // float32 (dim,)
  QWeight wq, wk, wv, wo, w1, w2, w3;
  at::Tensor q_norm, k_norm;  // float32 (head_dim,): RMSNorm of each q / k head before rotary (Qwen3), or undefined
};

class Decoder {
 public:
  // cos, sin: float32 (max positions, head_dim / 2), the model's rotary tables; norm: the final
  // RMSNorm's float32 (dim,) weight; output: the (vocab, dim) output projection.
  Decoder(std::vector<DecoderLayer> layers, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double norm_eps,
          at::Tensor cos, at::Tensor sin, at::Tensor norm, QWeight output);

  // x: float32 (B, 1, dim) token embeddings; pos: int64 (B,); blocks: int64 (B, W), each row's block table;
  // k_cache, v_cache: (n_layers, n_blocks, n_kv_heads, block_size, row) (model/kv_cache.py), rows of one KV
  // element type (kv_type_of). Writes each row's keys and values at its position (in block
  // blocks[b][pos / block_size]) and attends over its positions [0, min(pos + 1, kv_len)). Returns the logits
  // (B, 1, vocab) in float32. adapters, row_adapter: LoRA adapters (qlora.h) and, per row, the index of its
  // adapter or -1 (int64 (B,); undefined: no row has one).
  at::Tensor step(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& blocks, at::Tensor& k_cache,
                  at::Tensor& v_cache, int64_t kv_len, const std::vector<std::shared_ptr<LoraAdapter>>& adapters = {},
                  const at::Tensor& row_adapter = at::Tensor()) const;

 private:
  std::vector<DecoderLayer> layers_;
  at::Tensor norm_;
  QWeight output_;
  int64_t n_heads_, n_kv_heads_, head_dim_;
  float eps_;
  at::Tensor cos_, sin_;

  // Raises unless each adapter has a pair shaped (r, K), (N, r) for each projection it adapts.
  void check_adapters(const std::vector<std::shared_ptr<LoraAdapter>>& adapters) const;
};

}  // namespace lfq
