// Weight-only quantized matmul for GGUF blocks on x86-64 CPUs with AVX2/FMA/F16C: Python bindings.
//
// Weights come in one of two layouts (the `layout` argument):
//   0 "gguf": GGUF's own bytes, one row of blocks per output feature - every supported type
//             (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K); kernels in qrows.h.
//   1 "x8":   Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K repacked at load time into groups of 8 interleaved rows
//             (qx8.h), 2-4x faster; same bytes per weight (+3% for K-quants). On CPUs with AVX-512
//             VNNI (checked at run time) their tiles use vpdpbusd (qx8_tiles.h); all else is AVX2.
// As in llama.cpp, each activation row is quantized to int8 (qcommon.h): in blocks of 32 for Q4_0 .. Q8_0, whose
// block dot product is an integer one scaled once in float; per 256 columns (Q8_K) for the K-quants, whose
// sub-block scales multiply integer sums, one float scaling per super-block.
// Rows (or row groups) are split across threads with at::parallel_for (torch's OpenMP pool).
// From `gemm_rows` activation rows on (prefill), block weights in GGUF layout are dequantized to float
// tiles and multiplied with at::mm instead; 16-bit weights from 9 rows on run the GEMM of qgemm.h (AVX-512
// or AVX2 tiles over weight panels converted to float32 once per pass, results bit-identical to the decode
// tiles'). BF16 weights multiply bf16-rounded activations, summed as vdpbf16ps does (qgemm.h).
// dequantize* reproduce gguf-py's numpy dequantization bit for bit (the build uses -ffp-contract=off so
// that no multiply-add is fused behind our back).

// Only the torch headers needed (torch/extension.h would triple the compile time). The kernels
// themselves are in qkernels.cpp, a torch-free translation unit that compiles in parallel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/csrc/utils/pybind.h>

#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "qcommon.h"
#include "qkernels.h"
#include "qdecode.h"
#include "qgemm.h"
#include "qops.h"
#include "qx8.h"

namespace lfq {

int64_t& min_bytes_per_thread() {
  static int64_t bytes = int64_t{96} << 10;
  return bytes;
}

// The least weight bytes a thread takes from the shared counter at once in a decode matmul (0: static halves).
// Two threads given fixed halves wait at the end of every matmul for the slower one, and on a shared machine
// one of them is often the slower by a time slice (another process, an interrupt): the fastest 3B decode steps
// read 39-46 GB/s, their medians 27-34. Taken from a counter, the faster thread reads what the other has not
// started. 64 KiB is ~3 us of streaming (the last chunk's wait); the first chunks are larger (guided).
int64_t& decode_chunk_bytes() {
  static int64_t bytes = int64_t{64} << 10;
  return bytes;
}

void check_weight(const at::Tensor& w, int64_t qt, int64_t N, int64_t K, int64_t layout) {
  if (is_float_type(qt)) {
    const at::ScalarType want = qt == T_F32 ? at::kFloat : qt == T_F16 ? at::kHalf : at::kBFloat16;
    const bool as_bytes = w.scalar_type() == at::kByte && w.dim() == 2 && w.size(1) == K * type_info(qt).bytes;
    TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() && w.size(0) == N &&
                    layout == LAYOUT_GGUF && ((w.scalar_type() == want && w.size(1) == K) || as_bytes),
                "llamaforge kernels: a float weight must be a contiguous CPU (", N, ", ", K, ") tensor of ", want,
                " or its bytes, got ", w.scalar_type(), " ", w.sizes());
    return;
  }
  const TypeInfo ti = type_info(qt);
  TORCH_CHECK(ti.block > 0, "llamaforge kernels: unsupported GGML type id ", qt);
  TORCH_CHECK(layout == LAYOUT_GGUF || (layout == LAYOUT_X8 && x8_supported(qt)),
              "llamaforge kernels: layout ", layout, " is not available for GGML type id ", qt);
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "llamaforge kernels: weight must be a contiguous 2-D uint8 CPU tensor");
  TORCH_CHECK(K > 0 && K % ti.block == 0, "llamaforge kernels: in_features ", K, " is not a multiple of ", ti.block);
  const bool ok = layout == LAYOUT_GGUF
                      ? w.size(0) == N && w.size(1) == K / ti.block * ti.bytes
                      : w.size(0) == (N + 7) / 8 && K % x8_format(qt).cols == 0 &&
                            w.size(1) == K / x8_format(qt).cols * x8_format(qt).bytes;
  TORCH_CHECK(ok, "llamaforge kernels: weight bytes ", w.sizes(), " do not match shape (", N, ", ", K,
              ") in layout ", layout);
}

void QuantizedRows::quantize(const float* x, int64_t M, int64_t k, int f) {
  K = k;
  nb = K / 32;
  forms = f;
  if (forms & ACT_Q8_32) {
    q.resize(static_cast<size_t>(M * K));
    d.resize(static_cast<size_t>(M * nb));
    s.resize(static_cast<size_t>(M * nb));
  }
  if (forms & ACT_Q8_K) {
    kq.resize(static_cast<size_t>(M * K));
    kd.resize(static_cast<size_t>(M * (K / 256)));
    kbs.resize(static_cast<size_t>(M * (K / 16)));
  }
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / K), [&](int64_t m0, int64_t m1) {
    if (forms & ACT_Q8_32)
      quantize_rows(x + m0 * K, m1 - m0, K, q.data() + m0 * K, d.data() + m0 * nb, s.data() + m0 * nb);
    if (forms & ACT_Q8_K)
      quantize_rows_q8k(x + m0 * K, m1 - m0, K, kq.data() + m0 * K, kd.data() + m0 * (K / 256),
                        kbs.data() + m0 * (K / 16));
  });
}

int act_forms(const QWeight* const* ws, int n) {
  int f = 0;
  for (int i = 0; i < n; ++i) f |= act_form(ws[i]->qt);
  return f;
}

