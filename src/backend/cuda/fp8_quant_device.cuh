#pragma once
// The per-row e4m3 quantisation arithmetic of quant/fp8.h as device functions, shared by every kernel that
// quantises rows (the row quantiser, the LayerNorm that quantises its output, the FP8 GEMV's x staging): one
// definition, so that their codes and scales agree bit for bit with each other and with the CPU reference.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "quant/fp8.h"

namespace fluxswap::cuda {

// max |v| of 8 bf16 values (16 bytes); fmaxf skips NaN, like std::fmax in the CPU reference.
__device__ inline float amax8(const uint4& raw) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
  float m = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    m = fmaxf(m, fmaxf(fabsf(f.x), fabsf(f.y)));
  }
  return m;
}

// quant/fp8.h's e4m3_row_scale, correctly rounded whatever -prec-div says.
__device__ inline float e4m3_row_scale_dev(float amax) {
  return __fdiv_rn(fmaxf(amax, quant::kE4m3AmaxFloor), quant::kE4m3Max);
}

// __fmul_rn: a plain correctly rounded product (never contracted), as the CPU's x * inv. The conversion is
// cvt.rn.satfinite on sm_89+, and the header's bit-identical software path below it.
__device__ inline uint8_t quantize1(float v, float inv) {
  return __nv_cvt_float_to_fp8(__fmul_rn(v, inv), __NV_SATFINITE, __NV_E4M3);
}

// 8 bf16 values (16 bytes) to 8 e4m3 codes (8 bytes, the first value in the lowest byte).
__device__ inline uint2 quantize8(const uint4& raw, float inv) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
  uint32_t word[2];
#pragma unroll
  for (int w = 0; w < 2; ++w) {
    uint32_t packed = 0;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float2 f = __bfloat1622float2(h[2 * w + i]);
      const __nv_fp8x2_storage_t pair = __nv_cvt_float2_to_fp8x2(
          make_float2(__fmul_rn(f.x, inv), __fmul_rn(f.y, inv)), __NV_SATFINITE, __NV_E4M3);
      packed |= uint32_t(pair) << (16 * i);  // the low byte of a pair is its first element
    }
    word[w] = packed;
  }
  return make_uint2(word[0], word[1]);
}

}  // namespace fluxswap::cuda
