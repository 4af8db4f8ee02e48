#pragma once
// FP8 (e4m3) conversion kernels for the FP8 linears: per-row quantisation of bf16 rows (activations before each
// GEMM, weights once at load), dequantisation back to bf16 (tests, LoRA merging into FP8 weights), and the scaling
// epilogue of the GEMM path that has no per-row scales in cuBLASLt.
//
// Quantisation is bit-identical to the CPU reference in quant/fp8.h (same formula, same rounding: see there).
// Element pointers are raw: e4m3 codes are bytes (uint8_t), bf16 values __nv_bfloat16; row strides are in elements.
// Launchers enqueue on `stream` without synchronising and throw Error naming `op` when a launch fails. They run on
// any architecture the backend is built for: below sm_89 the e4m3 conversions are done in software, identically.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fluxswap::cuda {

// x rows [rows, cols] at row stride ldx -> q rows [rows, cols] at row stride ldq (bytes), scales[rows] (float32).
// One block per row; 16-byte loads when x and its stride allow (cols a multiple of 8, x 16-byte aligned, ldx a
// multiple of 8, q 8-byte aligned, ldq a multiple of 8), rows of up to 20480 values staged in shared memory, else
// element by element. The same launcher quantises weights: [out, in] rows give one scale per output feature.
void launch_quantize_rows_e4m3(const __nv_bfloat16* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* q,
                               int64_t ldq, float* scales, cudaStream_t stream, const char* op = "quantize_fp8");

// The row quantiser over rows made of two parts side by side, [a | b]: a as e4m3 codes (rows [rows, ca] at
// stride lda bytes) whose values are code * a_scale[r], b bf16 (rows [rows, cb] at stride ldb). Exactly
// launch_quantize_rows_e4m3 of those float values (a's products correctly rounded), into q rows [rows, ca + cb].
// Rows staged in shared memory when ca, lda, ldq are multiples of 16, cb, ldb of 8, pointers 16-byte aligned and
// ca + 2 cb <= 40 KiB; else element by element.
void launch_quantize_joined_rows_e4m3(const uint8_t* a, int64_t lda, const float* a_scale, int64_t ca,
                                     const __nv_bfloat16* b, int64_t ldb, int64_t cb, int64_t rows, uint8_t* q,
                                     int64_t ldq, float* scales, cudaStream_t stream,
                                     const char* op = "quantize_fp8_rows_joined");

// y[r, c] = bf16(e4m3(q[r, c]) * scales[r]).
void launch_dequantize_rows_e4m3(const uint8_t* q, int64_t ldq, const float* scales, int64_t rows, int64_t cols,
                                 __nv_bfloat16* y, int64_t ldy, cudaStream_t stream,
                                 const char* op = "dequantize_fp8");

// The accumulator of an FP8 GEMM [rows = tokens, cols = output features], bf16 or float32, at row stride ld.
struct Fp8Accumulator {
  const void* p;
  bool f32;
  int64_t ld;
};

// y[t, o] = act(acc[t, o] * (sx[t] * sw[o]) + bias[o]), act = GELU (tanh approximation) when `gelu`, else none.
// sx, sw and bias may be null (factor 1, no bias). acc may be y itself (same pointer and stride, bf16): each
// element is read before it is written by the same thread.
void launch_fp8_scale_epilogue(const Fp8Accumulator& acc, const float* sx, const float* sw,
                               const __nv_bfloat16* bias, bool gelu, int64_t rows, int64_t cols, __nv_bfloat16* y,
                               int64_t ldy, cudaStream_t stream, const char* op = "linear_fp8");

// A gated output projection's per-step output-feature factors (cuda_residual_ops.cpp), for many projections and B
// samples in one launch: item i's scale[b, o] = gate[b, o] * sw[o] (float32) and, when it has a bias,
// bias_out[b, o] = bf16(gate[b, o] * bias[o]); gate rows [B, n] at
// batch stride gate_sb, factors [B, n] contiguous. The items travel as the kernel's parameter (a recorded launch
// keeps its copy: nothing in device memory to keep alive or to leak when the pointers change from one generation to
// the next).
struct GatedFactorsItem {
  const __nv_bfloat16* gate;
  int64_t gate_sb;
  const float* sw;            // the FP8 weight's row scales
  const __nv_bfloat16* bias;  // or null (then bias_out is not written)
  float* scale;
  __nv_bfloat16* bias_out;
  int64_t n;
};
constexpr int kGatedFactorsPerLaunch = 64;  // 56 bytes each: within the 4 KiB of kernel parameters
struct GatedFactorsBatch {
  GatedFactorsItem item[kGatedFactorsPerLaunch];
  int64_t n_items, B, max_n;  // max_n: the largest item's n
};
void launch_gated_output_factors(const GatedFactorsBatch& batch, cudaStream_t stream,
                                 const char* op = "gated_output_factors");

}  // namespace fluxswap::cuda
