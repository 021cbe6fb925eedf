// The fused decode step (qdecode.h): for one new token per row, each block computes
//   h = x + wo(attention(rope(qn(wq(norm(x)))), rope(kn(wk(norm(x)))), wv(norm(x))))
// (qn, kn: the per-head q/k RMSNorms of Qwen3, identity elsewhere; projections may carry biases)
//   out = h + w2(silu(w1(norm(h))) * w3(norm(h)))
// and then logits = output(norm(out)), as llamaforge/model/layers.py does (float32 norms, softmax and
// rotary; quantized weights take int8 activations as QuantizedLinear does, float32 weights float32
// dot products), without a Python call per operation: at batch 1 the PyTorch ops between the matmuls
// cost more than the matmuls. Keys and values are read where they lie in the cache's blocks, through
// each row's block table (no gather; where a position's row lives is `kv_row`'s alone). Each
// row is computed on its own, so a row's result does not depend on the other rows of the batch. Rows
// with a LoRA adapter get its deltas after each projection it adapts (lora_add, qlora.h). The cache's
// element type (float32, float16, bfloat16 or q8_0 blocks: qkv.h) is its tensors' dtype; rows are stored in it.

#include "qdecode.h"

#include "qattn.h"
#include "qattn_rows.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace lfq {
namespace {

float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out = x / sqrt(mean(x^2) + eps) * w, row by row (RMSNorm).
void rms_norm(const float* x, const float* w, int64_t B, int64_t dim, float eps, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * dim;
    const float r = 1.0f / std::sqrt(dot(xr, xr, dim) / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) out[b * dim + i] = xr[i] * r * w[i];
  }
}

// Rotate interleaved pairs (x[2i], x[2i+1]) of each of n_heads heads by the angles at one position.
void rope(float* x, int64_t n_heads, int64_t head_dim, const float* cos, const float* sin) {
  for (int64_t h = 0; h < n_heads; ++h) {
    float* xh = x + h * head_dim;
    for (int64_t i = 0; i < head_dim / 2; ++i) {
      const float x0 = xh[2 * i], x1 = xh[2 * i + 1];
      xh[2 * i] = x0 * cos[i] - x1 * sin[i];
      xh[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
    }
  }
}

// gate[i] = silu(gate[i]) * up[i] = gate[i] / (1 + e^-gate[i]) * up[i] for i < n, 8 at a time with exp256
// (qattn.h); the last n % 8 go through the same vector code in a padded copy, so an element's bits do not
// depend on where a thread's share of the batch starts or ends (the step's rows stay independent). Scalar
// expf with a scalar division (one at a time) was 7% of an 8-row verification of the default model.
void swiglu(float* gate, const float* up, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
  const auto eight = [&](const float* g, const float* u, float* out) {
    const __m256 x = _mm256_loadu_ps(g);
    const __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, exp256(_mm256_xor_ps(x, neg))));
    _mm256_storeu_ps(out, _mm256_mul_ps(s, _mm256_loadu_ps(u)));
  };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) eight(gate + i, up + i, gate + i);
  if (i < n) {
    float g[8] = {}, u[8] = {};
    std::copy(gate + i, gate + n, g);
    std::copy(up + i, up + n, u);
    eight(g, u, g);
    std::copy(g, g + (n - i), gate + i);
  }
}

// Byte offset of the cached row of position `pos`, KV head g, in one layer's blocks (n_blocks, Hkv, bs, rows of
// rb bytes) of a sequence whose block table is `table` (model/kv_cache.py's `locate`).
inline int64_t kv_row(const int64_t* table, int64_t pos, int64_t g, int64_t Hkv, int64_t bs, int64_t rb) {
  return ((table[pos / bs] * Hkv + g) * bs + pos % bs) * rb;
}

// Rows [first, first + rows) of a batch whose block tables agree over the blocks each row reads (keys[b] keys)
// with the table of row `table`, the longest: they attend as one (attend_rows).
struct RowGroup {
  int64_t first, rows, table;
};

