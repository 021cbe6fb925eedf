// Entry points of the 16-bit weight prefill GEMM's translation unit (qgemm.cpp, torch-free; the tiles are in
// qgemm_tiles.h): AVX-512 tiles where the CPU has AVX-512F/VL (BF16 weights with vdpbf16ps where it has
// AVX512_BF16, else the tiles' FMA emulation of it), else AVX2, same bits either way. Also the BF16 weights' activation rounding, which the decode tiles share.
//
// BF16 weights multiply bf16 activations, as the model's own arithmetic does (transformers and Meta's
// reference in bf16 round every activation to bf16 before each matmul) and as llama.cpp does: each
// activation is rounded to bf16 (round to nearest even, torch's `.to(torch.bfloat16)`), and the products
// are summed as AVX512_BF16's vdpbf16ps sums them. The contract for a (weight row, activation row) pair:
// one 8-lane float32 accumulator; in step s (columns 16s .. 16s + 15) lane j adds the product of column
// 16s + 2j + 1, then the product of column 16s + 2j, each a fused multiply-add rounded to nearest even with
// denormal inputs read as zero and denormal results flushed to zero (DAZ / FTZ); then the 8 lanes are summed
// by hsum (qcommon.h) and the columns past the last multiple of 16 added one by one. vdpbf16ps does exactly
// this (tested on this machine's AMD EPYC against 16 M random lanes, denormals included: odd column first,
// DAZ in, FTZ out, whatever MXCSR says); without it the tiles emulate it with float32 FMAs under
// `Bf16Mode` (MXCSR's DAZ and FTZ set), which gives the same bits. The activation rows are held "split":
// row m of K floats, step s at 16s as 8 floats of its odd columns (16s + 1, 16s + 3, ..) then 8 of its even
// ones, the tail columns [K / 16 * 16, K) in place; each value bf16-rounded (a float32 with a zero low half).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace lfq {

// y[:, n0:n1] = x (M, K) @ W[n0:n1].T for a T_F16 or T_BF16 weight W (N, K); y (M, N) float32, row-major;
// x (M, K) float32, for T_BF16 split by bf16_split_rows and run under a Bf16Mode.
// Each result is bit for bit the decode tiles' (matmul_float in qmatmul.cpp), whatever M or [n0, n1).
void gemm_float(int64_t qt, const void* w, int64_t n0, int64_t n1, int64_t K, const float* x, int64_t M, float* y,
                int64_t N);

// Rows x (M, K) rounded to bf16 (nearest even; NaN stays NaN) in the split layout above: xs (M, K).
void bf16_split_rows(const float* x, int64_t M, int64_t K, float* xs);
// Split rows xs (M, K) as plain bf16 (M, K), columns in order: what vdpbf16ps reads.
void bf16_rows(const float* xs, int64_t M, int64_t K, uint16_t* xb);

// MXCSR with DAZ and FTZ set for the scope (this thread), as vdpbf16ps computes: the BF16 tiles' FMAs
// then round as it does. Every BF16 matmul runs under one (its hsum and tail too, in every build).
struct Bf16Mode {
  unsigned saved;
  Bf16Mode() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~Bf16Mode() { _mm_setcsr(saved); }
  Bf16Mode(const Bf16Mode&) = delete;
  Bf16Mode& operator=(const Bf16Mode&) = delete;
};

// Whether this CPU can run the AVX-512 tiles, and whether they are used: by default where supported, unless
// LLAMAFORGE_X8_TILES=avx2 in the environment (the AVX2 tiles everywhere, as AVX2-only CPUs run them; it
// turns vdpbf16ps off too, as gemm_bf16dot_enabled follows these tiles).
bool gemm_avx512_supported();
bool& gemm_avx512_enabled();
// Whether the CPU has AVX512_BF16 (vdpbf16ps), and whether BF16 weights use it (by default where it does;
// off: the exact FMA emulation, in the AVX-512 tiles where those are on, else the AVX2 ones: what AVX-512
// CPUs without AVX512_BF16, Skylake-X .. Ice Lake, run; the same bits either way).
bool gemm_bf16dot_supported();
bool& gemm_bf16dot_enabled();
// Whether the prefill GEMM itself uses vdpbf16ps where gemm_bf16dot_enabled() (else its emulation, the same bits):
// by default on, except on Intel CPUs, where the emulation measured faster (qgemm.cpp). The decode tiles follow
// gemm_bf16dot_enabled() alone.
bool& gemm_bf16dot_prefill();

}  // namespace lfq