namespace {

// 8 weights from a float/half/bfloat16 row, as float32.
template <int64_t QT>
inline __m256 load8(const void* w, int64_t k) {
  if constexpr (QT == T_F32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + k);
  } else if constexpr (QT == T_F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + k)));
  } else {  // bfloat16: the high half of a float32
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// How far ahead (bytes of the weight stream) the float tiles prefetch into L2 (0: not at all): with 4 KiB
// pages (a mapped file, or anonymous memory without MADV_HUGEPAGE) the hardware prefetcher stops at every
// page boundary, and a tile with several FMA chains per weight load keeps too few misses in flight by itself
// (the reorder buffer holds fewer loads): a float32 row at M = 4 streamed at 8 GB/s from DRAM without it, 20
// GB/s with it (1 thread, 576 x 1536 rows), as fast as M = 1. Distances of 1-4 KiB gained less; prefetching
// into L1 (T0) nothing. A knob (`float_prefetch`) so that benchmarks can show it on and off.
int64_t& float_prefetch_bytes() {
  static int64_t bytes = 8192;
  return bytes;
}

// The end of a float tile: each accumulator's 8 lanes summed (hsum), then columns [kv, K) one by one.
template <int64_t QT, int NR, int MR, typename elem>
inline void finish_tile(__m256 (&acc)[NR][MR], const elem* const* rows, int64_t kv, int64_t K, const float* x,
                        int64_t m0, float* y, int64_t n, int64_t N) {
  for (int r = 0; r < NR; ++r) {
    for (int i = 0; i < MR; ++i) {
      float s = hsum(acc[r][i]);
      for (int64_t k = kv; k < K; ++k) {
        float wk;
        if constexpr (QT == T_F32) wk = rows[r][k];
        else if constexpr (QT == T_F16) wk = _cvtsh_ss(rows[r][k]);
        else { const uint32_t b = static_cast<uint32_t>(rows[r][k]) << 16; std::memcpy(&wk, &b, 4); }
        s += wk * x[(m0 + i) * K + k];
      }
      y[(m0 + i) * N + n + r] = s;
    }
  }
}

// NR weight rows x MR activation rows of a plain float weight: y[m][n + r] for r < NR, i < MR (m = m0 + i).
// Each (row, activation) pair has its own accumulator, summed lane-wise in k order, so the result of
// a pair does not depend on NR, MR or the other rows (batch invariance); the NR x MR independent
// FMA chains are what keep the FMA units busy (one chain waits on the FMA latency). PF: prefetch the weight
// rows' bytes `ahead` further on into L2, once per 64-byte line (the first tile over these rows: later
// ones at m0 > 0 find them in cache). `ahead` is a whole number of NR-row tiles, so the line prefetched is
// the one the same row of a later tile reads at this k. BF16: x split, under a Bf16Mode (qgemm.h), each
// 16-column step's odd then even products: vdpbf16ps's sums, emulated.
template <int64_t QT, int NR, int MR, bool PF>
inline void float_tile(const void* w, int64_t n, int64_t K, const float* x, int64_t m0, float* y, int64_t N) {
  using elem = std::conditional_t<QT == T_F32, float, uint16_t>;
  constexpr int64_t line = 64 / sizeof(elem);  // elements per cache line
  const int64_t k8 = QT == T_BF16 ? K / 16 * 16 : K / 8 * 8;  // the columns taken by vectors
  const elem* rows[NR];
  for (int r = 0; r < NR; ++r) rows[r] = static_cast<const elem*>(w) + (n + r) * K;
  const int64_t tile = NR * K;  // elements a tile reads
  const int64_t ahead = (float_prefetch_bytes() / static_cast<int64_t>(sizeof(elem)) + tile - 1) / tile * tile;
  __m256 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k8; k += QT == T_BF16 ? 16 : 8) {
    // One chain on a float32 row (M = 1) keeps enough misses in flight itself: prefetching there cost 5-20%.
    if constexpr (PF && !(QT == T_F32 && NR * MR == 1)) {
      if (k % line == 0 && ahead > 0)  // the address may lie past the weight: a prefetch never faults
        for (int r = 0; r < NR; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(rows[r] + k) + ahead * sizeof(elem)),
                       _MM_HINT_T2);
    }
    if constexpr (QT == T_BF16) {  // 16 columns: the odd ones' products, then the even ones'
      for (int half = 0; half < 2; ++half) {  // the activations of a half in registers, as below
        __m256 xv[MR];
        for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + (m0 + i) * K + k + 8 * half);
        for (int r = 0; r < NR; ++r) {
          const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + k));
          const __m256 wv = _mm256_castsi256_ps(half == 0 ? _mm256_and_si256(d, _mm256_set1_epi32(-65536))
                                                          : _mm256_slli_epi32(d, 16));
          for (int i = 0; i < MR; ++i) acc[r][i] = _mm256_fmadd_ps(wv, xv[i], acc[r][i]);
        }
      }
    } else {
      __m256 xv[MR];
      for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + (m0 + i) * K + k);
      for (int r = 0; r < NR; ++r) {
        const __m256 wv = load8<QT>(rows[r], k);
        for (int i = 0; i < MR; ++i) acc[r][i] = _mm256_fmadd_ps(wv, xv[i], acc[r][i]);
      }
    }
  }
  finish_tile<QT, NR, MR>(acc, rows, k8, K, x, m0, y, n, N);
}