// The batch's rows in groups of consecutive rows that read the same blocks; with several threads, groups are
// split in halves (the largest first) while there are fewer than two tasks (groups x KV heads) per thread
// (3 tasks over 2 threads leave one thread idle a third of the time).
std::vector<RowGroup> row_groups(const int64_t* blocks, int64_t W, int64_t BS, const int64_t* keys, int64_t B,
                                 int64_t Hkv, int64_t threads) {
  auto agree = [&](int64_t a, int64_t b) {  // row a reads its blocks where row b's table says (keys[a] <= keys[b])
    for (int64_t j = 0; j <= (keys[a] - 1) / BS; ++j)
      if (blocks[a * W + j] != blocks[b * W + j]) return false;
    return true;
  };
  std::vector<RowGroup> groups;
  for (int64_t b = 0; b < B; ++b) {
    if (!groups.empty()) {
      RowGroup& g = groups.back();
      const bool longer = keys[b] > keys[g.table];
      if (longer ? agree(g.table, b) : agree(b, g.table)) {
        g.rows += 1;
        if (longer) g.table = b;
        continue;
      }
    }
    groups.push_back({b, 1, b});
  }
  auto longest = [&](int64_t first, int64_t rows) {
    int64_t t = first;
    for (int64_t b = first; b < first + rows; ++b) t = keys[b] > keys[t] ? b : t;
    return t;
  };
  while (threads > 1 && static_cast<int64_t>(groups.size()) * Hkv < 2 * threads) {
    auto big = std::max_element(groups.begin(), groups.end(),
                                [](const RowGroup& a, const RowGroup& b) { return a.rows < b.rows; });
    if (big->rows < 2) break;
    const int64_t half = big->rows / 2;
    const RowGroup second{big->first + half, big->rows - half, longest(big->first + half, big->rows - half)};
    *big = {big->first, half, longest(big->first, half)};
    groups.insert(big + 1, second);
  }
  return groups;
}

// ys_i = x (M, K) @ W_i.T, quantizing x into `rows` in the forms the weights read (none if all are float).
void project(const QWeight* const* ws, float* const* ys, int n, const float* x, int64_t M, int64_t K,
             QuantizedRows& rows) {
  if (const int forms = act_forms(ws, n)) rows.quantize(x, M, K, forms);
  matmul_many(ws, ys, n, rows.act(), x, M);
}

}  // namespace

void Decoder::check_adapters(const std::vector<std::shared_ptr<LoraAdapter>>& adapters) const {
  for (const auto& ad : adapters) {
    TORCH_CHECK(ad && ad->layers.size() == layers_.size(), "decoder: an adapter needs ", layers_.size(), " layers");
    for (size_t l = 0; l < layers_.size(); ++l) {
      const DecoderLayer& ly = layers_[l];
      const QWeight* ws[LORA_PROJECTIONS] = {&ly.wq, &ly.wk, &ly.wv, &ly.wo, &ly.w1, &ly.w2, &ly.w3};
      for (int p = 0; p < LORA_PROJECTIONS; ++p) {
        const LoraPair& pair = ad->layers[l][p];
        TORCH_CHECK(!pair.a.defined() || (pair.a.size(1) == ws[p]->K && pair.bt.size(1) == ws[p]->N),
                    "decoder: adapter pair of layer ", l, " projection ", p, " is A ", pair.a.sizes(), ", B^T ",
                    pair.bt.sizes(), " for a weight of ", ws[p]->N, " x ", ws[p]->K);
      }
    }
  }
}

KvType kv_type_of(const at::Tensor& cache, int64_t hd) {
  const int64_t row = cache.dim() > 0 ? cache.size(cache.dim() - 1) : -1;
  switch (cache.scalar_type()) {
    case at::kFloat: TORCH_CHECK(row == hd, "kv: float32 rows hold head_dim = ", hd, " values, got ", row); return KvType::F32;
    case at::kHalf: TORCH_CHECK(row == hd, "kv: float16 rows hold head_dim = ", hd, " values, got ", row); return KvType::F16;
    case at::kBFloat16:
      TORCH_CHECK(row == hd, "kv: bfloat16 rows hold head_dim = ", hd, " values, got ", row);
      return KvType::BF16;
    case at::kByte:
      TORCH_CHECK(hd % KV_Q8_BLOCK == 0 && row == kv_row_bytes(KvType::Q8_0, hd), "kv: q8_0 rows of head_dim ", hd,
                  " (a multiple of 32) are ", kv_row_bytes(KvType::Q8_0, hd), " bytes, got ", row);
      return KvType::Q8_0;
    default: TORCH_CHECK(false, "kv: the cache must be float32, float16, bfloat16 or uint8 (q8_0), got ", cache.scalar_type());
  }
  return KvType::F32;
}

