// Entry points of the kernels translation unit (qkernels.cpp), which has no torch headers and so
// compiles in parallel with the bindings (qmatmul.cpp). Activations come quantized (qcommon.h).
#pragma once

#include "qcommon.h"

namespace lfq {

constexpr int64_t LAYOUT_GGUF = 0, LAYOUT_X8 = 1;

// y[:, n0:n1] for weight rows [n0, n1) in GGUF layout (bpr bytes per row); y is (M, N) row-major.
void matmul_gguf(int64_t qt, const uint8_t* w, int64_t bpr, int64_t n0, int64_t n1, int64_t K, const Act& a,
                 int64_t M, float* y, int64_t N);

// y[:, 8 * g0 : 8 * g1] for row groups [g0, g1) of an x8 weight: AVX2 tiles, or AVX-512 VNNI tiles
// (only where vnni_supported()).
void matmul_x8_avx2(int64_t qt, const uint8_t* w, int64_t g0, int64_t g1, int64_t N, int64_t K, const Act& a,
                    int64_t M, float* y);
void matmul_x8_vnni(int64_t qt, const uint8_t* w, int64_t g0, int64_t g1, int64_t N, int64_t K, const Act& a,
                    int64_t M, float* y);

// How far ahead (bytes of the weight stream) the x8 tiles prefetch at decode sizes (M <= 4; 0: not at all; by
// default 1 KiB on Intel CPUs, 0 elsewhere: qkernels.cpp has why).
// A prefetch changes no value, so no bit moves whatever it is (the `x8_prefetch` knob, benchmarks/decode_knobs.py).
int64_t& x8_prefetch_bytes();

// Row n of w (bpr bytes per row in GGUF layout, or x8) dequantized exactly into out[0:K].
void dequant_any(int64_t layout, int64_t qt, const uint8_t* w, int64_t bpr, int64_t n, int64_t K, float* out);

}  // namespace lfq