// Activation rows [0, M) against NR weight rows from n in tiles of NR x MR (MR = 8 for a single row, 4, then
// 3, 2 or 1 at the end); only the first tile prefetches (the others read the rows from cache).
template <int64_t QT, int NR>
inline void float_rows(const void* w, int64_t n, int64_t K, const float* x, int64_t M, float* y, int64_t N) {
  int64_t m = 0;
  auto tile = [&](auto mr) {
    constexpr int MR = decltype(mr)::value;
    if (m == 0) float_tile<QT, NR, MR, true>(w, n, K, x, m, y, N);
    else float_tile<QT, NR, MR, false>(w, n, K, x, m, y, N);
    m += MR;
  };
  if constexpr (NR == 1)
    while (m + 8 <= M) tile(std::integral_constant<int, 8>{});
  while (m + 4 <= M) tile(std::integral_constant<int, 4>{});
  switch (M - m) {
    case 3: tile(std::integral_constant<int, 3>{}); break;
    case 2: tile(std::integral_constant<int, 2>{}); break;
    case 1: tile(std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// y[:, n0:n1] = x (M, K) @ W[n0:n1].T for a plain float weight, M <= 8 (decode) for 16-bit weights, any M for
// float32. Where the bytes bound the time: 16-bit rows take 2 weight rows x 1 at M = 1 (two streams, each row
// read front to back: one Zen 4 thread's 1B decode step 13% faster for F16, 9% for BF16 than with 8 rows, whose
// 8 streams a row apart the hardware prefetcher follows worse; 3 rows in between; 2 threads F16 5% faster, BF16
// the same; benchmarks/f16_layout.cpp, RESULTS.md "Ninth session") and 4 x 2 at M = 2-3; float32 rows up to
// M = 7 single rows x up to 4 activation rows, read as one sequential stream: interleaving several float32 rows
// lost a third of the bandwidth here (1 thread, 135M/360M/1B row lengths, M = 1: 21-28 GB/s single vs 14-23 GB/s
// with 8 rows, 10-16 with 2-4; M = 2 and 4 alike, before the prefetch), which made the float32 decode step of the
// default model 50% slower. Where the FMAs bound it (16-bit from M = 4, float32 from M = 8): 3 rows x 4
// activation rows (12 chains, 7 loads per 12 FMAs), in a microbenchmark 1.2-1.5x the rate of float32 1 x 8 (M = 8
// and 16, 576- and 1536-wide rows) and of F16 4 x 2 (M = 4, 2048- and 8192-wide rows). Single rows (1 x 8, 1 x 4,
// ...) at the end.
template <int64_t QT>
void matmul_float(const void* w, int64_t n0, int64_t n1, int64_t K, const float* x, int64_t M, float* y, int64_t N) {
  int64_t n = n0;
  if (M >= (QT == T_F32 ? 8 : 4)) {
    for (; n + 3 <= n1; n += 3) float_rows<QT, 3>(w, n, K, x, M, y, N);
  } else if constexpr (QT != T_F32) {
    if (M == 1) {
      for (; n + 2 <= n1; n += 2) float_tile<QT, 2, 1, true>(w, n, K, x, 0, y, N);
    } else {
      for (; n + 4 <= n1; n += 4) {
        float_tile<QT, 4, 2, true>(w, n, K, x, 0, y, N);
        if (M == 3) float_tile<QT, 4, 1, false>(w, n, K, x, 2, y, N);
      }
    }
  }
  for (; n < n1; ++n) float_rows<QT, 1>(w, n, K, x, M, y, N);
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bf16")
// The BF16 decode tiles on CPUs with AVX512_BF16: float_tile's tiles, prefetch and finish, each 16-column
// step one vdpbf16ps per (weight row, activation row) pair instead of its emulation (the same bits). xb: the
// activations as bf16 (M, K) (bf16_rows), xs: split (the tail columns are read from it).
template <int NR, int MR, bool PF>
inline void dot_tile(const uint16_t* w, int64_t n, int64_t K, const uint16_t* xb, const float* xs, int64_t m0,
                     float* y, int64_t N) {
  constexpr int64_t line = 32;  // bf16 per cache line
  const int64_t k16 = K / 16 * 16;
  const uint16_t* rows[NR];
  for (int r = 0; r < NR; ++r) rows[r] = w + (n + r) * K;
  const int64_t tile = NR * K;
  const int64_t ahead = (float_prefetch_bytes() / 2 + tile - 1) / tile * tile;
  __m256 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k16; k += 16) {
    if constexpr (PF) {
      if (k % line == 0 && ahead > 0)
        for (int r = 0; r < NR; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(rows[r] + k) + ahead * 2), _MM_HINT_T2);
    }
    __m256i xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + (m0 + i) * K + k));
    for (int r = 0; r < NR; ++r) {
      const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + k));
      for (int i = 0; i < MR; ++i) acc[r][i] = _mm256_dpbf16_ps(acc[r][i], (__m256bh)d, (__m256bh)xv[i]);
    }
  }
  finish_tile<T_BF16, NR, MR>(acc, rows, k16, K, xs, m0, y, n, N);
}

