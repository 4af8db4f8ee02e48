#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>

#include "backend/cuda/device_utils.cuh"
#include "backend/cuda/fp8_quant_device.cuh"
#include "backend/cuda/fp8_quant_kernels.h"
#include "quant/fp8.h"

namespace fluxswap::cuda {

namespace {

// Rows that fit in shared memory (40 KiB, under the 48 KiB a block gets without opting in: up to 20480 values,
// every FLUX width) go there with cp.async: each thread issues all of its 16-byte copies before waiting for any,
// holds no registers for them, and reads its own chunks back for the max and again for the conversion, so a row
// crosses HBM once. At most 256
// threads a block keep several rows per SM in flight (FLUX's 15360-wide rows: 30 KiB, 7 per SM; 3072: 21), and one
// row's reduction and stores overlap the others' loads. The predecessor (registers, up to 1024 threads a row: one
// row per SM at 15360) spent its barriers with nothing else in flight and reached ~60% of HBM bandwidth.
constexpr int64_t kSmemRowBytes = 40 * 1024;
constexpr int kSmemMaxThreads = 256;
constexpr int kSmemChunksPerThread = 4;  // below 256 threads: few enough that rows of 3072 get 96 threads

// Rows wider than that: registers for the first 16384 values at up to 1024 threads a row, the rest re-read (from L2).
constexpr int kQuantCache = 2;
constexpr int kQuantMaxThreads = 1024;

__device__ inline void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}

// Completes this thread's cp.async copies and makes them visible to it (only to it: each thread reads back just
// the chunks it copied, so no barrier is needed).
__device__ inline void cp_async_wait_own() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

__global__ void __launch_bounds__(kSmemMaxThreads)
    quantize_rows_smem_kernel(const __nv_bfloat16* __restrict__ x, int64_t ldx, int chunks, uint8_t* __restrict__ q,
                              int64_t ldq, float* __restrict__ scales) {
  extern __shared__ uint4 row[];  // `chunks` 16-byte chunks of 8 values
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const __nv_bfloat16* xr = x + r * ldx;
  for (int i = threadIdx.x; i < chunks; i += blockDim.x) cp_async16(row + i, xr + int64_t(i) * 8);
  cp_async_wait_own();
  float amax = 0.0f;
  for (int i = threadIdx.x; i < chunks; i += blockDim.x) amax = fmaxf(amax, amax8(row[i]));
  const float scale = e4m3_row_scale_dev(block_max(amax, scratch)), inv = __frcp_rn(scale);
  if (threadIdx.x == 0) scales[r] = scale;
  uint8_t* qr = q + r * ldq;
  for (int i = threadIdx.x; i < chunks; i += blockDim.x)
    *reinterpret_cast<uint2*>(qr + int64_t(i) * 8) = quantize8(row[i], inv);
}

__global__ void __launch_bounds__(kQuantMaxThreads, 1) quantize_rows_vec8_kernel(const __nv_bfloat16* __restrict__ x, int64_t ldx, int64_t cols,
                                          uint8_t* __restrict__ q, int64_t ldq, float* __restrict__ scales) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const __nv_bfloat16* xr = x + r * ldx;
  uint8_t* qr = q + r * ldq;
  const int64_t first = int64_t(threadIdx.x) * 8, step = int64_t(blockDim.x) * 8;
  uint4 cache[kQuantCache];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kQuantCache; ++i) {
    const int64_t c = first + i * step;
    if (c < cols) {
      cache[i] = *reinterpret_cast<const uint4*>(xr + c);
      amax = fmaxf(amax, amax8(cache[i]));
    }
  }
  for (int64_t c = first + kQuantCache * step; c < cols; c += step)
    amax = fmaxf(amax, amax8(*reinterpret_cast<const uint4*>(xr + c)));
  const float scale = e4m3_row_scale_dev(block_max(amax, scratch)), inv = __frcp_rn(scale);
  if (threadIdx.x == 0) scales[r] = scale;
