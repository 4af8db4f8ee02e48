// The text encoders' row kernels: LayerNorm and T5's RMSNorm (one block per row, float32 statistics), the token
// embedding lookup, the split into heads, activations, the gated product, and the sampler's mixed-dtype axpy.
// Elementwise kernels handle VEC contiguous elements per thread: 8 (16-byte accesses) when every operand allows.
#include <cmath>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_utils.cuh"
#include "backend/cuda/text_kernels.h"

namespace fluxswap::cuda {

namespace {

constexpr int kThreads = 256, kNormThreads = 128;

bool vec8_vector(const void* p, int64_t C) { return !p || vec8_ok(p, C, 0, 0); }

// ---- Norms: one block per row. The row stays in L1 between the passes, so rereading it costs no DRAM traffic
// and the variance is taken around the mean (no cancellation).

template <int VEC>
__global__ void __launch_bounds__(kNormThreads)
    layer_norm_kernel(RowsView x, const __nv_bfloat16* w, const __nv_bfloat16* bias, float eps, RowsView y) {
  __shared__ float scratch[32];
  const int64_t b = blockIdx.x / x.N, n = blockIdx.x - b * x.N, C = x.C;
  const __nv_bfloat16* xr = row_ptr(x, b, n);
  const float2 stats = row_mean_rstd<VEC>(xr, C, eps, scratch);
  const float mean = stats.x, inv = stats.y;
  float v[VEC];
  // Every thread has finished reading the row (block_sum ends on a barrier), so y may alias x.
  __nv_bfloat16* yr = row_ptr(y, b, n);
  for (int64_t c = threadIdx.x * VEC; c < C; c += kNormThreads * VEC) {
    float g[VEC], h[VEC];
    load_bf16<VEC>(xr + c, v);
    load_bf16<VEC>(w + c, g);
    if (bias) {
      load_bf16<VEC>(bias + c, h);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) h[i] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = (v[i] - mean) * inv * g[i] + h[i];
    store_bf16<VEC>(yr + c, v);
  }
}

template <int VEC>
__global__ void __launch_bounds__(kNormThreads)
    rms_norm_kernel(RowsView x, const __nv_bfloat16* w, float eps, RowsView y) {
  __shared__ float scratch[32];
  const int64_t b = blockIdx.x / x.N, n = blockIdx.x - b * x.N, C = x.C;
  const __nv_bfloat16* xr = row_ptr(x, b, n);
  float v[VEC];
  float ss = 0.0f;
  for (int64_t c = threadIdx.x * VEC; c < C; c += kNormThreads * VEC) {
    load_bf16<VEC>(xr + c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) ss += v[i] * v[i];
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / float(C) + eps);
  __nv_bfloat16* yr = row_ptr(y, b, n);
  for (int64_t c = threadIdx.x * VEC; c < C; c += kNormThreads * VEC) {
    float g[VEC];
    load_bf16<VEC>(xr + c, v);
    load_bf16<VEC>(w + c, g);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = (v[i] * inv) * g[i];  // T5LayerNorm's order: normalise, then scale
    store_bf16<VEC>(yr + c, v);
  }
}

unsigned row_blocks(const RowsView& x, const char* op) {
  const int64_t rows = x.B * x.N;
  if (rows > int64_t(INT32_MAX)) fail(op, "launch", "too many rows");
  return unsigned(rows);
}

__device__ inline float activate(float v, Activation act) {
  switch (act) {
    case Activation::None: return v;
    case Activation::GeluTanh: return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case Activation::Silu: return v / (1.0f + expf(-v));
    case Activation::QuickGelu: return v / (1.0f + expf(-1.702f * v));
  }
  return v;
}

struct ActivationOp {
  RowsView x, y;
  Activation act;
  template <int VEC>
  __device__ void apply(int64_t b, int64_t n, int64_t c) const {
    float v[VEC];
    load_bf16<VEC>(row_ptr(x, b, n) + c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = activate(v[i], act);
    store_bf16<VEC>(row_ptr(y, b, n) + c, v);
  }
};

struct MulOp {
  RowsView y, x;
  template <int VEC>
  __device__ void apply(int64_t b, int64_t n, int64_t c) const {
    float a[VEC], d[VEC];
    load_bf16<VEC>(row_ptr(y, b, n) + c, a);
    load_bf16<VEC>(row_ptr(x, b, n) + c, d);
#pragma unroll
    for (int i = 0; i < VEC; ++i) a[i] *= d[i];
    store_bf16<VEC>(row_ptr(y, b, n) + c, a);
  }
};

struct EmbeddingOp {
  const int32_t* ids;
  const __nv_bfloat16 *table, *positions;
  int64_t V;
  RowsView out;
  template <int VEC>
  __device__ void apply(int64_t b, int64_t s, int64_t c) const {
    const int32_t id = ids[b * out.N + s];
    float v[VEC];
    if (id < 0 || id >= V) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] = __int_as_float(0x7fc00000);  // NaN
    } else {
      load_bf16<VEC>(table + int64_t(id) * out.C + c, v);
      if (positions) {
        float p[VEC];
        load_bf16<VEC>(positions + s * out.C + c, p);
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] += p[i];
      }
    }
    store_bf16<VEC>(row_ptr(out, b, s) + c, v);
  }
};