at::Tensor kv_store(const at::Tensor& x_in, const at::Tensor& like) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "kv_store: x must be float32 (rows, head_dim)");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), hd = x.size(1);
  const int64_t row = like.scalar_type() == at::kByte ? kv_row_bytes(KvType::Q8_0, hd) : hd;
  at::Tensor out = at::empty({n, row}, like.options());
  const KvType t = kv_type_of(out, hd);
  const int64_t rb = kv_row_bytes(t, hd);
  for (int64_t i = 0; i < n; ++i)
    kv_store_row(t, x.data_ptr<float>() + i * hd, hd, static_cast<uint8_t*>(out.data_ptr()) + i * rb);
  return out;
}

at::Tensor kv_attend(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in) {
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && q_in.dim() == 2 && k_in.dim() == 2 && k_in.sizes() == v_in.sizes() &&
                  k_in.scalar_type() == v_in.scalar_type() && k_in.size(0) >= 1,
              "kv_attend: q float32 (G, head_dim); k, v (n >= 1, row) of one cache type");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t G = q.size(0), hd = q.size(1);
  const KvType t = kv_type_of(k, hd);
  at::Tensor out = at::empty({G, hd}, q.options());
  const int64_t rb = kv_row_bytes(t, hd);
  const KVBlocks kb{static_cast<const uint8_t*>(k.data_ptr()), nullptr, 0, 0, rb};  // contiguous rows
  const KVBlocks vb{static_cast<const uint8_t*>(v.data_ptr()), nullptr, 0, 0, rb};
  attend(t, q.data_ptr<float>(), kb, vb, k.size(0), hd, static_cast<float>(std::sqrt(static_cast<double>(hd))), out.data_ptr<float>(), G);
  return out;
}

at::Tensor kv_attend_rows(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                          const at::Tensor& n_in) {
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && q_in.dim() == 3 && k_in.dim() == 2 && k_in.sizes() == v_in.sizes() &&
                  k_in.scalar_type() == v_in.scalar_type() && n_in.dim() == 1 && n_in.size(0) == q_in.size(0),
              "kv_attend_rows: q float32 (R, G, head_dim); k, v (n, row) of one cache type; n (R,)");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor n = n_in.to(at::kLong).contiguous();
  const int64_t R = q.size(0), G = q.size(1), hd = q.size(2);
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(n.data_ptr<int64_t>()[r] >= 1 && n.data_ptr<int64_t>()[r] <= k.size(0), "kv_attend_rows: n[", r,
                "] = ", n.data_ptr<int64_t>()[r], " is not in [1, ", k.size(0), "]");
  const KvType t = kv_type_of(k, hd);
  at::Tensor out = at::empty({R, G, hd}, q.options());
  const int64_t rb = kv_row_bytes(t, hd);
  const KVBlocks kb{static_cast<const uint8_t*>(k.data_ptr()), nullptr, 0, 0, rb};  // contiguous rows
  const KVBlocks vb{static_cast<const uint8_t*>(v.data_ptr()), nullptr, 0, 0, rb};
  attend_rows(t, q.data_ptr<float>(), G * hd, kb, vb, n.data_ptr<int64_t>(), R, hd,
              static_cast<float>(std::sqrt(static_cast<double>(hd))), out.data_ptr<float>(), G * hd, G);
  return out;
}