#pragma unroll
  for (int i = 0; i < kQuantCache; ++i) {
    const int64_t c = first + i * step;
    if (c < cols) *reinterpret_cast<uint2*>(qr + c) = quantize8(cache[i], inv);
  }
  for (int64_t c = first + kQuantCache * step; c < cols; c += step)
    *reinterpret_cast<uint2*>(qr + c) = quantize8(*reinterpret_cast<const uint4*>(xr + c), inv);
}

__global__ void __launch_bounds__(kQuantMaxThreads) quantize_rows_scalar_kernel(const __nv_bfloat16* __restrict__ x, int64_t ldx, int64_t cols,
                                            uint8_t* __restrict__ q, int64_t ldq, float* __restrict__ scales) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const __nv_bfloat16* xr = x + r * ldx;
  uint8_t* qr = q + r * ldq;
  float amax = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) amax = fmaxf(amax, fabsf(__bfloat162float(xr[c])));
  const float scale = e4m3_row_scale_dev(block_max(amax, scratch)), inv = __frcp_rn(scale);
  if (threadIdx.x == 0) scales[r] = scale;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) qr[c] = quantize1(__bfloat162float(xr[c]), inv);
}

// e4m3 -> half is exact (half has more exponent and mantissa bits), and so is half -> float.
__device__ inline float2 decode2(uint16_t pair) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(pair), __NV_E4M3);
  return __half22float2(__half2(h));
}

template <int VEC>
__global__ void dequantize_rows_kernel(const uint8_t* __restrict__ q, int64_t ldq, const float* __restrict__ scales,
                                       int64_t chunks_per_row, int64_t total, __nv_bfloat16* __restrict__ y,
                                       int64_t ldy) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / chunks_per_row, c = (i - r * chunks_per_row) * VEC;
    const float s = scales[r];
    float v[VEC];
    if constexpr (VEC == 8) {
      const uint2 raw = *reinterpret_cast<const uint2*>(q + r * ldq + c);
      const uint32_t words[2] = {raw.x, raw.y};
#pragma unroll
      for (int w = 0; w < 2; ++w)
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          const float2 f = decode2(uint16_t(words[w] >> (16 * p)));
          v[4 * w + 2 * p] = f.x * s;
          v[4 * w + 2 * p + 1] = f.y * s;
        }
    } else {
      v[0] = decode2(q[r * ldq + c]).x * s;
    }
    store_bf16<VEC>(y + r * ldy + c, v);
  }
}

// 16 e4m3 codes times one scale: their max |value|.
__device__ inline float amax16_e4m3(const uint4& raw, float scale) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  float m = 0.0f;
#pragma unroll
  for (int w = 0; w < 4; ++w)
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const float2 f = decode2(uint16_t(words[w] >> (16 * p)));
      m = fmaxf(m, fmaxf(fabsf(f.x), fabsf(f.y)));
    }
  return __fmul_rn(m, scale);  // rounding is monotonic: the max of the products
}

// The same 16 values (code * scale, rounded to float32) re-quantised at `inv`: 16 codes.
__device__ inline uint4 requantize16_e4m3(const uint4& raw, float scale, float inv) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  uint32_t out[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    uint32_t packed = 0;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const float2 f = decode2(uint16_t(words[w] >> (16 * p)));
      packed |= uint32_t(quantize1(__fmul_rn(f.x, scale), inv)) << (16 * p);
      packed |= uint32_t(quantize1(__fmul_rn(f.y, scale), inv)) << (16 * p + 8);
    }
    out[w] = packed;
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// Rows [a | b]: a as e4m3 codes with a scale per row (16 codes a chunk), b bf16 (8 values a chunk), staged in
// shared memory as quantize_rows_smem_kernel stages one row, so each crosses HBM once.
__global__ void __launch_bounds__(kSmemMaxThreads)
    quantize_joined_rows_smem_kernel(const uint8_t* __restrict__ a, int64_t lda, const float* __restrict__ a_scale,
                                     int a_chunks, const __nv_bfloat16* __restrict__ b, int64_t ldb, int b_chunks,
                                     uint8_t* __restrict__ q, int64_t ldq, float* __restrict__ scales) {
  extern __shared__ uint4 row[];
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const int chunks = a_chunks + b_chunks;
  for (int i = threadIdx.x; i < chunks; i += blockDim.x)
    cp_async16(row + i, i < a_chunks ? static_cast<const void*>(a + r * lda + int64_t(i) * 16)
                                     : static_cast<const void*>(b + r * ldb + int64_t(i - a_chunks) * 8));
  cp_async_wait_own();
  const float sa = a_scale[r];
  float amax = 0.0f;
  for (int i = threadIdx.x; i < chunks; i += blockDim.x)
    amax = fmaxf(amax, i < a_chunks ? amax16_e4m3(row[i], sa) : amax8(row[i]));
  const float scale = e4m3_row_scale_dev(block_max(amax, scratch)), inv = __frcp_rn(scale);
  if (threadIdx.x == 0) scales[r] = scale;
  uint8_t* qr = q + r * ldq;
  for (int i = threadIdx.x; i < chunks; i += blockDim.x) {
    if (i < a_chunks)
      *reinterpret_cast<uint4*>(qr + int64_t(i) * 16) = requantize16_e4m3(row[i], sa, inv);
    else
      *reinterpret_cast<uint2*>(qr + int64_t(a_chunks) * 16 + int64_t(i - a_chunks) * 8) = quantize8(row[i], inv);
  }
}

