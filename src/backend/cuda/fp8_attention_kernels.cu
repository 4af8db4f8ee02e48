#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_utils.cuh"
#include "backend/cuda/fp8_attention_kernels.h"
#include "quant/fp8.h"

namespace fluxswap::cuda {

namespace {

constexpr int kThreads = 256;

__device__ inline float v_scale_of(const float* v_amax) {
  return __fdiv_rn(quant::kE4m3Max, fmaxf(*v_amax, quant::kE4m3AmaxFloor));
}

__device__ inline void write_slots(float scale, float qk_scale, float* slots) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    slots[kDescaleQ] = slots[kDescaleK] = __frcp_rn(qk_scale);
    slots[kDescaleV] = __frcp_rn(scale);
    slots[kScaleS] = quant::kE4m3Max;  // probabilities are <= 1
    slots[kDescaleS] = __frcp_rn(quant::kE4m3Max);
    slots[kScaleO] = scale;  // |out| <= max |v|
    slots[kDescaleO] = __frcp_rn(scale);
  }
}

// Element e of v in [B, H, S, D] order, wherever v keeps it.
__device__ inline const __nv_bfloat16* element(const VHeads& v, int64_t e) {
  const int64_t d = e % v.D, t = e / v.D, s = t % v.S, bh = t / v.S;
  return v.p + (bh / v.H) * v.sb + (bh % v.H) * v.sh + s * v.ss + d;
}

// A thread per 8 values of a head row (grid-stride); the 16-byte loads need D and the strides multiples of 8.
__global__ void quantize_v_kernel(VHeads v, uint8_t* __restrict__ v8, int64_t n8, const float* v_amax,
                                  float qk_scale, float* slots) {
  const float scale = v_scale_of(v_amax);
  write_slots(scale, qk_scale, slots);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8; i += int64_t(gridDim.x) * blockDim.x) {
    const uint4 raw = *reinterpret_cast<const uint4*>(element(v, i * 8));
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
    uint32_t word[2];
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const float2 a = __bfloat1622float2(h[2 * w]), b = __bfloat1622float2(h[2 * w + 1]);
      const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a.x * scale, a.y * scale), __NV_SATFINITE, __NV_E4M3);
      const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(b.x * scale, b.y * scale), __NV_SATFINITE, __NV_E4M3);
      word[w] = lo | (hi << 16);
    }
    reinterpret_cast<uint2*>(v8)[i] = make_uint2(word[0], word[1]);
  }
}

// The same one value at a time, for any strides.
__global__ void quantize_v_scalar_kernel(VHeads v, uint8_t* __restrict__ v8, int64_t n, const float* v_amax,
                                         float qk_scale, float* slots) {
  const float scale = v_scale_of(v_amax);
  write_slots(scale, qk_scale, slots);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const float x = __bfloat162float(*element(v, e));
    v8[e] = __nv_cvt_float_to_fp8(x * scale, __NV_SATFINITE, __NV_E4M3);
  }
}

// A thread per 8 output values of a row (grid-stride).
__global__ void dequantize_attention_kernel(const uint8_t* __restrict__ o8, const float* slots, float* v_amax,
                                            RowsView out, int64_t groups) {
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (first == 0) *v_amax = 0.0f;  // cuDNN and the v quantisation, which read it, ran before this kernel
  const float descale = slots[kDescaleO];
  const int64_t per_row = out.C / 8;
  for (int64_t i = first; i < groups; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / per_row, c = (i - row * per_row) * 8;
    const int64_t b = row / out.N, n = row - b * out.N;
    const uint2 raw = *reinterpret_cast<const uint2*>(o8 + row * out.C + c);
    const __nv_fp8x2_storage_t* pairs = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw);
    float vals[8];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pairs[k], __NV_E4M3)));
      vals[2 * k] = f.x * descale;
      vals[2 * k + 1] = f.y * descale;
    }
    store_bf16<8>(row_ptr(out, b, n) + c, vals);
  }
}

__global__ void output_scales_kernel(const float* slots, float* v_amax, float* out_scale, int64_t rows) {
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (first == 0) *v_amax = 0.0f;  // cuDNN and the v quantisation, which read it, ran before this kernel
  const float descale = slots[kDescaleO];
  for (int64_t i = first; i < rows; i += int64_t(gridDim.x) * blockDim.x) out_scale[i] = descale;
}

}  // namespace

void launch_output_scales(const float* slots, float* v_amax, float* out_scale, int64_t rows, cudaStream_t stream) {
  output_scales_kernel<<<grid_for(rows > 0 ? rows : 1, kThreads), kThreads, 0, stream>>>(slots, v_amax, out_scale,
                                                                                          rows);
  check_launch("attention_fp8_rows", "output_scales_kernel");
}

void launch_quantize_v_e4m3(const VHeads& v, uint8_t* v8, const float* v_amax, float qk_scale, float* slots,
                            cudaStream_t stream) {
  const int64_t n = v.B * v.H * v.S * v.D;
  if (v.D % 8 || v.sb % 8 || v.sh % 8 || v.ss % 8 || reinterpret_cast<uintptr_t>(v.p) % 16 ||
      reinterpret_cast<uintptr_t>(v8) % 8) {
    const unsigned blocks = unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, 132 * 16));
    quantize_v_scalar_kernel<<<blocks ? blocks : 1, kThreads, 0, stream>>>(v, v8, n, v_amax, qk_scale, slots);
    check_launch("attention_fp8", "quantize_v_scalar_kernel");
    return;
  }
  const int64_t n8 = n / 8;
  const unsigned blocks = unsigned(std::min<int64_t>((n8 + kThreads - 1) / kThreads, 132 * 16));
  quantize_v_kernel<<<blocks ? blocks : 1, kThreads, 0, stream>>>(v, v8, n8, v_amax, qk_scale, slots);
  check_launch("attention_fp8", "quantize_v_kernel");
}

void launch_dequantize_attention_e4m3(const uint8_t* o8, const float* slots, float* v_amax, const RowsView& out,
                                      cudaStream_t stream) {
  if (out.C % 8 || !vec8_ok(out) || reinterpret_cast<uintptr_t>(o8) % 8)
    fail("attention_fp8", "launch", "the output rows must be multiples of 8 values on 16-byte boundaries");
  const int64_t groups = out.B * out.N * out.C / 8;
  dequantize_attention_kernel<<<grid_for(groups > 0 ? groups : 1, kThreads), kThreads, 0, stream>>>(
      o8, slots, v_amax, out, groups);
  check_launch("attention_fp8", "dequantize_attention_kernel");
}

}  // namespace fluxswap::cuda
