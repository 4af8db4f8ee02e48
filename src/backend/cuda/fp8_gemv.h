#pragma once
// The FP8 linear for a few rows (the modulation linears: one conditioning vector per sample): a weight-streaming
// kernel instead of a GEMM, whose tiles would mostly multiply padding. The same arithmetic as the FP8 GEMM path
// and the CPU reference: each x row quantised to e4m3 with its own scale (quant/fp8.h), float32 accumulation, the
// product scaled by the row's and the output feature's scales, plus bias.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fluxswap::cuda {

// Rows of x the kernel takes at most, and whether a shape fits it (x rows are staged in shared memory as float).
constexpr int64_t kFp8GemvMaxRows = 2;
bool fp8_gemv_fits(int64_t rows, int64_t K);

// y[r, n] = e4m3(x[r]) . wq[n] * (sx[r] * w_scale[n]) + bias[n]; x rows at stride ldx (bf16), wq rows at stride ldw
// (bytes, K a multiple of 16, 16-byte aligned rows; x rows 16-byte aligned too), y rows at stride ldy; bias may be
// null.
void launch_fp8_gemv(const __nv_bfloat16* x, int64_t ldx, int64_t rows, int64_t K, const uint8_t* wq, int64_t ldw,
                     const float* w_scale, const __nv_bfloat16* bias, int64_t nout, __nv_bfloat16* y, int64_t ldy,
                     cudaStream_t stream);

}  // namespace fluxswap::cuda
