// Per-row LoRA deltas, as punica / S-LoRA batch many adapters over one base model: after a projection
// y = x W^T (+ bias) of a batch,
//     y_t += scale_i * B_i (A_i x_t)          for every token row t of the batch rows of adapter i
// with A_i float32 (r, in) and B_i float32 (out, r) (Hu et al. 2021); rows without an adapter are left alone.
// The fused decode step (qdecode.cpp) calls it after each projection, and runtime/adapters.py's RowLoRA in
// the modules' forward (prefill), so both add the same deltas. Rows are grouped by adapter, so A_i and B_i
// are read once per call however many rows use them; every h = A_i x_t (4 interleaved sums of 8 lanes) and
// every output (a sequential sum over r) is one task's fixed sequence of fused multiply-adds: a row's result
// depends neither on the other rows of the batch, nor on its padding, nor on the threads. B is kept
// transposed, (r, out), so 8 outputs take one vector operation per rank.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <immintrin.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "qcommon.h"

namespace lfq {

constexpr int LORA_PROJECTIONS = 7;  // per layer, in DecoderLayer's order: wq wk wv wo w1 w2 w3

// One projection's pair: a float32 (r, in) and bt = B^T float32 (r, out), contiguous; both undefined where
// the adapter leaves the projection alone.
struct LoraPair {
  at::Tensor a, bt;
};

// One adapter: its pairs per layer and projection, and its scale (lora_alpha / r).
struct LoraAdapter {
  std::vector<std::array<LoraPair, LORA_PROJECTIONS>> layers;
  float scale = 1.0f;
};

// The adapters of one call, each with its token rows (ascending).
struct LoraRows {
  std::vector<const LoraAdapter*> adapters;
  std::vector<std::vector<int64_t>> rows;
};

// Group rows by adapter: ids (B,) holds, per batch row, an index into `adapters` or -1 (the base model alone);
// batch row b has token rows [b T, (b + 1) T).
inline LoraRows group_lora_rows(const std::vector<std::shared_ptr<LoraAdapter>>& adapters, const int64_t* ids,
                                int64_t B, int64_t T) {
  LoraRows out;
  std::vector<int64_t> slot(adapters.size(), -1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t i = ids[b];
    TORCH_CHECK(i >= -1 && i < static_cast<int64_t>(adapters.size()), "lora: row ", b, " names adapter ", i,
                " of ", adapters.size());
    if (i < 0) continue;
    TORCH_CHECK(adapters[i] != nullptr, "lora: adapter ", i, " is None");
    if (slot[i] < 0) {
      slot[i] = static_cast<int64_t>(out.adapters.size());
      out.adapters.push_back(adapters[i].get());
      out.rows.emplace_back();
    }
    for (int64_t t = 0; t < T; ++t) out.rows[slot[i]].push_back(b * T + t);
  }
  return out;
}

// a . b over n floats: four independent sums of 8 lanes (32 floats a round), then the rest; a fixed order.
inline float lora_dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y (rows, N) += the deltas of projection `proj` of `layer` for the token rows of each adapter in `lr` that
// adapts it; x (rows, K) is the projection's float32 input.
inline void lora_add(const LoraRows& lr, int64_t layer, int proj, const float* x, int64_t K, float* y, int64_t N) {
  struct Part {
    const float *a, *bt;
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
    parts.push_back(Part{p.a.data_ptr<float>(), p.bt.data_ptr<float>(), r, lr.adapters[i]->scale, &lr.rows[i], h_size});
    h_size += static_cast<int64_t>(lr.rows[i].size()) * r;
    rank_units += r;
  }
  if (parts.empty()) return;
  std::vector<float> h(h_size);  // per adapter (its rows, r): A x_t
  // h: one unit per (adapter, row of A), each A row read once for all of that adapter's rows.
  const int64_t macs_per_rank = K * (h_size / rank_units + 1);
  at::parallel_for(0, rank_units, std::max<int64_t>(1, 65536 / macs_per_rank), [&](int64_t u0, int64_t u1) {
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
  // y += (h B^T) * scale: one unit per (adapter, block of 256 outputs); per output, the sum over r in order.
  constexpr int64_t BLOCK = 256;
  const int64_t blocks = (N + BLOCK - 1) / BLOCK, units = blocks * static_cast<int64_t>(parts.size());
  const int64_t macs_per_unit = BLOCK * (h_size / static_cast<int64_t>(parts.size()) + 1);
  at::parallel_for(0, units, std::max<int64_t>(1, 65536 / macs_per_unit), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const Part& p = parts[u / blocks];
      const int64_t o0 = (u % blocks) * BLOCK, o1 = std::min(N, o0 + BLOCK);
      const __m256 sc = _mm256_set1_ps(p.scale);
      for (size_t t = 0; t < p.rows->size(); ++t) {
        const float* ht = h.data() + p.h + t * p.r;
        float* yt = y + (*p.rows)[t] * N;
        int64_t o = o0;
        for (; o + 8 <= o1; o += 8) {
          __m256 acc = _mm256_mul_ps(_mm256_broadcast_ss(ht), _mm256_loadu_ps(p.bt + o));
          for (int64_t k = 1; k < p.r; ++k)
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(ht + k), _mm256_loadu_ps(p.bt + k * N + o), acc);
          _mm256_storeu_ps(yt + o, _mm256_fmadd_ps(acc, sc, _mm256_loadu_ps(yt + o)));
        }
        for (; o < o1; ++o) {  // the same operations as a vector lane (fused multiply-adds)
          float acc = ht[0] * p.bt[o];
          for (int64_t k = 1; k < p.r; ++k) acc = std::fma(ht[k], p.bt[k * N + o], acc);
          yt[o] = std::fma(acc, p.scale, yt[o]);
        }
      }
    }
  });
}

}  // namespace lfq
