// Row-wise elementwise ops (silu, add, gated residual), the sinusoidal timestep embedding and fill_normal.
// Each thread handles one chunk of VEC contiguous elements of a row; VEC = 8 (16-byte accesses) whenever every
// operand's rows are 16-byte aligned, else 1.
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_utils.cuh"
#include "backend/cuda/gated_residual_device.cuh"
#include "core/counter_rng.h"

namespace fluxswap::cuda {

namespace {

constexpr int kThreads = 256;

struct AddOp {
  RowsView y, x;
  template <int VEC>
  __device__ void apply(int64_t b, int64_t n, int64_t c) const {
    float a[VEC], d[VEC];
    load_bf16<VEC>(row_ptr(y, b, n) + c, a);
    load_bf16<VEC>(row_ptr(x, b, n) + c, d);
#pragma unroll
    for (int i = 0; i < VEC; ++i) a[i] += d[i];
    store_bf16<VEC>(row_ptr(y, b, n) + c, a);
  }
};

struct GatedResidualOp {
  RowsView x;
  VecsView gate;
  RowsView y;
  template <int VEC>
  __device__ void apply(int64_t b, int64_t n, int64_t c) const {
    float a[VEC], g[VEC], d[VEC];
    load_bf16<VEC>(row_ptr(x, b, n) + c, a);
    load_bf16<VEC>(gate.p + b * gate.sb + c, g);
    load_bf16<VEC>(row_ptr(y, b, n) + c, d);
#pragma unroll
    for (int i = 0; i < VEC; ++i) a[i] = gated_residual_value(a[i], g[i], d[i]);
    store_bf16<VEC>(row_ptr(x, b, n) + c, a);
  }
};

__global__ void timestep_embedding_kernel(const float* t, float t_scale, RowsView out, int64_t half, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / half, j = i - row * half;
    const int64_t b = row / out.N, n = row - b * out.N;
    // Frequencies and the product in float32, as the reference computes them.
    const float f = expf(-logf(10000.0f) * float(j) / float(half));
    const float arg = t[row] * t_scale * f;
    __nv_bfloat16* r = row_ptr(out, b, n);
    r[j] = __float2bfloat16_rn(cosf(arg));
    r[half + j] = __float2bfloat16_rn(sinf(arg));
  }
}

template <typename T>
__global__ void fill_normal_kernel(T* p, int64_t n, uint64_t seed, float mean, float std) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = mean + std * normal_from_counter(seed, uint64_t(i));
    if constexpr (sizeof(T) == 2)
      p[i] = __float2bfloat16_rn(v);
    else
      p[i] = v;
  }
}

}  // namespace

void launch_add(const RowsView& y, const RowsView& x, cudaStream_t stream) {
  launch_rows(AddOp{y, x}, x, vec8_ok(x) && vec8_ok(y), stream, "add");
}

void launch_gated_residual(const RowsView& x, const VecsView& gate, const RowsView& y, cudaStream_t stream) {
  launch_rows(GatedResidualOp{x, gate, y}, x, vec8_ok(x) && vec8_ok(gate) && vec8_ok(y), stream, "gated_residual");
}

void launch_timestep_embedding(const float* t, float t_scale, const RowsView& out, cudaStream_t stream) {
  const int64_t half = out.C / 2, total = out.B * out.N * half;
  if (total == 0) return;
  timestep_embedding_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(t, t_scale, out, half, total);
  check_launch("timestep_embedding", "timestep_embedding_kernel");
}

void launch_fill_normal(void* p, bool bf16, int64_t n, uint64_t seed, float mean, float std, cudaStream_t stream) {
  if (n == 0) return;
  if (bf16)
    fill_normal_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(static_cast<__nv_bfloat16*>(p), n, seed, mean,
                                                                        std);
  else
    fill_normal_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(static_cast<float*>(p), n, seed, mean, std);
  check_launch("fill_normal", "fill_normal_kernel");
}

}  // namespace fluxswap::cuda
