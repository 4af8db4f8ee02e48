#pragma once
// FP8 E4M3 on the CPU ("e4m3fn" of the OCP FP8 spec: exponent bias 7, no infinities, largest finite value 448,
// NaN = S.1111.111): the reference that the GPU quantisation kernels (backend/cuda/fp8_quant_kernels.h) match bit
// for bit, and the per-row scaling that the FP8 linears use.
//
// Encoding rounds to nearest, ties to even, like every conversion on the GPU. Finite values beyond 448 and the
// infinities saturate to +-448 instead of becoming NaN: that is the GPU's cvt.rn.satfinite (what
// __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3) does), and one clipped outlier costs far less than a NaN that
// poisons a whole GEMM output row. NaN encodes as 0x7F whatever its sign, as that conversion does. The sign of zero
// is kept: -0 and negative values that round to zero encode as 0x80.
//
// Per-row scaling, for a row r with amax_r = max |x_r| (NaN elements are skipped, as fmax skips them):
//   scale_r = max(amax_r, kE4m3AmaxFloor) / 448     one IEEE float division
//   inv_r   = 1 / scale_r                            one IEEE float division (__frcp_rn on the GPU)
//   q       = e4m3(x * inv_r)                        one IEEE float product per element
//   x      ~= float(q) * scale_r                     one float product (then bf16 rounding on the GPU)
// A product with the reciprocal rather than x / scale_r: the GPU's correctly rounded division is a long
// instruction sequence that halved the quantisation kernel's bandwidth on an H100, while the extra rounding (half
// a float ulp) is 2^-20 of the e4m3 step. Every step is a correctly rounded IEEE operation, so the CPU and the GPU
// (which calls the _rn intrinsics, immune to -prec-div and -ftz defaults) get the same floats. The floor keeps the
// scale a normal, nonzero float for all-zero rows (which then quantise to zeros).
#include <cstdint>

namespace fluxswap::quant {

inline constexpr float kE4m3Max = 448.0f;
inline constexpr float kE4m3AmaxFloor = 1e-12f;
inline constexpr uint8_t kE4m3NaN = 0x7F;

uint8_t e4m3_from_f32(float x);
float e4m3_to_f32(uint8_t code);  // exact; 0x7F and 0xFF are NaN

// max(amax, kE4m3AmaxFloor) / 448.
float e4m3_row_scale(float amax);
// What quantisation multiplies by: 1 / scale.
inline float e4m3_inverse_scale(float scale) { return 1.0f / scale; }

// Rows [rows, cols] of x at row stride ldx (elements) to e4m3 rows at stride ldq (bytes) and one scale per row.
// The bf16 form takes raw bf16 bits (what the GPU kernels read); both give the same result for the same values.
void quantize_rows_e4m3(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* q, int64_t ldq,
                        float* scales);
void quantize_rows_e4m3(const uint16_t* x_bf16, int64_t ldx, int64_t rows, int64_t cols, uint8_t* q, int64_t ldq,
                        float* scales);

// y[r, c] = e4m3_to_f32(q[r, c]) * scales[r], in float32 (the GPU kernel rounds this product to bf16).
void dequantize_rows_e4m3(const uint8_t* q, int64_t ldq, const float* scales, int64_t rows, int64_t cols, float* y,
                          int64_t ldy);

}  // namespace fluxswap::quant