at::Tensor kv_attend_blocks(const at::Tensor& q_in, const at::Tensor& k_layer, const at::Tensor& v_layer,
                            const at::Tensor& tables_in, const at::Tensor& n_in) {
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && q_in.dim() == 4 && k_layer.dim() == 4 &&
                  k_layer.sizes() == v_layer.sizes() && k_layer.scalar_type() == v_layer.scalar_type() &&
                  k_layer.is_contiguous() && v_layer.is_contiguous() && tables_in.dim() == 2 && n_in.dim() == 2 &&
                  tables_in.size(0) == q_in.size(0) && n_in.size(0) == q_in.size(0) && n_in.size(1) == q_in.size(1),
              "kv_attend_blocks: q float32 (B, T, H, head_dim); one layer's k, v blocks (NB, Hkv, BS, row), "
              "contiguous; tables (B, W); n (B, T)");
  const at::Tensor q = q_in.contiguous(), tables_t = tables_in.to(at::kLong).contiguous(),
                   n_t = n_in.to(at::kLong).contiguous();
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), hd = q.size(3);
  const int64_t NB = k_layer.size(0), Hkv = k_layer.size(1), BS = k_layer.size(2), W = tables_t.size(1);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "kv_attend_blocks: ", H, " query heads over ", Hkv, " KV heads");
  const KvType t = kv_type_of(k_layer, hd);
  const int64_t* tables = tables_t.data_ptr<int64_t>();
  const int64_t* n = n_t.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t most = 0;
    for (int64_t i = 0; i < T; ++i) {
      TORCH_CHECK(n[b * T + i] >= 1 && n[b * T + i] <= W * BS, "kv_attend_blocks: n[", b, ", ", i, "] = ",
                  n[b * T + i], " is not in [1, ", W * BS, "]");
      most = std::max(most, n[b * T + i]);
    }
    for (int64_t j = 0; j < (most + BS - 1) / BS; ++j)
      TORCH_CHECK(tables[b * W + j] >= 0 && tables[b * W + j] < NB, "kv_attend_blocks: block ", tables[b * W + j],
                  " is not in [0, ", NB, ")");
  }
  at::Tensor out = at::empty({B, T, H, hd}, q.options());
  const int64_t rb = kv_row_bytes(t, hd), G = H / Hkv;
  const auto* kl = static_cast<const uint8_t*>(k_layer.data_ptr());
  const auto* vl = static_cast<const uint8_t*>(v_layer.data_ptr());
  const float scale = static_cast<float>(std::sqrt(static_cast<double>(hd)));
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // One task per (row, KV head), as the fused step's: a row's T positions and G query heads attend together,
  // each position's result the bits attend gives it alone (qattn_rows.h), whatever else is in the batch.
  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / Hkv, g = task % Hkv;
      const KVBlocks kb{kl + g * BS * rb, tables + b * W, Hkv * BS * rb, BS, rb};
      const KVBlocks vb{vl + g * BS * rb, tables + b * W, Hkv * BS * rb, BS, rb};
      attend_rows(t, qp + (b * T * H + g * G) * hd, H * hd, kb, vb, n + b * T, T, hd, scale,
                  op + (b * T * H + g * G) * hd, H * hd, G);
    }
  });
  return out;
}

at::Tensor kv_scores(const at::Tensor& q_in, const at::Tensor& k_in) {
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && q_in.dim() == 2 && k_in.dim() == 2 && k_in.size(0) >= 1,
              "kv_scores: q float32 (G, head_dim); k (n >= 1, row)");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const int64_t G = q.size(0), hd = q.size(1), n = k.size(0);
  const KvType t = kv_type_of(k, hd);
  at::Tensor out = at::empty({G, n}, q.options());
  const KVBlocks kb{static_cast<const uint8_t*>(k.data_ptr()), nullptr, 0, 0, kv_row_bytes(t, hd)};
  attention_scores(t, q.data_ptr<float>(), kb, n, hd,
                   static_cast<float>(std::sqrt(static_cast<double>(hd))), out.data_ptr<float>(), G);
  return out;
}

