// What the bindings (qmatmul.cpp) and the fused decode step (qdecode.cpp) share: a quantized weight
// as the kernels see it, activation rows quantized once for several weights, and the threaded
// matmul over one or more weights that read the same activations.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "qcommon.h"

namespace lfq {

// A weight in GGUF blocks: uint8 bytes `w` in `layout` (LAYOUT_GGUF or LAYOUT_X8) holding an (N, K)
// matrix of GGML type `qt`, or a plain float weight (T_F32 / T_F16 / T_BF16, layout 0: a contiguous
// (N, K) tensor of that dtype, or its bytes as uint8 (N, K * element size));
// `bias` (N,) float32 or undefined.
struct QWeight {
  at::Tensor w;
  int64_t qt = 0, N = 0, K = 0, layout = 0;
  at::Tensor bias;
};

// Raises c10::Error (a RuntimeError in Python) unless w holds an (N, K) weight of type qt in layout.
void check_weight(const at::Tensor& w, int64_t qt, int64_t N, int64_t K, int64_t layout);

// Activation rows quantized to int8 (qcommon.h) in the forms the weights read: blocks of 32, and/or Q8_K's
// blocks of 256 for K-quant weights (a layer whose inputs feed both kinds quantizes x once per form);
// reusable across calls.
struct QuantizedRows {
  std::vector<int8_t> q, kq;
  std::vector<float> d, s, kd;
  std::vector<int16_t> kbs;
  int64_t K = 0, nb = 0;
  int forms = 0;

  // Quantize x (M, K) row-major into `forms` (ACT_Q8_32 | ACT_Q8_K), threads over rows.
  void quantize(const float* x, int64_t M, int64_t K, int forms);
  Act act() const {
    const bool b32 = forms & ACT_Q8_32, bk = forms & ACT_Q8_K;
    return Act{b32 ? q.data() : nullptr, b32 ? d.data() : nullptr, b32 ? s.data() : nullptr, K, nb,
               bk ? kq.data() : nullptr, bk ? kd.data() : nullptr, bk ? kbs.data() : nullptr};
  }
};

// The activation forms (ACT_Q8_32 | ACT_Q8_K) that weights W_0..W_{n-1} read (0: all float).
int act_forms(const QWeight* const* ws, int n);

// y_i (M, N_i) = x @ W_i.T (+ bias_i) for weights W_0..W_{n-1} that share K: one parallel region
// over all their rows, so small matrices (wk, wv) share threads with big ones instead of each waking
// the pool. Quantized weights read `a` (x quantized once), float weights read x itself (float32
// products and sums, the weight converted on the fly). Decode sizes (M < 9) split the rows in guided chunks
// that the threads take from a shared counter; prefill in one static share per thread. Same bits either way.
void matmul_many(const QWeight* const* ws, float* const* ys, int n, const Act& a, const float* x, int64_t M);

// Weight bytes (times 4-row tiles) below which a matmul stays on one thread.
int64_t& min_bytes_per_thread();
// Least weight bytes a thread takes at once from a decode matmul's shared counter (0: a static split).
int64_t& decode_chunk_bytes();

}  // namespace lfq