template <int NR>
inline void dot_rows(const uint16_t* w, int64_t n, int64_t K, const uint16_t* xb, const float* xs, int64_t M,
                     float* y, int64_t N) {
  int64_t m = 0;
  auto tile = [&](auto mr) {
    constexpr int MR = decltype(mr)::value;
    if (m == 0) dot_tile<NR, MR, true>(w, n, K, xb, xs, m, y, N);
    else dot_tile<NR, MR, false>(w, n, K, xb, xs, m, y, N);
    m += MR;
  };
  if constexpr (NR == 1)
    while (m + 8 <= M) tile(std::integral_constant<int, 8>{});
  while (m + 4 <= M) tile(std::integral_constant<int, 4>{});
  switch (M - m) {
    case 3: tile(std::integral_constant<int, 3>{}); break;
    case 2: tile(std::integral_constant<int, 2>{}); break;
    case 1: tile(std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// matmul_float<T_BF16> with vdpbf16ps, the same tiles.
void matmul_bf16_dot(const uint16_t* w, int64_t n0, int64_t n1, int64_t K, const uint16_t* xb, const float* xs,
                     int64_t M, float* y, int64_t N) {
  int64_t n = n0;
  if (M >= 4) {
    for (; n + 3 <= n1; n += 3) dot_rows<3>(w, n, K, xb, xs, M, y, N);
  } else {
    if (M == 1) {
      for (; n + 2 <= n1; n += 2) dot_tile<2, 1, true>(w, n, K, xb, xs, 0, y, N);
    } else {
      for (; n + 4 <= n1; n += 4) {
        dot_tile<4, 2, true>(w, n, K, xb, xs, 0, y, N);
        if (M == 3) dot_tile<4, 1, false>(w, n, K, xb, xs, 2, y, N);
      }
    }
  }
  for (; n < n1; ++n) dot_rows<1>(w, n, K, xb, xs, M, y, N);
}
#pragma GCC pop_options

// From this many activation rows on (prefill), a 16-bit weight runs the GEMM of qgemm.h (same bits as
// matmul_float's). BF16 with vdpbf16ps too: at 2-8 rows its panel copies cost more than its faster
// products save (1 thread, 16384 x 2048: M = 4 6.7 ms against 5.9 ms in the decode tiles, M = 6 7.8 / 6.4).
constexpr int64_t FLOAT_GEMM_ROWS = 9;

// A BF16 weight's rows [n0, n1) against split bf16 activations xs (qgemm.h) and, where the decode tiles
// use vdpbf16ps, the same as plain bf16 xb (else null); under DAZ / FTZ as vdpbf16ps computes (not
// inlined: no float operation may move across the MXCSR writes).
__attribute__((noinline)) void matmul_bf16(const void* w, int64_t n0, int64_t n1, int64_t K, const float* xs,
                                           const uint16_t* xb, int64_t M, float* y, int64_t N) {
  const Bf16Mode mode;
  if (M >= FLOAT_GEMM_ROWS) gemm_float(T_BF16, w, n0, n1, K, xs, M, y, N);
  else if (xb != nullptr) matmul_bf16_dot(static_cast<const uint16_t*>(w), n0, n1, K, xb, xs, M, y, N);
  else matmul_float<T_BF16>(w, n0, n1, K, xs, M, y, N);
}

}  // namespace

void matmul_many(const QWeight* const* ws, float* const* ys, int n, const Act& a, const float* x, int64_t M) {
  // Units of work: groups of 8 rows (x8) or single rows (gguf), numbered across all the weights.
  std::vector<int64_t> first(static_cast<size_t>(n) + 1, 0);
  int64_t bytes = 0;
  for (int i = 0; i < n; ++i) {
    const QWeight& q = *ws[i];
    first[i + 1] = first[i] + (q.layout == LAYOUT_X8 ? (q.N + 7) / 8 : q.N);
    bytes += q.w.numel() * q.w.element_size();
  }
  const int64_t units = first[n];
  if (M == 0 || units == 0) return;
  // Give each thread at least min_bytes_per_thread() of weight bytes times row tiles: waking a
  // sleeping worker costs more than a smaller share of the work saves.
  const int64_t work = std::max<int64_t>(1, bytes / units * ((M + 3) / 4));
  const int64_t grain = std::max<int64_t>(1, min_bytes_per_thread() / work);
  const bool vnni = vnni_enabled();
  // BF16 weights read the activations rounded to bf16 and split (qgemm.h), made once for all of them, and
  // the decode tiles with vdpbf16ps the same as plain bf16.
  thread_local std::vector<float> split;
  thread_local std::vector<uint16_t> plain;
  const float* xs = nullptr;
  const uint16_t* xb = nullptr;
  for (int i = 0; i < n && xs == nullptr; ++i)
    if (ws[i]->qt == T_BF16) {
      const int64_t K = ws[i]->K;
      split.resize(static_cast<size_t>(M * K));
      bf16_split_rows(x, M, K, split.data());
      xs = split.data();
      if (M < FLOAT_GEMM_ROWS && gemm_avx512_enabled() && gemm_bf16dot_enabled()) {
        plain.resize(static_cast<size_t>(M * K));
        bf16_rows(xs, M, K, plain.data());
        xb = plain.data();
      }
    }
  auto rows = [&](int64_t u0, int64_t u1) {
    for (int i = 0; i < n; ++i) {
      const int64_t lo = std::max(u0, first[i]) - first[i], hi = std::min(u1, first[i + 1]) - first[i];
      if (lo >= hi) continue;
      const QWeight& q = *ws[i];
      if (q.qt == T_F32) {
        matmul_float<T_F32>(q.w.data_ptr(), lo, hi, q.K, x, M, ys[i], q.N);
        continue;
      } else if (q.qt == T_F16) {
        if (M >= FLOAT_GEMM_ROWS) gemm_float(T_F16, q.w.data_ptr(), lo, hi, q.K, x, M, ys[i], q.N);
        else matmul_float<T_F16>(q.w.data_ptr(), lo, hi, q.K, x, M, ys[i], q.N);
        continue;
      } else if (q.qt == T_BF16) {
        matmul_bf16(q.w.data_ptr(), lo, hi, q.K, xs, xb, M, ys[i], q.N);
        continue;
      }
      const uint8_t* wp = q.w.data_ptr<uint8_t>();
      if (q.layout != LAYOUT_X8)
        matmul_gguf(q.qt, wp, q.w.size(1), lo, hi, q.K, a, M, ys[i], q.N);
      else if (vnni)
        matmul_x8_vnni(q.qt, wp, lo, hi, q.N, q.K, a, M, ys[i]);
      else
        matmul_x8_avx2(q.qt, wp, lo, hi, q.N, q.K, a, M, ys[i]);
    }
  };
  // Decode (M < FLOAT_GEMM_ROWS): guided chunks from a shared counter (decode_chunk_bytes); each output row
  // is computed by the same code whichever thread takes it, so the split changes no bit. Prefill keeps the
  // static split (its tiles pair row groups; it is bound by compute, not by a late thread).
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (units + grain - 1) / grain);
  if (M >= FLOAT_GEMM_ROWS || decode_chunk_bytes() == 0 || threads < 2 || at::in_parallel_region()) {
    at::parallel_for(0, units, grain, rows);
  } else {
    bool single = false;  // single-row units (GGUF layout, float weights): chunks of whole 8-row tiles
    for (int i = 0; i < n; ++i) single = single || ws[i]->layout != LAYOUT_X8;
    const int64_t align = single ? 8 : 1;
    const int64_t least = (std::max<int64_t>(1, decode_chunk_bytes() / std::max<int64_t>(1, bytes / units)) +
                           align - 1) / align * align;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {  // one task per thread, each pulling chunks
      int64_t u0 = next.load(std::memory_order_relaxed), u1 = 0;
      for (;;) {
        do {  // take 1 / (2 * threads) of what is left, at least `least` units
          if (u0 >= units) return;
          const int64_t take = (std::max(least, (units - u0) / (2 * threads)) + align - 1) / align * align;
          u1 = std::min(units, u0 + take);
        } while (!next.compare_exchange_weak(u0, u1, std::memory_order_relaxed));
        rows(u0, u1);
        u0 = next.load(std::memory_order_relaxed);
      }
    });
  }
  for (int i = 0; i < n; ++i) {
    const QWeight& q = *ws[i];
    if (!q.bias.defined()) continue;
    const float* b = q.bias.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < q.N; ++j) ys[i][m * q.N + j] += b[j];
  }
}

}  // namespace lfq

