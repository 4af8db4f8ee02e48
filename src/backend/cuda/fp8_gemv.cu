#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_utils.cuh"
#include "backend/cuda/fp8_gemv.h"
#include "quant/fp8.h"

namespace fluxswap::cuda {

namespace {

constexpr int kWarps = 8;
// K up to 32 lanes x 8 pieces x 16 = 4096 (FLUX's modulation reads 3072).
constexpr int kMaxPiecesPerLane = 8;
constexpr int64_t kSharedBytes = 48 * 1024;
// A lane reads the 16 x values of its 16-byte weight piece as four float4; pieces padded to 20 floats put the
// eight lanes of each shared-memory phase on distinct banks.
constexpr int64_t kPiece = 16, kPieceStride = 20;

// x rows quantised as the row quantiser does them (fp8_quant_kernels.cu), kept in shared memory as the float
// values of their e4m3 codes; then each warp streams whole weight rows in 16-byte pieces.
__global__ void __launch_bounds__(kWarps * 32)
    fp8_gemv_kernel(const __nv_bfloat16* __restrict__ x, int64_t ldx, int rows, int64_t K,
                    const uint8_t* __restrict__ wq, int64_t ldw, const float* __restrict__ w_scale,
                    const __nv_bfloat16* __restrict__ bias, int64_t nout, __nv_bfloat16* __restrict__ y,
                    int64_t ldy) {
  extern __shared__ float xs[];  // [rows, K / 16 pieces of kPieceStride]
  const int64_t row_stride = K / kPiece * kPieceStride;
  __shared__ float scratch[32];
  __shared__ float sx[kFp8GemvMaxRows];
  // x in 16-byte groups of 8 values, at most two per thread (K <= 4096 = 256 threads x 2 x 8), held in registers
  // between the max and the conversion: one read of x per block.
  for (int r = 0; r < rows; ++r) {
    const __nv_bfloat16* xr = x + r * ldx;
    uint4 cached[2];
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t g = threadIdx.x + int64_t(j) * blockDim.x;
      cached[j] = g * 8 < K ? reinterpret_cast<const uint4*>(xr)[g] : make_uint4(0, 0, 0, 0);
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&cached[j]);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(h[i]);
        amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
      }
    }
    const float scale = __fdiv_rn(fmaxf(block_max(amax, scratch), quant::kE4m3AmaxFloor), quant::kE4m3Max);
    const float inv = __frcp_rn(scale);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t g = threadIdx.x + int64_t(j) * blockDim.x;
      if (g * 8 >= K) break;
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&cached[j]);
      float* dst = xs + r * row_stride + (g * 8) / kPiece * kPieceStride + (g * 8) % kPiece;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(h[i]);
        const __nv_fp8x2_storage_t pair = __nv_cvt_float2_to_fp8x2(
            make_float2(__fmul_rn(f.x, inv), __fmul_rn(f.y, inv)), __NV_SATFINITE, __NV_E4M3);
        const float2 q = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
        dst[2 * i] = q.x;
        dst[2 * i + 1] = q.y;
      }
    }
    if (threadIdx.x == 0) sx[r] = scale;
    __syncthreads();  // every row of xs is complete before any warp reads it
  }

  // Each warp takes two output features at a time and issues all of their 16-byte weight loads before using
  // any: the products are bandwidth-bound, and only many loads in flight per SM reach HBM's rate.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t n0 = (int64_t(blockIdx.x) * kWarps + warp) * 2; n0 < nout; n0 += int64_t(gridDim.x) * kWarps * 2) {
    uint4 raw[2][kMaxPiecesPerLane];
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
      for (int j = 0; j < kMaxPiecesPerLane; ++j) {
        const int64_t k = (int64_t(lane) + 32 * j) * kPiece;
        raw[f][j] = n0 + f < nout && k < K ? *reinterpret_cast<const uint4*>(wq + (n0 + f) * ldw + k)
                                           : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      float acc[kFp8GemvMaxRows] = {};
#pragma unroll
      for (int j = 0; j < kMaxPiecesPerLane; ++j) {
        const int64_t k = (int64_t(lane) + 32 * j) * kPiece;
        if (k >= K) break;
        const __nv_fp8x2_storage_t* pairs = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw[f][j]);
        float w[kPiece];
#pragma unroll
        for (int p = 0; p < 8; ++p) {
          const float2 v = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pairs[p], __NV_E4M3)));
          w[2 * p] = v.x;
          w[2 * p + 1] = v.y;
        }
#pragma unroll
        for (int r = 0; r < kFp8GemvMaxRows; ++r) {
          if (r >= rows) break;
          const float4* xv = reinterpret_cast<const float4*>(xs + r * row_stride + k / kPiece * kPieceStride);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const float4 v = xv[q];
            acc[r] += w[4 * q] * v.x + w[4 * q + 1] * v.y + w[4 * q + 2] * v.z + w[4 * q + 3] * v.w;
          }
        }
      }
      const int64_t n = n0 + f;
#pragma unroll
      for (int r = 0; r < kFp8GemvMaxRows; ++r) {
        if (r >= rows) break;
        const float sum = warp_sum(acc[r]);
        if (lane == 0 && n < nout) {
          const float b = bias ? __bfloat162float(bias[n]) : 0.0f;
          y[r * ldy + n] = __float2bfloat16_rn(sum * (sx[r] * w_scale[n]) + b);
        }
      }
    }
  }
}

}  // namespace

bool fp8_gemv_fits(int64_t rows, int64_t K) {
  static_assert(kWarps * 32 * 2 * 8 >= 32 * kPiece * kMaxPiecesPerLane, "x staging covers every K the kernel takes");
  return rows >= 1 && rows <= kFp8GemvMaxRows && K % kPiece == 0 && K <= 32 * kPiece * kMaxPiecesPerLane &&
         rows * (K / kPiece) * kPieceStride * 4 <= kSharedBytes;
}

void launch_fp8_gemv(const __nv_bfloat16* x, int64_t ldx, int64_t rows, int64_t K, const uint8_t* wq, int64_t ldw,
                     const float* w_scale, const __nv_bfloat16* bias, int64_t nout, __nv_bfloat16* y, int64_t ldy,
                     cudaStream_t stream) {
  if (!fp8_gemv_fits(rows, K) || ldw % 16 || reinterpret_cast<uintptr_t>(wq) % 16 || ldx % 8 ||
      reinterpret_cast<uintptr_t>(x) % 16)
    fail("linear_fp8", "fp8_gemv", "shape or alignment the kernel does not take");
  // A few blocks per SM, each looping over features: every block stages x once, so fewer blocks stage it less.
  static const int sms = [] {
    int device = 0, count = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    return count > 0 ? count : 132;
  }();
  const int64_t per_block = int64_t(kWarps) * 2;
  const unsigned blocks = unsigned(std::min<int64_t>((nout + per_block - 1) / per_block, int64_t(sms) * 4));
  if (blocks == 0) return;
  const size_t shared = size_t(rows * (K / kPiece) * kPieceStride * 4);
  fp8_gemv_kernel<<<blocks, kWarps * 32, shared, stream>>>(x, ldx, int(rows), K, wq, ldw, w_scale,
                                                                          bias, nout, y, ldy);
  check_launch("linear_fp8", "fp8_gemv_kernel");
}

}  // namespace fluxswap::cuda
