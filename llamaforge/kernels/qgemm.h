// Entry points of the 16-bit weight prefill GEMM's translation unit (qgemm.cpp, torch-free; the tiles are in
// qgemm_tiles.h): AVX-512 tiles where the CPU has AVX-512F/VL, else AVX2, same bits either way.
#pragma once

#include <cstdint>

namespace lfq {

// y[:, n0:n1] = x (M, K) @ W[n0:n1].T for a T_F16 or T_BF16 weight W (N, K); x, y (M, N) float32, row-major.
// Each result is bit for bit the decode tiles' (matmul_float in qmatmul.cpp), whatever M or [n0, n1).
void gemm_float(int64_t qt, const void* w, int64_t n0, int64_t n1, int64_t K, const float* x, int64_t M, float* y,
                int64_t N);

// Whether this CPU can run the AVX-512 tiles, and whether they are used: by default where supported, unless
// LLAMAFORGE_X8_TILES=avx2 in the environment (the AVX2 tiles everywhere, as AVX2-only CPUs run them).
bool gemm_avx512_supported();
bool& gemm_avx512_enabled();

}  // namespace lfq
