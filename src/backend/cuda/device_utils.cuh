#pragma once
// Device helpers shared by the backend's kernels: bf16 vector loads and stores (VEC = 8 uses one 16-byte access),
// warp and block reductions, and the host-side test for when the 16-byte path is allowed.
#include <cuda_bf16.h>

#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/kernels.h"

namespace fluxswap::cuda {

// Eight bf16 values packed in 16 bytes, as float.
__device__ __forceinline__ void unpack_bf16x8(const uint4& raw, float (&v)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

template <int VEC>
__device__ inline void load_bf16(const __nv_bfloat16* p, float (&v)[VEC]) {
  if constexpr (VEC == 8) {
    unpack_bf16x8(*reinterpret_cast<const uint4*>(p), v);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = __bfloat162float(p[i]);
  }
}

template <int VEC>
__device__ inline void store_bf16(__nv_bfloat16* p, const float (&v)[VEC]) {
  if constexpr (VEC == 8) {
    uint4 raw;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = __float2bfloat16_rn(v[i]);
  }
}

struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {  // fmaxf skips NaN, like std::fmax in the CPU references
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <class Op>
__device__ inline float warp_reduce(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = Op()(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ inline float warp_sum(float v) { return warp_reduce<SumOp>(v); }
__device__ inline float warp_max(float v) { return warp_reduce<MaxOp>(v); }

// Reduction over the block (blockDim.x a multiple of 32, at most 1024; every thread must call it); every thread
// gets the result. `scratch` holds 32 floats; the trailing barrier lets the caller reuse it immediately. Max starts
// the missing warps at 0: the maxima taken here are of absolute values.
template <class Op>
__device__ inline float block_reduce(float v, float* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  v = warp_reduce<Op>(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x / 32) ? scratch[lane] : 0.0f;
  v = warp_reduce<Op>(v);
  __syncthreads();
  return v;
}
__device__ inline float block_sum(float v, float* scratch) { return block_reduce<SumOp>(v, scratch); }
__device__ inline float block_max(float v, float* scratch) { return block_reduce<MaxOp>(v, scratch); }

// Mean and 1 / sqrt(variance + eps) of one row of C values, the block's threads striding by VEC: two passes (the
// row stays in L1 between them, and the variance is taken around the mean, so it has no cancellation). Ends on a
// barrier, so the caller may overwrite the row afterwards.
template <int VEC>
__device__ inline float2 row_mean_rstd(const __nv_bfloat16* xr, int64_t C, float eps, float* scratch) {
  float v[VEC];
  float sum = 0.0f;
  for (int64_t c = threadIdx.x * VEC; c < C; c += int64_t(blockDim.x) * VEC) {
    load_bf16<VEC>(xr + c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += v[i];
  }
  const float mean = block_sum(sum, scratch) / float(C);
  float sq = 0.0f;
  for (int64_t c = threadIdx.x * VEC; c < C; c += int64_t(blockDim.x) * VEC) {
    load_bf16<VEC>(xr + c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sq += (v[i] - mean) * (v[i] - mean);
  }
  return make_float2(mean, rsqrtf(block_sum(sq, scratch) / float(C) + eps));
}

__device__ inline __nv_bfloat16* row_ptr(const RowsView& r, int64_t b, int64_t n) { return r.p + b * r.sb + n * r.sn; }

// Whether every row of a view starts on a 16-byte boundary and holds whole 8-element chunks.
inline bool vec8_ok(const void* p, int64_t C, int64_t sb, int64_t sn) {
  return C % 8 == 0 && sb % 8 == 0 && sn % 8 == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0;
}
inline bool vec8_ok(const RowsView& r) { return vec8_ok(r.p, r.C, r.sb, r.sn); }
inline bool vec8_ok(const VecsView& v) { return vec8_ok(v.p, v.C, v.sb, 0); }

// A grid for `work` independent items at `threads` per block, capped so a grid-stride loop covers the rest.
inline unsigned grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return unsigned(blocks < 1 ? 1 : blocks > (1 << 20) ? (1 << 20) : blocks);
}

// Row-wise elementwise work: thread i handles chunk i of VEC contiguous elements of the rows of `shape`, in order,
// calling op.apply<VEC>(b, n, c). VEC = 8 (16-byte accesses) when `vec8`, else 1. Kernels define the ops.
constexpr int kRowsThreads = 256;

template <int VEC, class Op>
__global__ void rows_kernel(Op op, int64_t N, int64_t chunks_per_row, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / chunks_per_row, c = (i - row * chunks_per_row) * VEC;
    const int64_t b = row / N;
    op.template apply<VEC>(b, row - b * N, c);
  }
}

template <class Op>
void launch_rows(const Op& op, const RowsView& shape, bool vec8, cudaStream_t stream, const char* name) {
  const int64_t rows = shape.B * shape.N;
  if (rows == 0 || shape.C == 0) return;
  if (vec8) {
    const int64_t total = rows * (shape.C / 8);
    rows_kernel<8><<<grid_for(total, kRowsThreads), kRowsThreads, 0, stream>>>(op, shape.N, shape.C / 8, total);
  } else {
    const int64_t total = rows * shape.C;
    rows_kernel<1><<<grid_for(total, kRowsThreads), kRowsThreads, 0, stream>>>(op, shape.N, shape.C, total);
  }
  check_launch(name, "rows_kernel");
}

}  // namespace fluxswap::cuda