Decoder::Decoder(std::vector<DecoderLayer> layers, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                 double norm_eps, at::Tensor cos, at::Tensor sin, at::Tensor norm, QWeight output)
    : layers_(std::move(layers)), norm_(std::move(norm)), output_(std::move(output)), n_heads_(n_heads),
      n_kv_heads_(n_kv_heads), head_dim_(head_dim), eps_(static_cast<float>(norm_eps)), cos_(std::move(cos)),
      sin_(std::move(sin)) {
  TORCH_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0 && head_dim % 2 == 0,
              "decoder: n_heads must be a multiple of n_kv_heads and head_dim even");
  TORCH_CHECK(cos_.scalar_type() == at::kFloat && cos_.is_contiguous() && cos_.dim() == 2 &&
                  cos_.size(1) == head_dim / 2 && sin_.sizes() == cos_.sizes() && sin_.is_contiguous() &&
                  sin_.scalar_type() == at::kFloat,
              "decoder: rotary tables must be contiguous float32 (positions, head_dim / 2)");
  for (const DecoderLayer& l : layers_) {
    const int64_t dim = l.attention_norm.numel();
    for (const QWeight* q : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w2, &l.w3}) {
      check_weight(q->w, q->qt, q->N, q->K, q->layout);
      TORCH_CHECK(!q->bias.defined() || (q->bias.scalar_type() == at::kFloat && q->bias.is_contiguous() &&
                                         q->bias.numel() == q->N),
                  "decoder: a bias must be contiguous float32 (out_features,)");
    }
    for (const at::Tensor* n : {&l.q_norm, &l.k_norm})
      TORCH_CHECK(!n->defined() || (n->scalar_type() == at::kFloat && n->is_contiguous() && n->numel() == head_dim),
                  "decoder: q/k norm weights must be contiguous float32 (head_dim,)");
    TORCH_CHECK(l.q_norm.defined() == l.k_norm.defined(), "decoder: q_norm and k_norm come together");
    TORCH_CHECK(l.attention_norm.scalar_type() == at::kFloat && l.ffn_norm.scalar_type() == at::kFloat &&
                    l.attention_norm.is_contiguous() && l.ffn_norm.is_contiguous() && l.ffn_norm.numel() == dim,
                "decoder: norm weights must be contiguous float32 (dim,)");
    TORCH_CHECK(l.wq.K == dim && l.wk.K == dim && l.wv.K == dim && l.w1.K == dim && l.w3.K == dim &&
                    l.wq.N == n_heads * head_dim && l.wk.N == n_kv_heads * head_dim &&
                    l.wv.N == n_kv_heads * head_dim && l.wo.K == l.wq.N && l.wo.N == dim &&
                    l.w3.N == l.w1.N && l.w2.K == l.w1.N && l.w2.N == dim,
                "decoder: projection shapes do not fit dim ", dim, ", ", n_heads, " heads, ", n_kv_heads,
                " kv heads of ", head_dim);
  }
  TORCH_CHECK(!layers_.empty(), "decoder: no layers");
  check_weight(output_.w, output_.qt, output_.N, output_.K, output_.layout);
  TORCH_CHECK(norm_.scalar_type() == at::kFloat && norm_.is_contiguous() &&
                  norm_.numel() == layers_[0].attention_norm.numel() && output_.K == norm_.numel() &&
                  (!output_.bias.defined() || output_.bias.numel() == output_.N),
              "decoder: the final norm and output projection do not fit dim ", norm_.numel());
}