// The same, element by element (any widths and alignments).
__global__ void quantize_joined_rows_scalar_kernel(const uint8_t* __restrict__ a, int64_t lda,
                                                   const float* __restrict__ a_scale, int64_t ca,
                                                   const __nv_bfloat16* __restrict__ b, int64_t ldb, int64_t cb,
                                                   uint8_t* __restrict__ q, int64_t ldq, float* __restrict__ scales) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const float sa = a_scale[r];
  auto value = [&](int64_t c) {
    return c < ca ? __fmul_rn(decode2(a[r * lda + c]).x, sa) : __bfloat162float(b[r * ldb + c - ca]);
  };
  float amax = 0.0f;
  for (int64_t c = threadIdx.x; c < ca + cb; c += blockDim.x) amax = fmaxf(amax, fabsf(value(c)));
  const float scale = e4m3_row_scale_dev(block_max(amax, scratch)), inv = __frcp_rn(scale);
  if (threadIdx.x == 0) scales[r] = scale;
  for (int64_t c = threadIdx.x; c < ca + cb; c += blockDim.x) q[r * ldq + c] = quantize1(value(c), inv);
}

__device__ inline float gelu_tanh(float v) {
  return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

template <int VEC, bool F32>
__global__ void scale_epilogue_kernel(const void* acc, int64_t lda, const float* sx, const float* sw,
                                      const __nv_bfloat16* bias, bool gelu, int64_t chunks_per_row, int64_t total,
                                      __nv_bfloat16* y, int64_t ldy) {
  // No __restrict__: acc may be y.
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / chunks_per_row, c = (i - t * chunks_per_row) * VEC;
    float v[VEC];
    if constexpr (F32) {
      const float* a = static_cast<const float*>(acc) + t * lda + c;
      if constexpr (VEC == 8) {
        const float4 lo = reinterpret_cast<const float4*>(a)[0], hi = reinterpret_cast<const float4*>(a)[1];
        v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
      } else {
        v[0] = a[0];
      }
    } else {
      load_bf16<VEC>(static_cast<const __nv_bfloat16*>(acc) + t * lda + c, v);
    }
    const float s_row = sx ? sx[t] : 1.0f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float o = v[j] * (sw ? s_row * sw[c + j] : s_row);
      if (bias) o += __bfloat162float(bias[c + j]);
      v[j] = gelu ? gelu_tanh(o) : o;
    }
    store_bf16<VEC>(y + t * ldy + c, v);
  }
}

__device__ inline void gated_factor(const __nv_bfloat16* gate, const float* sw, const __nv_bfloat16* bias, int64_t o,
                                    float* scale_out, __nv_bfloat16* bias_out) {
  const float g = __bfloat162float(gate[o]);
  scale_out[o] = g * sw[o];
  if (bias) bias_out[o] = __float2bfloat16(g * __bfloat162float(bias[o]));
}