namespace {
using namespace lfq;
}  // namespace

// y = x @ dequantize(w).T (+ bias). x: (..., K) float tensor; returns (..., N) in x's dtype.
at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, int64_t qt, int64_t N, int64_t K,
                   const std::optional<at::Tensor>& bias, int64_t gemm_rows, int64_t layout) {
  check_weight(w, qt, N, K, layout);
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.size(-1) == K,
              "llamaforge kernels: input must be a CPU tensor with last dimension ", K, ", got ", x.sizes());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.numel() / K;
  std::vector<int64_t> oshape(x.sizes().begin(), x.sizes().end());
  oshape.back() = N;
  at::Tensor y = at::empty(oshape, xf.options());
  const int64_t bpr = w.size(1) * w.element_size();  // bytes per row
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  if (M == 0 || N == 0) {
  } else if (gemm_rows > 0 && M >= gemm_rows && !is_float_type(qt)) {  // 16-bit weights: gemm_float
    // Dequantize tiles of weight rows (a float tile stays in L2) and let the BLAS do the GEMM.
    const int64_t tile = std::max<int64_t>(16, std::min<int64_t>(N, (int64_t{1} << 19) / K) / 8 * 8);
    at::Tensor wt = at::empty({tile, K}, xf.options());
    const at::Tensor x2 = xf.view({M, K});
    at::Tensor y2 = y.view({M, N});
    float* wtp = wt.data_ptr<float>();
    for (int64_t t0 = 0; t0 < N; t0 += tile) {
      const int64_t nt = std::min(tile, N - t0);
      at::parallel_for(0, nt, 8, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) dequant_any(layout, qt, wp, bpr, t0 + r, K, wtp + r * K);
      });
      at::Tensor ys = y2.narrow(1, t0, nt);
      at::mm_out(ys, x2, wt.narrow(0, 0, nt).t());
    }
  } else {
    QuantizedRows rows;  // float weights read x itself
    if (!is_float_type(qt)) rows.quantize(xf.data_ptr<float>(), M, K, act_form(qt));
    const QWeight q{w, qt, N, K, layout, at::Tensor()};
    const QWeight* ws[1] = {&q};
    // A long prompt in passes of QLINEAR_ROWS rows: every group of weight rows reads the pass's activations
    // (QLINEAR_ROWS x K bytes, which stay in L2/L3) instead of all M rows from memory. Rows are independent.
    constexpr int64_t QLINEAR_ROWS = 256;
    const Act all = rows.act();
    for (int64_t m = 0; m < M; m += QLINEAR_ROWS) {
      const Act a = all.from_row(m);
      float* ys[1] = {yp + m * N};
      matmul_many(ws, ys, 1, a, xf.data_ptr<float>() + m * K, std::min(QLINEAR_ROWS, M - m));
    }
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// x (M, K) float32, K a multiple of 256, in the Q8_K form the K-quant kernels read (qcommon.h): int8 q (M, K),
// float32 d (M, K / 256), int16 bsums (M, K / 16). For tests against ggml's quantize_row_q8_K.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_q8k(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) % 256 == 0,
              "llamaforge kernels: quantize_q8k takes a (M, K) CPU tensor with K a multiple of 256, got ", x.sizes());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1);
  at::Tensor q = at::empty({M, K}, at::kChar), d = at::empty({M, K / 256}, at::kFloat);
  at::Tensor bs = at::empty({M, K / 16}, at::kShort);
  quantize_rows_q8k(xf.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), d.data_ptr<float>(), bs.data_ptr<int16_t>());
  return {q, d, bs};
}

// All rows of w dequantized to float32: (N, K).
at::Tensor dequantize(const at::Tensor& w, int64_t qt, int64_t N, int64_t K, int64_t layout) {
  check_weight(w, qt, N, K, layout);
  at::Tensor out = at::empty({N, K}, at::kFloat);
  const int64_t bpr = w.size(1) * w.element_size();  // bytes per row
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) dequant_any(layout, qt, wp, bpr, r, K, op + r * K);
  });
  return out;
}

