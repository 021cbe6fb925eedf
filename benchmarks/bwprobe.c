/* The machine's read bandwidth, as a streaming kernel sees it: benchmarks/bandwidth.py builds this file with
 * the system C compiler into a small shared library and calls lf_read_gbs through ctypes (used only by
 * benchmarks/, never by the library).
 *
 * Each of `threads` POSIX threads reads its own contiguous share of one buffer (as a GEMV's row split does)
 * with the widest loads the CPU has (AVX-512: 64-byte loads, else AVX2: 32-byte), eight independent
 * accumulators so that many cache-line misses are in flight, and optionally a software prefetch `prefetch`
 * bytes ahead into L2. The buffer is anonymous memory, 2 MiB-aligned and marked MADV_HUGEPAGE when `huge`
 * is set (one TLB entry per 2 MiB, and the hardware prefetcher is not stopped at every 4 KiB page), written
 * once before timing so that every page is resident. A pass is timed from its threads' start to the last one's
 * end; the result is the buffer's bytes over the fastest of `reps` passes.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define HUGE_BYTES ((size_t)2 << 20)

typedef struct {
  const uint8_t *begin, *end;
  long prefetch;
  int wide;
  uint64_t sink;
} share_t;

__attribute__((target("avx512f"))) static uint64_t read_avx512(const uint8_t *p, const uint8_t *end, long pf) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (; p + 512 <= end; p += 512) {
    if (pf > 0)
      for (int l = 0; l < 512; l += 64) _mm_prefetch((const char *)(p + pf + l), _MM_HINT_T1);
    a0 = _mm512_xor_si512(a0, _mm512_load_si512((const void *)(p + 0)));
    a1 = _mm512_xor_si512(a1, _mm512_load_si512((const void *)(p + 64)));
    a2 = _mm512_xor_si512(a2, _mm512_load_si512((const void *)(p + 128)));
    a3 = _mm512_xor_si512(a3, _mm512_load_si512((const void *)(p + 192)));
    a4 = _mm512_xor_si512(a4, _mm512_load_si512((const void *)(p + 256)));
    a5 = _mm512_xor_si512(a5, _mm512_load_si512((const void *)(p + 320)));
    a6 = _mm512_xor_si512(a6, _mm512_load_si512((const void *)(p + 384)));
    a7 = _mm512_xor_si512(a7, _mm512_load_si512((const void *)(p + 448)));
  }
  a0 = _mm512_xor_si512(_mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3)),
                        _mm512_xor_si512(_mm512_xor_si512(a4, a5), _mm512_xor_si512(a6, a7)));
  return (uint64_t)_mm512_reduce_add_epi64(a0);
}

__attribute__((target("avx2"))) static uint64_t read_avx2(const uint8_t *p, const uint8_t *end, long pf) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (; p + 256 <= end; p += 256) {
    if (pf > 0)
      for (int l = 0; l < 256; l += 64) _mm_prefetch((const char *)(p + pf + l), _MM_HINT_T1);
    a0 = _mm256_xor_si256(a0, _mm256_load_si256((const __m256i *)(p + 0)));
    a1 = _mm256_xor_si256(a1, _mm256_load_si256((const __m256i *)(p + 32)));
    a2 = _mm256_xor_si256(a2, _mm256_load_si256((const __m256i *)(p + 64)));
    a3 = _mm256_xor_si256(a3, _mm256_load_si256((const __m256i *)(p + 96)));
    a4 = _mm256_xor_si256(a4, _mm256_load_si256((const __m256i *)(p + 128)));
    a5 = _mm256_xor_si256(a5, _mm256_load_si256((const __m256i *)(p + 160)));
    a6 = _mm256_xor_si256(a6, _mm256_load_si256((const __m256i *)(p + 192)));
    a7 = _mm256_xor_si256(a7, _mm256_load_si256((const __m256i *)(p + 224)));
  }
  a0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3)),
                        _mm256_xor_si256(_mm256_xor_si256(a4, a5), _mm256_xor_si256(a6, a7)));
  return (uint64_t)_mm256_extract_epi64(a0, 0) + (uint64_t)_mm256_extract_epi64(a0, 1) +
         (uint64_t)_mm256_extract_epi64(a0, 2) + (uint64_t)_mm256_extract_epi64(a0, 3);
}

static void *reader(void *arg) {
  share_t *s = (share_t *)arg;
  s->sink += s->wide ? read_avx512(s->begin, s->end, s->prefetch) : read_avx2(s->begin, s->end, s->prefetch);
  return NULL;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Which loads lf_read_gbs uses here: 512 (AVX-512) or 256 (AVX2) bits, 0 if neither (it then returns -1). */
int lf_load_bits(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") ? 512 : __builtin_cpu_supports("avx2") ? 256 : 0;
}

/* GB/s (1e9 bytes) of the fastest of `reps` passes over `bytes` (rounded down to whole 2 MiB) read by
 * `threads` threads (1-64). `sink_out` receives a checksum of every byte read (so no read can be left out,
 * and a test can check it): per thread share and pass, the XOR of its 64-byte lines taken eight at a time
 * (line i into accumulator i % 8), the eight XORed together, its 64-bit lanes summed; summed over shares and
 * passes. Byte i of the buffer holds (i / 64) % 256 where i % 64 == 0, else 0.
 * Returns -1 on bad arguments, no AVX2, or when the memory or a thread cannot be had. */
double lf_read_gbs(size_t bytes, int threads, int reps, long prefetch, int huge, uint64_t *sink_out) {
  const int bits = lf_load_bits();
  bytes = bytes / HUGE_BYTES * HUGE_BYTES;
  if (bits == 0 || bytes == 0 || threads < 1 || threads > 64 || reps < 1 || prefetch < 0) return -1.0;
  uint8_t *raw = mmap(NULL, bytes + HUGE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return -1.0;
  uint8_t *buf = (uint8_t *)(((uintptr_t)raw + HUGE_BYTES - 1) & ~(uintptr_t)(HUGE_BYTES - 1));
  madvise(buf, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  for (size_t i = 0; i < bytes; i += 64) buf[i] = (uint8_t)(i >> 6);  // every page resident, data not all zero

  share_t shares[64];
  pthread_t tids[64];
  const size_t chunks = bytes / 512, per = chunks / (size_t)threads;  // whole 512-byte chunks per thread
  for (int t = 0; t < threads; ++t) {
    const size_t lo = (size_t)t * per, hi = t + 1 == threads ? chunks : lo + per;
    shares[t] = (share_t){buf + lo * 512, buf + hi * 512, prefetch, bits == 512, 0};
  }
  double best = -1.0;
  int ok = 1;
  for (int r = 0; r < reps && ok; ++r) {
    // A pass: threads 1.. start, the caller reads share 0, all join; its time includes the thread starts
    // (tens of microseconds against a pass of tens of milliseconds: the figure errs low, never high).
    const double t0 = now();
    int started = 1;
    for (; started < threads; ++started)
      if (pthread_create(&tids[started], NULL, reader, &shares[started]) != 0) break;
    ok = started == threads;
    reader(&shares[0]);
    for (int t = 1; t < started; ++t) pthread_join(tids[t], NULL);
    const double gbs = (double)bytes / (now() - t0) / 1e9;
    if (ok && gbs > best) best = gbs;
  }
  uint64_t sink = 0;
  for (int t = 0; t < threads; ++t) sink += shares[t].sink;
  if (sink_out) *sink_out = sink;
  munmap(raw, bytes + HUGE_BYTES);
  return ok ? best : -1.0;
}