// blockIdx.y: the item; x: grid-stride over its B * n factors.
__global__ void gated_output_factors_kernel(const __grid_constant__ GatedFactorsBatch batch) {
  const GatedFactorsItem& it = batch.item[blockIdx.y];
  const int64_t B = batch.B;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * it.n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / it.n, o = i - b * it.n;
    gated_factor(it.gate + b * it.gate_sb, it.sw, it.bias, o, it.scale + b * it.n,
                 it.bias_out ? it.bias_out + b * it.n : nullptr);
  }
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int round_up_32(int64_t n) { return int((n + 31) / 32 * 32); }

}  // namespace

void launch_quantize_rows_e4m3(const __nv_bfloat16* x, int64_t ldx, int64_t rows, int64_t cols, uint8_t* q,
                               int64_t ldq, float* scales, cudaStream_t stream, const char* op) {
  if (rows == 0) return;
  if (rows > int64_t(0x7fffffff)) fail(op, "launch_quantize_rows_e4m3", "too many rows for one grid");
  if (cols == 0) {
    // No values: the floor scale, as the reference gives.
    quantize_rows_scalar_kernel<<<unsigned(rows), 32, 0, stream>>>(x, ldx, 0, q, ldq, scales);
    check_launch(op, "quantize_rows_scalar_kernel");
    return;
  }
  const bool vec = cols % 8 == 0 && ldx % 8 == 0 && aligned(x, 16) && ldq % 8 == 0 && aligned(q, 8);
  if (vec && cols * 2 <= kSmemRowBytes) {
    // All the shared memory the rows ask for, so their count per SM is what limits it (a preference, set once).
    static const bool carveout = [] {
      if (cudaFuncSetAttribute(quantize_rows_smem_kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               int(cudaSharedmemCarveoutMaxShared)) != cudaSuccess)
        cudaGetLastError();  // only a preference: the launch below works without it
      return true;
    }();
    (void)carveout;
    const int chunks = int(cols / 8);
    const int threads =
        std::clamp(round_up_32((chunks + kSmemChunksPerThread - 1) / kSmemChunksPerThread), 32, kSmemMaxThreads);
    quantize_rows_smem_kernel<<<unsigned(rows), threads, size_t(cols) * 2, stream>>>(x, ldx, chunks, q, ldq,
                                                                                      scales);
    check_launch(op, "quantize_rows_smem_kernel");
  } else if (vec) {
    const int threads = std::clamp(round_up_32((cols / 8 + kQuantCache - 1) / kQuantCache), 32, kQuantMaxThreads);
    quantize_rows_vec8_kernel<<<unsigned(rows), threads, 0, stream>>>(x, ldx, cols, q, ldq, scales);
    check_launch(op, "quantize_rows_vec8_kernel");
  } else {
    const int threads = std::clamp(round_up_32((cols + 7) / 8), 32, 256);
    quantize_rows_scalar_kernel<<<unsigned(rows), threads, 0, stream>>>(x, ldx, cols, q, ldq, scales);
    check_launch(op, "quantize_rows_scalar_kernel");
  }
}

void launch_quantize_joined_rows_e4m3(const uint8_t* a, int64_t lda, const float* a_scale, int64_t ca,
                                     const __nv_bfloat16* b, int64_t ldb, int64_t cb, int64_t rows, uint8_t* q,
                                     int64_t ldq, float* scales, cudaStream_t stream, const char* op) {
  if (rows == 0) return;
  if (rows > int64_t(0x7fffffff)) fail(op, "launch_quantize_joined_rows_e4m3", "too many rows for one grid");
  const bool vec = ca % 16 == 0 && lda % 16 == 0 && aligned(a, 16) && cb % 8 == 0 && ldb % 8 == 0 && aligned(b, 16) &&
                   ldq % 16 == 0 && aligned(q, 16);
  if (vec && ca + cb * 2 <= kSmemRowBytes && ca + cb > 0) {
    static const bool carveout = [] {
      if (cudaFuncSetAttribute(quantize_joined_rows_smem_kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               int(cudaSharedmemCarveoutMaxShared)) != cudaSuccess)
        cudaGetLastError();  // only a preference
      return true;
    }();
    (void)carveout;
    const int a_chunks = int(ca / 16), b_chunks = int(cb / 8);
    const int threads = std::clamp(
        round_up_32((a_chunks + b_chunks + kSmemChunksPerThread - 1) / kSmemChunksPerThread), 32, kSmemMaxThreads);
    quantize_joined_rows_smem_kernel<<<unsigned(rows), threads, size_t(ca + cb * 2), stream>>>(
        a, lda, a_scale, a_chunks, b, ldb, b_chunks, q, ldq, scales);
    check_launch(op, "quantize_joined_rows_smem_kernel");
    return;
  }
  const int threads = std::clamp(round_up_32((ca + cb + 7) / 8), 32, 256);
  quantize_joined_rows_scalar_kernel<<<unsigned(rows), threads, 0, stream>>>(a, lda, a_scale, ca, b, ldb, cb, q, ldq,
                                                                             scales);
  check_launch(op, "quantize_joined_rows_scalar_kernel");
}