// Rows idx (any shape, integer) of w dequantized: idx.shape + (K,). The embedding lookup.
at::Tensor dequantize_rows(const at::Tensor& w, const at::Tensor& idx, int64_t qt, int64_t N, int64_t K,
                           int64_t layout) {
  check_weight(w, qt, N, K, layout);
  const at::Tensor ix = idx.to(at::kLong).contiguous();
  std::vector<int64_t> oshape(ix.sizes().begin(), ix.sizes().end());
  oshape.push_back(K);
  at::Tensor out = at::empty(oshape, at::kFloat);
  const int64_t R = ix.numel(), bpr = w.size(1) * w.element_size();
  const int64_t* ip = ix.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK_INDEX(ip[r] >= 0 && ip[r] < N, "index ", ip[r], " is out of range for an embedding of ", N, " rows");
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) dequant_any(layout, qt, wp, bpr, ip[r], K, op + r * K);
  });
  return out;
}

// An uninitialised (rows, cols) uint8 tensor for weights the kernels stream, in 2 MiB-aligned anonymous
// memory marked MADV_HUGEPAGE (with transparent huge pages in "madvise" mode, the default of many
// distributions, at::empty's memory gets 4 KiB pages): the decode GEMV streams from huge pages 20-40%
// faster on one core (one TLB entry per 2 MiB, and the hardware prefetcher is not stopped at every 4 KiB
// page boundary). at::empty for small tensors or where mmap fails; the kernel may still give 4 KiB pages.
at::Tensor empty_streamed(int64_t rows, int64_t cols) {
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t n = static_cast<size_t>(rows * cols);
  if (n < kHuge) return at::empty({rows, cols}, at::kByte);
  // Only the start is 2 MiB-aligned: the mapping ends at the next 4 KiB page, so the last partial 2 MiB
  // takes 4 KiB pages instead of a whole huge page (up to 2 MiB more resident memory per weight).
  const size_t len = (n + 4095) / 4096 * 4096;
  void* got = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (got == MAP_FAILED) return at::empty({rows, cols}, at::kByte);
  const uintptr_t base = reinterpret_cast<uintptr_t>(got), start = (base + kHuge - 1) & ~(kHuge - 1);
  if (start > base) munmap(got, start - base);  // keep only the aligned len bytes
  if (base + len + kHuge > start + len) munmap(reinterpret_cast<void*>(start + len), base + len + kHuge - start - len);
  void* p = reinterpret_cast<void*>(start);
  madvise(p, len, MADV_HUGEPAGE);
  return at::from_blob(p, {rows, cols}, [len](void* q) { munmap(q, len); }, at::TensorOptions().dtype(at::kByte));
}

// The bytes of one group of 8 rows of an (N, K) weight in the x8 layout, once `raw` is checked to be its GGUF
// bytes and its type one with an x8 layout.
static int64_t checked_x8_group_bytes(const at::Tensor& raw, int64_t qt, int64_t N, int64_t K) {
  check_weight(raw, qt, N, K, LAYOUT_GGUF);
  TORCH_CHECK(x8_supported(qt), "llamaforge kernels: no x8 layout for GGML type id ", qt);
  return K / x8_format(qt).cols * x8_format(qt).bytes;
}

// Checked GGUF bytes (N, bytes_per_row) -> the x8 layout, ceil(N / 8) groups of `gbytes`, at `op`.
static void repack_x8_groups(const at::Tensor& raw, int64_t qt, int64_t N, int64_t K, int64_t gbytes, uint8_t* op) {
  const int64_t bpr = raw.size(1);
  const uint8_t* rp = raw.data_ptr<uint8_t>();
  at::parallel_for(0, (N + 7) / 8, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      repack_x8_group(qt, rp + g * 8 * bpr, bpr, std::min<int64_t>(8, N - g * 8), K, op + g * gbytes);
  });
}

// GGUF bytes (N, bytes_per_row) -> the x8 layout (ceil(N / 8), K / columns * super-block bytes), written into
// `out`: uint8, contiguous, exactly that many bytes (e.g. a view of the x8 cache file's writable mapping, so
// the repacked bytes go straight into the file's pages: no copy of the weights, no second lot of fresh memory).
void repack_x8_into(const at::Tensor& raw, int64_t qt, int64_t N, int64_t K, const at::Tensor& out) {
  const int64_t gbytes = checked_x8_group_bytes(raw, qt, N, K), G = (N + 7) / 8;
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kByte && out.is_contiguous() && out.numel() == G * gbytes,
              "repack_x8_into: out must be a contiguous CPU uint8 tensor of ", G * gbytes, " bytes, got ",
              out.numel(), " bytes of ", out.scalar_type());
  repack_x8_groups(raw, qt, N, K, gbytes, out.data_ptr<uint8_t>());
}

// The same into fresh 2 MiB-aligned memory marked for huge pages (empty_streamed).
at::Tensor repack_x8(const at::Tensor& raw, int64_t qt, int64_t N, int64_t K) {
  const int64_t gbytes = checked_x8_group_bytes(raw, qt, N, K);
  at::Tensor out = empty_streamed((N + 7) / 8, gbytes);
  repack_x8_groups(raw, qt, N, K, gbytes, out.data_ptr<uint8_t>());
  return out;
}

namespace py = pybind11;

// A run-time knob as a Python function: returns its value; `n` sets it (to no less than `least`).
static void def_knob(py::module_& m, const char* name, int64_t& (*knob)(), int64_t least, const char* doc) {
  m.def(
      name,
      [knob, least](std::optional<int64_t> n) {
        const int64_t was = knob();
        if (n.has_value()) knob() = std::max<int64_t>(least, *n);
        return was;
      },
      doc, py::arg("n") = py::none());
}