// Row (b, s) of x is read once per head h; the head's D values land at out[b, h, s, :].
struct SplitHeadsOp {
  RowsView x;
  int64_t H, D;
  __nv_bfloat16* out;
  template <int VEC>
  __device__ void apply(int64_t b, int64_t s, int64_t c) const {
    const int64_t h = c / D, d = c - h * D;
    float v[VEC];
    load_bf16<VEC>(row_ptr(x, b, s) + c, v);
    store_bf16<VEC>(out + ((b * H + h) * x.N + s) * D + d, v);
  }
};

template <typename T>
__device__ inline float load_any(const T* p) {
  if constexpr (sizeof(T) == 2)
    return __bfloat162float(*p);
  else
    return *p;
}

template <typename TY, typename TX>
__global__ void axpy_kernel(AnyRows y, float alpha, AnyRows x, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / x.C, c = i - row * x.C, b = row / x.N, n = row - b * x.N;
    TY* yp = static_cast<TY*>(y.p) + b * y.sb + n * y.sn + c;
    const float v = load_any(yp) + alpha * load_any(static_cast<const TX*>(x.p) + b * x.sb + n * x.sn + c);
    if constexpr (sizeof(TY) == 2)
      *yp = __float2bfloat16_rn(v);
    else
      *yp = v;
  }
}

}  // namespace

void launch_layer_norm(const RowsView& x, const __nv_bfloat16* weight, const __nv_bfloat16* bias, float eps,
                       const RowsView& y, cudaStream_t stream) {
  if (x.B * x.N == 0 || x.C == 0) return;
  const unsigned blocks = row_blocks(x, "layer_norm");
  if (vec8_ok(x) && vec8_ok(y) && vec8_vector(weight, x.C) && vec8_vector(bias, x.C))
    layer_norm_kernel<8><<<blocks, kNormThreads, 0, stream>>>(x, weight, bias, eps, y);
  else
    layer_norm_kernel<1><<<blocks, kNormThreads, 0, stream>>>(x, weight, bias, eps, y);
  check_launch("layer_norm", "layer_norm_kernel");
}

void launch_rms_norm(const RowsView& x, const __nv_bfloat16* weight, float eps, const RowsView& y,
                     cudaStream_t stream) {
  if (x.B * x.N == 0 || x.C == 0) return;
  const unsigned blocks = row_blocks(x, "rms_norm");
  if (vec8_ok(x) && vec8_ok(y) && vec8_vector(weight, x.C))
    rms_norm_kernel<8><<<blocks, kNormThreads, 0, stream>>>(x, weight, eps, y);
  else
    rms_norm_kernel<1><<<blocks, kNormThreads, 0, stream>>>(x, weight, eps, y);
  check_launch("rms_norm", "rms_norm_kernel");
}

void launch_embedding(const int32_t* ids, const __nv_bfloat16* table, int64_t V, const __nv_bfloat16* positions,
                      const RowsView& out, cudaStream_t stream) {
  const bool vec8 = vec8_ok(out) && vec8_vector(table, out.C) && vec8_vector(positions, out.C);
  launch_rows(EmbeddingOp{ids, table, positions, V, out}, out, vec8, stream, "embedding");
}

void launch_split_heads(const RowsView& x, int64_t H, __nv_bfloat16* out, cudaStream_t stream) {
  const int64_t D = x.C / H;
  // A chunk of 8 must not straddle two heads.
  const bool vec8 = vec8_ok(x) && D % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  launch_rows(SplitHeadsOp{x, H, D, out}, x, vec8, stream, "split_heads");
}

void launch_activation(const RowsView& x, Activation act, const RowsView& y, cudaStream_t stream) {
  launch_rows(ActivationOp{x, y, act}, x, vec8_ok(x) && vec8_ok(y), stream, "activation");
}

void launch_mul(const RowsView& y, const RowsView& x, cudaStream_t stream) {
  launch_rows(MulOp{y, x}, x, vec8_ok(x) && vec8_ok(y), stream, "mul");
}

void launch_axpy(const AnyRows& y, float alpha, const AnyRows& x, cudaStream_t stream) {
  const int64_t total = x.B * x.N * x.C;
  if (total == 0) return;
  const unsigned grid = grid_for(total, kThreads);
  if (y.f32 && x.f32)
    axpy_kernel<float, float><<<grid, kThreads, 0, stream>>>(y, alpha, x, total);
  else if (y.f32)
    axpy_kernel<float, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(y, alpha, x, total);
  else if (x.f32)
    axpy_kernel<__nv_bfloat16, float><<<grid, kThreads, 0, stream>>>(y, alpha, x, total);
  else
    axpy_kernel<__nv_bfloat16, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(y, alpha, x, total);
  check_launch("axpy", "axpy_kernel");
}

}  // namespace fluxswap::cuda