void launch_dequantize_rows_e4m3(const uint8_t* q, int64_t ldq, const float* scales, int64_t rows, int64_t cols,
                                 __nv_bfloat16* y, int64_t ldy, cudaStream_t stream, const char* op) {
  if (rows == 0 || cols == 0) return;
  constexpr int kThreads = 256;
  if (cols % 8 == 0 && ldq % 8 == 0 && aligned(q, 8) && ldy % 8 == 0 && aligned(y, 16)) {
    const int64_t total = rows * (cols / 8);
    dequantize_rows_kernel<8><<<grid_for(total, kThreads), kThreads, 0, stream>>>(q, ldq, scales, cols / 8, total,
                                                                                 y, ldy);
  } else {
    const int64_t total = rows * cols;
    dequantize_rows_kernel<1><<<grid_for(total, kThreads), kThreads, 0, stream>>>(q, ldq, scales, cols, total, y,
                                                                                 ldy);
  }
  check_launch(op, "dequantize_rows_kernel");
}

void launch_fp8_scale_epilogue(const Fp8Accumulator& acc, const float* sx, const float* sw,
                               const __nv_bfloat16* bias, bool gelu, int64_t rows, int64_t cols, __nv_bfloat16* y,
                               int64_t ldy, cudaStream_t stream, const char* op) {
  if (rows == 0 || cols == 0) return;
  constexpr int kThreads = 256;
  const bool vec = cols % 8 == 0 && ldy % 8 == 0 && aligned(y, 16) && aligned(acc.p, 16) &&
                   acc.ld % (acc.f32 ? 4 : 8) == 0;
  const int64_t chunks = vec ? cols / 8 : cols, total = rows * chunks;
  const unsigned grid = grid_for(total, kThreads);
  if (vec && acc.f32)
    scale_epilogue_kernel<8, true><<<grid, kThreads, 0, stream>>>(acc.p, acc.ld, sx, sw, bias, gelu, chunks, total,
                                                                  y, ldy);
  else if (vec)
    scale_epilogue_kernel<8, false><<<grid, kThreads, 0, stream>>>(acc.p, acc.ld, sx, sw, bias, gelu, chunks, total,
                                                                   y, ldy);
  else if (acc.f32)
    scale_epilogue_kernel<1, true><<<grid, kThreads, 0, stream>>>(acc.p, acc.ld, sx, sw, bias, gelu, chunks, total,
                                                                  y, ldy);
  else
    scale_epilogue_kernel<1, false><<<grid, kThreads, 0, stream>>>(acc.p, acc.ld, sx, sw, bias, gelu, chunks, total,
                                                                   y, ldy);
  check_launch(op, "scale_epilogue_kernel");
}

void launch_gated_output_factors(const GatedFactorsBatch& batch, cudaStream_t stream, const char* op) {
  if (batch.n_items == 0 || batch.B * batch.max_n == 0) return;
  if (batch.n_items > kGatedFactorsPerLaunch) fail(op, "launch_gated_output_factors", "too many items in one launch");
  constexpr int kThreads = 256;
  const dim3 grid(grid_for(batch.B * batch.max_n, kThreads), unsigned(batch.n_items));
  gated_output_factors_kernel<<<grid, kThreads, 0, stream>>>(batch);
  check_launch(op, "gated_output_factors_kernel");
}

}  // namespace fluxswap::cuda
