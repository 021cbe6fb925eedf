// Does the 16-bit decode GEMV's weight layout bound its streaming rate? A standalone probe (used only by
// benchmarks/, never by the library), built and run by hand:
//     g++ -O2 -mavx2 -mfma -mf16c -o /tmp/f16_layout benchmarks/f16_layout.cpp && /tmp/f16_layout [1|0]
// (1, the default: the weights in MADV_HUGEPAGE memory; 0: 4 KiB pages). It times one thread's M = 1 sweeps over
// a 1B Llama shape's 16 layers of F16 projections (2.1 GB, so every sweep streams from DRAM) with the tile the
// library runs at M = 1 (qmatmul.cpp float_tile<F16, 8, 1>: 8 weight rows, one FMA chain per row, 8 KiB-ahead
// L2 prefetch when pf = 1) over two layouts of the same bytes: row-major (GGUF's, what the library reads: the
// tile's 8 rows are 8 streams one row length apart) and interleaved (per group of 8 rows, per 8 columns, the 8
// rows' 8 halves side by side: the same loads and the same FMA chain per row, so the same sums, as one
// sequential stream, as the x8 layout of the quantized types is). GB/s = weight bytes / seconds per sweep.
// 2026-12-02, Zen 4 VM (2 cores, shared): row-major 12-18 GB/s, interleaved 20-26 GB/s (benchmarks/RESULTS.md,
// "Ninth session").
#include <immintrin.h>
#include <sys/mman.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

static float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}

// y = W x for W (N, K) row-major: 8 rows at a time, each its own stream.
static void row_major(const uint16_t* w, int64_t N, int64_t K, const float* x, float* y, int64_t pf) {
  for (int64_t n = 0; n < N; n += 8) {
    const uint16_t* r[8];
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) r[i] = w + (n + i) * K, acc[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      if (pf && k % 32 == 0)
        for (int i = 0; i < 8; ++i) _mm_prefetch(reinterpret_cast<const char*>(r[i] + k) + pf, _MM_HINT_T2);
      const __m256 xv = _mm256_loadu_ps(x + k);
      for (int i = 0; i < 8; ++i)
        acc[i] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r[i] + k))), xv, acc[i]);
    }
    for (int i = 0; i < 8; ++i) y[n + i] = hsum(acc[i]);
  }
}

// The same product over the interleaved layout: group g's columns k..k+7 of its 8 rows are 128 bytes at g * 8K + 8k.
static void interleaved(const uint16_t* w, int64_t N, int64_t K, const float* x, float* y, int64_t pf) {
  for (int64_t n = 0; n < N; n += 8) {
    const uint16_t* g = w + n * K;
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const uint16_t* b = g + k * 8;
      if (pf)
        for (int line = 0; line < 128; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(b) + pf + line, _MM_HINT_T2);
      const __m256 xv = _mm256_loadu_ps(x + k);
      for (int i = 0; i < 8; ++i)
        acc[i] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 8 * i))), xv, acc[i]);
    }
    for (int i = 0; i < 8; ++i) y[n + i] = hsum(acc[i]);
  }
}

int main(int argc, char** argv) {
  // One 1B layer's projections (N, K): wq, wk, wv, wo, w1, w3, w2; 16 layers.
  const int64_t shapes[7][2] = {{2048, 2048}, {512, 2048}, {512, 2048}, {2048, 2048}, {8192, 2048}, {8192, 2048}, {2048, 8192}};
  const int layers = 16;
  size_t total = 0;
  for (const auto& s : shapes) total += s[0] * s[1];
  total *= layers;
  const size_t bytes = total * 2;
  auto* w = static_cast<uint16_t*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (w == MAP_FAILED) return perror("mmap"), 1;
  madvise(w, bytes, argc > 1 && atoi(argv[1]) == 0 ? MADV_NOHUGEPAGE : MADV_HUGEPAGE);
  for (size_t i = 0; i < total; ++i) w[i] = 0x3c00 ^ (i & 0xff);  // halves near 1: finite products
  std::vector<float> x(8192, 0.5f), y(8192);
  for (int rep = 0; rep < 4; ++rep) {
    for (int mode = 0; mode < 4; ++mode) {
      const bool inter = mode >= 2;
      const int64_t pf = mode % 2 ? 8192 : 0;
      const auto t0 = std::chrono::steady_clock::now();
      for (int sweep = 0; sweep < 3; ++sweep) {
        size_t off = 0;
        for (int l = 0; l < layers; ++l) {
          for (const auto& s : shapes) {
            (inter ? interleaved : row_major)(w + off, s[0], s[1], x.data(), y.data(), pf);
            off += s[0] * s[1];
          }
        }
      }
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 3;
      printf("%-11s prefetch %s: %5.1f GB/s\n", inter ? "interleaved" : "row-major", pf ? "on " : "off", bytes / dt / 1e9);
    }
  }
  return 0;
}
