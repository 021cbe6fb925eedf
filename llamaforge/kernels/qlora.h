// Per-row LoRA deltas, as punica / S-LoRA batch many adapters over one base model: after a projection
// y = x W^T (+ bias) of a batch,
//     y_t += scale_i * B_i (A_i x_t)          for every token row t of the batch rows of adapter i
// with A_i float32 (r, in) and B_i float32 (out, r) (Hu et al. 2021); rows without an adapter are left alone.
// The fused decode step (qdecode.cpp) calls it after each projection, and runtime/adapters.py's RowLoRA in
// the modules' forward (prefill), so both add the same deltas. Rows are grouped by adapter, so A_i and B_i
// are read once per call however many rows use them; every h = A_i x_t (a sum of 8 lanes over K) and
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

// One projection's pair: a (r, in) and bt = B^T (r, out), contiguous, both float32, bfloat16 or float16 (the
// same); both undefined where the adapter leaves the projection alone.
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

// Adapter weights are float32, or bfloat16 / float16 where they hold exactly those values (runtime/adapters.py
// picks): loaded as float32, so every product and sum is the same as from float32 tensors, at half the bytes.
struct LoadF32 {
  using T = float;
  static __m256 eight(const T* p) { return _mm256_loadu_ps(p); }
  static float one(const T* p) { return *p; }
};
struct LoadBF16 {
  using T = uint16_t;
  static __m256 eight(const T* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static float one(const T* p) { return bf16(reinterpret_cast<const uint8_t*>(p)); }
};
struct LoadF16 {
  using T = uint16_t;
  static __m256 eight(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static float one(const T* p) { return fp16(reinterpret_cast<const uint8_t*>(p)); }
};

// h[i] = A_i . x for the rows i of a (r, K) block of A: eight rows at a time, each load of x shared by
// them; per row one sum of 8 lanes over K, then its rest: a fixed order that depends on K only.
template <class L>
void lora_down(const typename L::T* a, int64_t r, const float* x, int64_t K, float* h) {
  for (int64_t i0 = 0; i0 < r; i0 += 8) {
    const typename L::T* ar[8];
    for (int j = 0; j < 8; ++j) ar[j] = a + std::min<int64_t>(i0 + j, r - 1) * K;  // past r: repeat, unused
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(L::eight(ar[j] + k), xv, acc[j]);
    }
    for (int j = 0; j < 8 && i0 + j < r; ++j) {
      float s = hsum(acc[j]);
      for (int64_t kk = k; kk < K; ++kk) s += L::one(ar[j] + kk) * x[kk];
      h[i0 + j] = s;
    }
  }
}

// yt[o0, o1) += (B ht) * scale for one token row, bt = B^T (r, N); per output the sum over r in order.
template <class L>
void lora_up(const typename L::T* bt, int64_t r, int64_t N, float scale, const float* ht, int64_t o0, int64_t o1,
             float* yt) {
  const __m256 sc = _mm256_set1_ps(scale);
  int64_t o = o0;
  for (; o + 8 <= o1; o += 8) {
    __m256 acc = _mm256_mul_ps(_mm256_broadcast_ss(ht), L::eight(bt + o));
    for (int64_t k = 1; k < r; ++k) acc = _mm256_fmadd_ps(_mm256_broadcast_ss(ht + k), L::eight(bt + k * N + o), acc);
    _mm256_storeu_ps(yt + o, _mm256_fmadd_ps(acc, sc, _mm256_loadu_ps(yt + o)));
  }
  for (; o < o1; ++o) {  // the same operations as a vector lane (fused multiply-adds)
    float acc = ht[0] * L::one(bt + o);
    for (int64_t k = 1; k < r; ++k) acc = std::fma(ht[k], L::one(bt + k * N + o), acc);
    yt[o] = std::fma(acc, scale, yt[o]);
  }
}

// y (rows, N) += the deltas of projection `proj` of `layer` for the token rows of each adapter in `lr` that
// adapts it; x (rows, K) is the projection's float32 input.
inline void lora_add(const LoraRows& lr, int64_t layer, int proj, const float* x, int64_t K, float* y, int64_t N) {
  struct Part {
    const void *a, *bt;
    at::ScalarType type;
    int64_t r;
    float scale;
    const std::vector<int64_t>* rows;
    int64_t h;  // offset of this adapter's (rows, r) block of hidden values
  };
  std::vector<Part> parts;
  int64_t h_size = 0, row_units = 0;
  for (size_t i = 0; i < lr.adapters.size(); ++i) {
    const LoraPair& p = lr.adapters[i]->layers[layer][proj];
    if (!p.a.defined()) continue;
    const int64_t r = p.a.size(0);
    parts.push_back(Part{p.a.data_ptr(), p.bt.data_ptr(), p.a.scalar_type(), r, lr.adapters[i]->scale, &lr.rows[i],
                         h_size});
    h_size += static_cast<int64_t>(lr.rows[i].size()) * r;
    row_units += static_cast<int64_t>(lr.rows[i].size());
  }
  if (parts.empty()) return;
  std::vector<float> h(h_size);  // per adapter (its rows, r): A x_t
  // h: one unit per (adapter, token row); an adapter's A (a few KB per rank) stays in cache for its rows.
  const int64_t macs_per_row = K * (h_size / row_units + 1);
  at::parallel_for(0, row_units, std::max<int64_t>(1, 65536 / macs_per_row), [&](int64_t u0, int64_t u1) {
    int64_t first = 0;
    for (const Part& p : parts) {
      const int64_t n = static_cast<int64_t>(p.rows->size());
      for (int64_t u = std::max(u0, first); u < std::min(u1, first + n); ++u) {
        const int64_t t = u - first;
        const float* xt = x + (*p.rows)[t] * K;
        float* ht = h.data() + p.h + t * p.r;
        if (p.type == at::kBFloat16)
          lora_down<LoadBF16>(static_cast<const uint16_t*>(p.a), p.r, xt, K, ht);
        else if (p.type == at::kHalf)
          lora_down<LoadF16>(static_cast<const uint16_t*>(p.a), p.r, xt, K, ht);
        else
          lora_down<LoadF32>(static_cast<const float*>(p.a), p.r, xt, K, ht);
      }
      first += n;
    }
  });
  // y += (h B^T) * scale: one unit per (adapter, block of 256 outputs).
  constexpr int64_t BLOCK = 256;
  const int64_t blocks = (N + BLOCK - 1) / BLOCK, units = blocks * static_cast<int64_t>(parts.size());
  const int64_t macs_per_unit = BLOCK * (h_size / static_cast<int64_t>(parts.size()) + 1);
  at::parallel_for(0, units, std::max<int64_t>(1, 65536 / macs_per_unit), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const Part& p = parts[u / blocks];
      const int64_t o0 = (u % blocks) * BLOCK, o1 = std::min(N, o0 + BLOCK);
      for (size_t t = 0; t < p.rows->size(); ++t) {
        const float* ht = h.data() + p.h + t * p.r;
        float* yt = y + (*p.rows)[t] * N;
        if (p.type == at::kBFloat16)
          lora_up<LoadBF16>(static_cast<const uint16_t*>(p.bt), p.r, N, p.scale, ht, o0, o1, yt);
        else if (p.type == at::kHalf)
          lora_up<LoadF16>(static_cast<const uint16_t*>(p.bt), p.r, N, p.scale, ht, o0, o1, yt);
        else
          lora_up<LoadF32>(static_cast<const float*>(p.bt), p.r, N, p.scale, ht, o0, o1, yt);
      }
    }
  });
}

}  // namespace lfq