at::Tensor Decoder::step(const at::Tensor& x_in, const at::Tensor& pos_in, const at::Tensor& blocks_in,
                         at::Tensor& kc, at::Tensor& vc, int64_t kv_len,
                         const std::vector<std::shared_ptr<LoraAdapter>>& adapters,
                         const at::Tensor& row_adapter) const {
  const int64_t n_layers = static_cast<int64_t>(layers_.size());
  const int64_t dim = layers_[0].attention_norm.numel(), hd = head_dim_, H = n_heads_, Hkv = n_kv_heads_;
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 3 && x_in.size(1) == 1 && x_in.size(2) == dim,
              "decoder: x must be float32 (B, 1, ", dim, "), got ", x_in.sizes());
  const int64_t B = x_in.size(0);
  const KvType kvt = kv_type_of(kc, hd);
  TORCH_CHECK(kc.scalar_type() == vc.scalar_type() && kc.is_contiguous() && vc.is_contiguous() && kc.dim() == 5 &&
                  kc.sizes() == vc.sizes() && kc.size(0) == n_layers && kc.size(2) == Hkv,
              "decoder: the KV cache must be two contiguous tensors (", n_layers, ", blocks, ", Hkv, ", block size, row)");
  const int64_t NB = kc.size(1), BS = kc.size(3), rb = kv_row_bytes(kvt, hd);
  const at::Tensor pos_t = pos_in.to(at::kLong).contiguous(), blocks_t = blocks_in.to(at::kLong).contiguous();
  TORCH_CHECK(pos_t.numel() == B && blocks_t.dim() == 2 && blocks_t.size(0) == B,
              "decoder: pos (B,) and blocks (B, W) need one row per token");
  const int64_t W = blocks_t.size(1);
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  const int64_t* blocks = blocks_t.data_ptr<int64_t>();
  LoraRows lora;  // the rows of each adapter in this batch
  at::Tensor ids_t;
  if (row_adapter.defined()) {
    check_adapters(adapters);
    ids_t = row_adapter.to(at::kLong).contiguous();
    TORCH_CHECK(ids_t.numel() == B, "decoder: row_adapter needs one entry per row");
    lora = group_lora_rows(adapters, ids_t.data_ptr<int64_t>(), B, 1);
  }
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pos[b] >= 0 && pos[b] < W * BS && pos[b] < cos_.size(0), "decoder: position ", pos[b],
                " is outside the row's block table (", W, " blocks of ", BS, ") or the rotary tables (", cos_.size(0),
                ")");
    for (int64_t j = 0; j <= pos[b] / BS; ++j)
      TORCH_CHECK(blocks[b * W + j] >= 0 && blocks[b * W + j] < NB, "decoder: block ", blocks[b * W + j],
                  " is not in [0, ", NB, ")");
  }

  // Each row attends over keys [0, keys[b]); consecutive rows that read the same blocks for them (one
  // sequence's verification rows) attend as one group (row_groups).
  std::vector<int64_t> keys(B);
  int64_t keys_max = 0;
  for (int64_t b = 0; b < B; ++b) keys_max = std::max(keys_max, keys[b] = std::min(pos[b] + 1, kv_len));
  const std::vector<RowGroup> groups = row_groups(blocks, W, BS, keys.data(), B, Hkv, at::get_num_threads());

  at::Tensor out = x_in.contiguous().clone();
  float* x = out.data_ptr<float>();
  const int64_t hidden = layers_[0].w1.N;
  std::vector<float> xn(B * dim), q(B * H * hd), k(B * Hkv * hd), v(B * Hkv * hd), attn(B * H * hd),
      proj(B * dim), gate(B * hidden), up(B * hidden);
  QuantizedRows rows;
  const float scale = static_cast<float>(std::sqrt(static_cast<double>(hd)));
  const float* cos = cos_.data_ptr<float>();
  const float* sin = sin_.data_ptr<float>();

  for (int64_t l = 0; l < n_layers; ++l) {
    const DecoderLayer& ly = layers_[l];
    uint8_t* kl = static_cast<uint8_t*>(kc.data_ptr()) + l * NB * Hkv * BS * rb;  // rows of rb bytes (qkv.h)
    uint8_t* vl = static_cast<uint8_t*>(vc.data_ptr()) + l * NB * Hkv * BS * rb;

    // Attention: projections from one quantization of the normed input.
    rms_norm(x, ly.attention_norm.data_ptr<float>(), B, dim, eps_, xn.data());
    {
      const QWeight* ws[3] = {&ly.wq, &ly.wk, &ly.wv};
      float* ys[3] = {q.data(), k.data(), v.data()};
      project(ws, ys, 3, xn.data(), B, dim, rows);
      for (int p = 0; p < 3; ++p) lora_add(lora, l, p, xn.data(), dim, ys[p], ws[p]->N);
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t half = hd / 2;
      if (ly.q_norm.defined()) {  // each head normalised on its own, in place
        rms_norm(q.data() + b * H * hd, ly.q_norm.data_ptr<float>(), H, hd, eps_, q.data() + b * H * hd);
        rms_norm(k.data() + b * Hkv * hd, ly.k_norm.data_ptr<float>(), Hkv, hd, eps_, k.data() + b * Hkv * hd);
      }
      rope(q.data() + b * H * hd, H, hd, cos + pos[b] * half, sin + pos[b] * half);
      rope(k.data() + b * Hkv * hd, Hkv, hd, cos + pos[b] * half, sin + pos[b] * half);
      for (int64_t g = 0; g < Hkv; ++g) {
        const int64_t at = kv_row(blocks + b * W, pos[b], g, Hkv, BS, rb);
        kv_store_row(kvt, k.data() + (b * Hkv + g) * hd, hd, kl + at);
        kv_store_row(kvt, v.data() + (b * Hkv + g) * hd, hd, vl + at);
      }
    }
    // One task per (group of rows of one sequence, KV head): its rows' H / Hkv query heads attend together,
    // reading K and V once (qattn.h for one row, qattn_rows.h for several).
    const int64_t G = H / Hkv;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, keys_max * hd * G));
    const int64_t n_groups = static_cast<int64_t>(groups.size());
    at::parallel_for(0, n_groups * Hkv, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const RowGroup& rg = groups[t / Hkv];
        const int64_t g = t % Hkv, b = rg.first;
        // kv_row(table, pos) = table[pos / BS] * (Hkv * BS * rb) + g * BS * rb + (pos % BS) * rb, as KVBlocks reads it
        const KVBlocks kb{kl + g * BS * rb, blocks + rg.table * W, Hkv * BS * rb, BS, rb};
        const KVBlocks vb{vl + g * BS * rb, blocks + rg.table * W, Hkv * BS * rb, BS, rb};
        if (rg.rows == 1)
          attend(kvt, q.data() + (b * H + g * G) * hd, kb, vb, keys[b], hd, scale, attn.data() + (b * H + g * G) * hd, G);
        else
          attend_rows(kvt, q.data() + (b * H + g * G) * hd, H * hd, kb, vb, keys.data() + b, rg.rows, hd, scale,
                      attn.data() + (b * H + g * G) * hd, H * hd, G);
      }
    });
    {
      const QWeight* ws[1] = {&ly.wo};
      float* ys[1] = {proj.data()};
      project(ws, ys, 1, attn.data(), B, H * hd, rows);
      lora_add(lora, l, 3, attn.data(), H * hd, proj.data(), dim);
    }
    for (int64_t i = 0; i < B * dim; ++i) x[i] += proj[i];

    // Feed-forward: w2(silu(w1 h) * w3 h), w1 and w3 from one quantization.
    rms_norm(x, ly.ffn_norm.data_ptr<float>(), B, dim, eps_, xn.data());
    {
      const QWeight* ws[2] = {&ly.w1, &ly.w3};
      float* ys[2] = {gate.data(), up.data()};
      project(ws, ys, 2, xn.data(), B, dim, rows);
      lora_add(lora, l, 4, xn.data(), dim, gate.data(), hidden);
      lora_add(lora, l, 6, xn.data(), dim, up.data(), hidden);
    }
    // SwiGLU over the threads (elementwise: the same bits however the range is split).
    at::parallel_for(0, B * hidden, 2048,
                     [&](int64_t i0, int64_t i1) { swiglu(gate.data() + i0, up.data() + i0, i1 - i0); });
    {
      const QWeight* ws[1] = {&ly.w2};
      float* ys[1] = {proj.data()};
      project(ws, ys, 1, gate.data(), B, hidden, rows);
      lora_add(lora, l, 5, gate.data(), hidden, proj.data(), dim);
    }
    for (int64_t i = 0; i < B * dim; ++i) x[i] += proj[i];
  }
  rms_norm(x, norm_.data_ptr<float>(), B, dim, eps_, xn.data());
  at::Tensor logits = at::empty({B, 1, output_.N}, at::kFloat);
  {
    const QWeight* ws[1] = {&output_};
    float* ys[1] = {logits.data_ptr<float>()};
    project(ws, ys, 1, xn.data(), B, dim, rows);
  }
  return logits;
}

}  // namespace lfq