// A switch between tiles as a Python function: returns whether it was on; `on` switches it off, or back on
// where `supported()`.
static void def_switch(py::module_& m, const char* name, bool& (*flag)(), bool (*supported)(), const char* doc) {
  m.def(
      name,
      [flag, supported](std::optional<bool> on) {
        const bool was = flag();
        if (on.has_value()) flag() = *on && supported();
        return was;
      },
      doc, py::arg("on") = py::none());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llamaforge GGUF weight-only quantized matmul kernels (AVX2/FMA/F16C)";
  // The GIL is released while the kernels run, as torch's own ops do (other Python threads go on).
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("qlinear", &qlinear, "y = x @ dequantize(w).T + bias", py::arg("x"), py::arg("w"), py::arg("qt"),
        py::arg("N"), py::arg("K"), py::arg("bias") = py::none(), py::arg("gemm_rows") = 0, py::arg("layout") = 0,
        release());
  m.def("dequantize", &dequantize, "dequantize all rows (exact)", py::arg("w"), py::arg("qt"), py::arg("N"),
        py::arg("K"), py::arg("layout") = 0, release());
  m.def("dequantize_rows", &dequantize_rows, "dequantize selected rows (exact)", py::arg("w"), py::arg("idx"),
        py::arg("qt"), py::arg("N"), py::arg("K"), py::arg("layout") = 0, release());
  m.def("repack_x8", &repack_x8, "GGUF bytes -> x8 layout", py::arg("raw"), py::arg("qt"), py::arg("N"),
        py::arg("K"), release());
  m.def("repack_x8_into", &repack_x8_into, "GGUF bytes -> x8 layout, written into `out` (uint8, contiguous, "
        "exactly the x8 size)", py::arg("raw"), py::arg("qt"), py::arg("N"), py::arg("K"), py::arg("out"), release());
  m.def("quantize_q8k", &quantize_q8k, "activations (M, K) -> Q8_K (q, d, bsums) as the K-quant kernels read them",
        py::arg("x"), release());
  m.def("x8_supported", &x8_supported, "whether a GGML type id has the x8 layout");
  def_knob(m, "min_bytes_per_thread", &min_bytes_per_thread, 1,
           "weight bytes (times 4-row tiles) below which a matmul stays on one thread; `n` sets it");
  def_knob(m, "decode_chunk_bytes", &decode_chunk_bytes, 0,
           "least weight bytes a thread takes at once in a decode matmul (0: static halves); `n` sets it");
  def_knob(m, "float_prefetch", &float_prefetch_bytes, 0,
           "bytes ahead that the float-weight tiles prefetch their rows into L2 (0: off); `n` sets it");
  def_knob(m, "x8_prefetch", &x8_prefetch_bytes, 0,
           "bytes ahead that the x8 tiles prefetch their weight stream at decode sizes (0: off; default 1024 on Intel, "
           "0 elsewhere); `n` sets it");
  def_switch(m, "use_vnni", &vnni_enabled, &vnni_supported,
             "whether the AVX-512 VNNI tiles are used; `on` switches them off (or back on where supported)");
  def_switch(m, "use_avx512_gemm", &gemm_avx512_enabled, &gemm_avx512_supported,
             "whether the 16-bit prefill GEMM uses its AVX-512 tiles; `on` switches them off (or back on where supported)");
  m.def("bf16dot_supported", &gemm_bf16dot_supported,
        "whether the CPU has AVX512_BF16: BF16 weights then run with vdpbf16ps (else the tiles' exact emulation of it)");
  def_switch(m, "use_bf16dot_gemm", &gemm_bf16dot_prefill, &gemm_bf16dot_supported,
             "whether the prefill GEMM uses vdpbf16ps where use_bf16dot is on (default: not on Intel CPUs, where its "
             "exact FMA emulation ran faster); `on` switches it");
  def_switch(m, "use_bf16dot", &gemm_bf16dot_enabled, &gemm_bf16dot_supported,
             "whether BF16 weights use vdpbf16ps (with the AVX-512 tiles); `on` switches it off (the FMA emulation, as "
             "on AVX-512 CPUs without AVX512_BF16) or back on where supported");

  m.def("kv_store", &kv_store, "rows (n, head_dim) as a KV cache of like's dtype stores them (qkv.h)", py::arg("x"),
        py::arg("like"), release());
  m.def("kv_attend", &kv_attend, "the fused step's attention of one KV head's queries (qattn.h)", py::arg("q"),
        py::arg("k"), py::arg("v"), release());
  m.def("kv_attend_rows", &kv_attend_rows, "the attention of several rows of one sequence at once (qattn_rows.h)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("n"), release());
  m.def("kv_attend_blocks", &kv_attend_blocks,
        "a prompt chunk's attention over a paged KV cache's blocks, read in place (qattn_rows.h per row and KV head)",
        py::arg("q"), py::arg("k_layer"), py::arg("v_layer"), py::arg("tables"), py::arg("n"), release());
  m.def("kv_scores", &kv_scores, "its scores q k^T / sqrt(head_dim)", py::arg("q"), py::arg("k"), release());
  // The fused decode step (qdecode.h). A weight is (tensor, qt, N, K, layout, bias or None): GGUF bytes,
  // or a float (N, K) tensor with qt 0 (F32), 1 (F16), 30 (BF16); a layer is
  // (attention_norm, ffn_norm, [wq, wk, wv, wo, w1, w2, w3], q_norm or None, k_norm or None).
  using WeightSpec = std::tuple<at::Tensor, int64_t, int64_t, int64_t, int64_t, std::optional<at::Tensor>>;
  using LayerSpec = std::tuple<at::Tensor, at::Tensor, std::vector<WeightSpec>, std::optional<at::Tensor>,
                               std::optional<at::Tensor>>;
  py::class_<Decoder>(m, "Decoder")
      .def(py::init([](const std::vector<LayerSpec>& specs, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                       double norm_eps, at::Tensor cos, at::Tensor sin, at::Tensor norm, const WeightSpec& output) {
             auto weight = [](const WeightSpec& spec) {
               const auto& [w, qt, N, K, layout, bias] = spec;
               return QWeight{w, qt, N, K, layout, bias.has_value() ? *bias : at::Tensor()};
             };
             std::vector<DecoderLayer> layers;
             for (const auto& [attention_norm, ffn_norm, weights, q_norm, k_norm] : specs) {
               TORCH_CHECK(weights.size() == 7, "decoder: a layer has 7 weights (wq wk wv wo w1 w2 w3)");
               std::vector<QWeight> q;
               for (const WeightSpec& spec : weights) q.push_back(weight(spec));
               layers.push_back(DecoderLayer{attention_norm, ffn_norm, q[0], q[1], q[2], q[3], q[4], q[5], q[6],
                                             q_norm.value_or(at::Tensor()), k_norm.value_or(at::Tensor())});
             }
             return Decoder(std::move(layers), n_heads, n_kv_heads, head_dim, norm_eps, std::move(cos),
                            std::move(sin), std::move(norm), weight(output));
           }),
           py::arg("layers"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("norm_eps"),
           py::arg("cos"), py::arg("sin"), py::arg("norm"), py::arg("output"))
      .def(
          "step",
          [](const Decoder& d, const at::Tensor& x, const at::Tensor& pos, const at::Tensor& blocks, at::Tensor& kc,
             at::Tensor& vc, int64_t kv_len, const std::vector<std::shared_ptr<LoraAdapter>>& adapters,
             const std::optional<at::Tensor>& row_adapter) {
            return d.step(x, pos, blocks, kc, vc, kv_len, adapters, row_adapter.value_or(at::Tensor()));
          },
          "logits for one new token per row (see qdecode.h)", py::arg("x"), py::arg("pos"), py::arg("blocks"),
          py::arg("k_cache"), py::arg("v_cache"), py::arg("kv_len"),
          py::arg("adapters") = std::vector<std::shared_ptr<LoraAdapter>>(), py::arg("row_adapter") = py::none(),
          release());

  // A LoRA adapter (qlora.h): per layer, 7 entries (wq wk wv wo w1 w2 w3), each (A float32 (r, in),
  // B (out, r)), float32, bfloat16 or float16, or None; scale multiplies B A x. Holds A and a transposed copy of B.
  using PairSpec = std::optional<std::tuple<at::Tensor, at::Tensor>>;
  py::class_<LoraAdapter, std::shared_ptr<LoraAdapter>>(m, "LoraAdapter")
      .def(py::init([](const std::vector<std::vector<PairSpec>>& layers, double scale) {
             auto ad = std::make_shared<LoraAdapter>();
             ad->scale = static_cast<float>(scale);
             for (const auto& specs : layers) {
               TORCH_CHECK(specs.size() == LORA_PROJECTIONS, "LoraAdapter: a layer has 7 entries (wq wk wv wo w1 w2 w3)");
               std::array<LoraPair, LORA_PROJECTIONS> pairs;
               for (int p = 0; p < LORA_PROJECTIONS; ++p) {
                 if (!specs[p].has_value()) continue;
                 const auto& [a, b] = *specs[p];
                 const auto type = a.scalar_type();
                 TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && b.scalar_type() == type &&
                                 (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf) &&
                                 a.is_contiguous() && b.is_contiguous() && a.dim() == 2 && b.dim() == 2 &&
                                 a.size(0) > 0 && b.size(1) == a.size(0),
                             "LoraAdapter: A (r, in) and B (out, r) must be contiguous CPU tensors of one dtype "
                             "(float32, bfloat16, float16), got ", a.sizes(), " and ", b.sizes());
                 pairs[p] = LoraPair{a, b.t().contiguous()};
               }
               ad->layers.push_back(std::move(pairs));
             }
             return ad;
           }),
           py::arg("layers"), py::arg("scale"));
  m.def(
      "lora_add_",
      [](at::Tensor& y, const at::Tensor& x, const std::vector<std::shared_ptr<LoraAdapter>>& adapters,
         const at::Tensor& row_adapter, int64_t layer, int64_t proj) {
        TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && y.is_contiguous() &&
                        x.is_contiguous() && y.device().is_cpu() && x.device().is_cpu() && x.dim() == 3 &&
                        y.dim() == 3 && x.size(0) == y.size(0) && x.size(1) == y.size(1),
                    "lora_add_: y (B, T, N) and x (B, T, K) must be contiguous float32 CPU tensors, got ", y.sizes(),
                    " and ", x.sizes());
        TORCH_CHECK(proj >= 0 && proj < LORA_PROJECTIONS, "lora_add_: proj must be in [0, 7)");
        const int64_t B = x.size(0), T = x.size(1), K = x.size(2), N = y.size(2);
        for (const auto& ad : adapters) {
          TORCH_CHECK(ad && layer >= 0 && layer < static_cast<int64_t>(ad->layers.size()),
                      "lora_add_: layer ", layer, " is not in every adapter");
          const LoraPair& p = ad->layers[layer][proj];
          TORCH_CHECK(!p.a.defined() || (p.a.size(1) == K && p.bt.size(1) == N), "lora_add_: the pair of layer ",
                      layer, " projection ", proj, " does not fit x (.., ", K, ") and y (.., ", N, ")");
        }
        const at::Tensor ids = row_adapter.to(at::kLong).contiguous();
        TORCH_CHECK(ids.numel() == B, "lora_add_: row_adapter needs one entry per batch row");
        lora_add(group_lora_rows(adapters, ids.data_ptr<int64_t>(), B, T), layer, static_cast<int>(proj),
                 x.data_ptr<float>(), K, y.data_ptr<float>(), N);
      },
      "y += the LoRA deltas of projection `proj` of `layer` for the rows of each adapter (qlora.h)", py::arg("y"),
      py::arg("x"), py::arg("adapters"), py::arg("row_adapter"), py::arg("layer"), py::arg("proj"), release());
}
