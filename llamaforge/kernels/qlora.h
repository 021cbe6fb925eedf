// Per-row LoRA deltas inside the fused decode step (qdecode.cpp), as punica / S-LoRA batch many adapters
// over one base model. After a projection y = x W^T (+ bias) of the step's B rows,
//     y_b += scale_i * B_i (A_i x_b)          for every row b of adapter i
// with A_i float32 (r, in) and B_i float32 (out, r) (Hu et al. 2021); rows without an adapter are left alone.
// Rows are grouped by adapter, so A_i and B_i are read once per step however many rows use them, and every
// h = A_i x_b and every output element is computed by one task in a fixed order: a row's result depends
// neither on the other rows of the batch nor on the threads. The maths of runtime/adapters.py's RowLoRA
// ((x A^T) B^T, times the scale, added to the base output), summed in another order (last-bit differences).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <immintrin.h>

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "qcommon.h"

namespace lfq {

constexpr int LORA_PROJECTIONS = 7;  // per layer, in DecoderLayer's order: wq wk wv wo w1 w2 w3

// One projection's pair: a float32 (r, in), b float32 (out, r), contiguous; both undefined where the
// adapter leaves the projection alone.
struct LoraPair {
  at::Tensor a, b;
};

// One adapter: its pairs per layer and projection, and its scale (lora_alpha / r).
struct LoraAdapter {
  std::vector<std::array<LoraPair, LORA_PROJECTIONS>> layers;
  float scale = 1.0f;
};

// The adapters of one step, each with its rows of the batch (ascending).
struct LoraRows {
  std::vector<const LoraAdapter*> adapters;
  std::vector<std::vector<int64_t>> rows;
};

// Group rows by adapter: ids (B,) holds, per row, an index into `adapters` or -1 (the base model alone).
inline LoraRows group_lora_rows(const std::vector<std::shared_ptr<LoraAdapter>>& adapters, const int64_t* ids,
                                int64_t B) {
  LoraRows out;
  std::vector<int64_t> slot(adapters.size(), -1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t i = ids[b];
    TORCH_CHECK(i >= -1 && i < static_cast<int64_t>(adapters.size()), "decoder: row ", b, " names adapter ", i,
                " of ", adapters.size());
    if (i < 0) continue;
    if (slot[i] < 0) {
      slot[i] = static_cast<int64_t>(out.adapters.size());
      out.adapters.push_back(adapters[i].get());
      out.rows.emplace_back();
    }
    out.rows[slot[i]].push_back(b);
  }
  return out;
}

inline float lora_dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y (B, N) += the deltas of projection `proj` of `layer` for the rows of each adapter in `lr` that adapts it;
// x (B, K) is the projection's float32 input.
inline void lora_add(const LoraRows& lr, int64_t layer, int proj, const float* x, int64_t K, float* y, int64_t N) {
  struct Part {
    const float *a, *b;
    int64_t r;
    float scale;
    const std::vector<int64_t>* rows;
    int64_t h;  // offset of this adapter's (rows, r) block of hidden values
  };
  std::vector<Part> parts;
  int64_t h_size = 0, rank_units = 0;
  for (size_t i = 0; i < lr.adapters.size(); ++i) {
    const LoraPair& p = lr.adapters[i]->layers[layer][proj];
    if (!p.a.defined()) continue;
    const int64_t r = p.a.size(0);
    parts.push_back(Part{p.a.data_ptr<float>(), p.b.data_ptr<float>(), r, lr.adapters[i]->scale, &lr.rows[i], h_size});
    h_size += static_cast<int64_t>(lr.rows[i].size()) * r;
    rank_units += r;
  }
  if (parts.empty()) return;
  std::vector<float> h(h_size);  // per adapter (its rows, r): A x_b
  // h: one unit per (adapter, row of A), each A row read once for all of that adapter's rows.
  const int64_t macs_per_rank = K * (h_size / rank_units + 1);
  at::parallel_for(0, rank_units, std::max<int64_t>(1, 32768 / macs_per_rank), [&](int64_t u0, int64_t u1) {
    int64_t first = 0;
    for (const Part& p : parts) {
      for (int64_t u = std::max(u0, first); u < std::min(u1, first + p.r); ++u) {
        const int64_t i = u - first;
        const float* ai = p.a + i * K;
        for (size_t t = 0; t < p.rows->size(); ++t) h[p.h + t * p.r + i] = lora_dot(x + (*p.rows)[t] * K, ai, K);
      }
      first += p.r;
    }
  });
  // y += scale * h B^T: one unit per (adapter, block of 64 outputs), each B row read once for all rows.
  constexpr int64_t BLOCK = 64;
  const int64_t blocks = (N + BLOCK - 1) / BLOCK, units = blocks * static_cast<int64_t>(parts.size());
  const int64_t macs_per_block = BLOCK * (h_size / static_cast<int64_t>(parts.size()) + 1);
  at::parallel_for(0, units, std::max<int64_t>(1, 32768 / macs_per_block), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const Part& p = parts[u / blocks];
      const int64_t o0 = (u % blocks) * BLOCK, o1 = std::min(N, o0 + BLOCK);
      for (size_t t = 0; t < p.rows->size(); ++t) {
        const float* ht = h.data() + p.h + t * p.r;
        float* yt = y + (*p.rows)[t] * N;
        for (int64_t o = o0; o < o1; ++o) yt[o] += lora_dot(p.b + o * p.r, ht, p.r) * p.scale;
      }
    }
  });
}

}  // namespace lfq
