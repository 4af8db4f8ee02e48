// The VAE's memory-bound kernels on NCHW bf16 tensors: GroupNorm (+ SiLU), nearest 2x upsampling, the [B, R, C]
// transpose and a per-channel bias add; and the pipeline's decode tail around the VAE (latent unpacking, uint8).
#include <algorithm>
#include <string>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_utils.cuh"
#include "backend/cuda/image_kernels.h"

namespace fluxswap::cuda {

namespace {

constexpr int kThreads = 256;

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------------------------
// GroupNorm. A group of the decoder's 1024x1024 layers holds 4M values while there are only 32 groups, so one
// block per group would leave most of the GPU idle: the statistics are instead taken per chunk of a group by many
// blocks (mean, then the squared deviations from it, so no cancellation), merged per group in double precision
// (Chan's formula), and applied by a grid-wide elementwise pass. The statistics are complete before the pass
// writes anything, so y may alias x.

constexpr int64_t kStatsChunk = 16384;  // values per partial: 8 strides of a 256-thread block with 8-wide loads
constexpr int64_t kMaxSplits = 1024;

template <int VEC>
__global__ void __launch_bounds__(kThreads)
    group_norm_stats_kernel(const __nv_bfloat16* x, int64_t n, int64_t chunk, float2* partials) {
  __shared__ float scratch[32];
  const __nv_bfloat16* xs = x + int64_t(blockIdx.y) * n;  // the groups of all samples lie back to back
  const int64_t begin = int64_t(blockIdx.x) * chunk, end = min(begin + chunk, n);
  float v[VEC];
  float sum = 0.0f;
  for (int64_t i = begin + threadIdx.x * VEC; i < end; i += kThreads * VEC) {
    load_bf16<VEC>(xs + i, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += v[k];
  }
  const float mean = block_sum(sum, scratch) / float(end - begin);
  float sq = 0.0f;
  for (int64_t i = begin + threadIdx.x * VEC; i < end; i += kThreads * VEC) {  // the chunk is still in L1/L2
    load_bf16<VEC>(xs + i, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) sq += (v[k] - mean) * (v[k] - mean);
  }
  const float m2 = block_sum(sq, scratch);
  if (threadIdx.x == 0) partials[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = make_float2(mean, m2);
}

// One thread per group: stats[g] = (mean, 1 / sqrt(var + eps)).
__global__ void group_norm_finalize_kernel(const float2* partials, int64_t groups_total, int64_t splits, int64_t n,
                                           int64_t chunk, float eps, float2* stats) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g >= groups_total) return;
  double count = 0, mean = 0, m2 = 0;
  for (int64_t s = 0; s < splits; ++s) {
    const float2 p = partials[g * splits + s];
    const double nb = double(min(chunk, n - s * chunk)), total = count + nb, delta = double(p.x) - mean;
    mean += delta * nb / total;
    m2 += double(p.y) + delta * delta * count * nb / total;
    count = total;
  }
  stats[g] = make_float2(float(mean), float(1.0 / sqrt(m2 / double(n) + double(eps))));
}

template <int VEC>
__global__ void group_norm_apply_kernel(GroupNormArgs a, const float2* stats, int64_t total) {
  const int64_t cg = a.C / a.groups;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i * VEC, plane = e / a.HW, c = plane % a.C;  // VEC divides HW: a chunk is in one plane
    const float2 s = stats[(plane / a.C) * a.groups + c / cg];
    const float scale = s.y * __bfloat162float(a.weight[c]);
    const float shift = __bfloat162float(a.bias[c]) - s.x * scale;
    float v[VEC];
    load_bf16<VEC>(a.x + e, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v[k] = v[k] * scale + shift;
      if (a.silu) v[k] = v[k] / (1.0f + __expf(-v[k]));
    }
    store_bf16<VEC>(a.y + e, v);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Upsampling: each thread reads VEC pixels of an input row and writes them doubled to two output rows (input row
// p * H + i becomes output rows 2 (p * H + i) and 2 (p * H + i) + 1).

template <int VEC>
__global__ void upsample_kernel(const __nv_bfloat16* x, __nv_bfloat16* y, int64_t W, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i * VEC, row = e / W, j = e - row * W;
    __nv_bfloat16* out = y + 2 * row * 2 * W + 2 * j;
    if constexpr (VEC == 4) {  // 8-byte load, two 16-byte stores
      const uint2 raw = *reinterpret_cast<const uint2*>(x + e);
      const __nv_bfloat16* in = reinterpret_cast<const __nv_bfloat16*>(&raw);
      uint4 doubled;
      __nv_bfloat162* d = reinterpret_cast<__nv_bfloat162*>(&doubled);
#pragma unroll
      for (int k = 0; k < 4; ++k) d[k] = __halves2bfloat162(in[k], in[k]);
      *reinterpret_cast<uint4*>(out) = doubled;
      *reinterpret_cast<uint4*>(out + 2 * W) = doubled;
    } else {
      const __nv_bfloat16 v = x[e];
      out[0] = out[1] = out[2 * W] = out[2 * W + 1] = v;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Transpose: a 64x64 tile goes through shared memory so that both the reads (along C) and the writes (along R) are
// coalesced; each thread moves element pairs. PAIRS: R and C even and 4-byte aligned rows, so pairs are single
// 4-byte accesses; otherwise the pair's halves are read and written separately with bounds checks. The tile's
// row pitch of 66 keeps the 4-byte shared stores aligned and the column reads at most 2-way bank conflicted.

constexpr int kTile = 64, kTileRowsPerPass = 8;

template <bool PAIRS>
__global__ void __launch_bounds__(32 * kTileRowsPerPass)
    transpose_kernel(const __nv_bfloat16* x, __nv_bfloat16* y, int64_t B, int64_t R, int64_t C) {
  __shared__ __align__(4) __nv_bfloat16 tile[kTile][kTile + 2];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const __nv_bfloat16 zero = __float2bfloat16(0.0f);
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z)
    for (int64_t r0 = int64_t(blockIdx.y) * kTile; r0 < R; r0 += int64_t(gridDim.y) * kTile) {
      const int64_t c0 = int64_t(blockIdx.x) * kTile;
      const __nv_bfloat16* xs = x + b * R * C;
      __nv_bfloat16* ys = y + b * R * C;
      for (int rr = ty; rr < kTile; rr += kTileRowsPerPass) {
        const int64_t r = r0 + rr, c = c0 + 2 * tx;
        __nv_bfloat162 v = __halves2bfloat162(zero, zero);
        if (r < R && c < C) {
          if constexpr (PAIRS) {
            v = *reinterpret_cast<const __nv_bfloat162*>(xs + r * C + c);
          } else {
            v.x = xs[r * C + c];
            if (c + 1 < C) v.y = xs[r * C + c + 1];
          }
        }
        *reinterpret_cast<__nv_bfloat162*>(&tile[rr][2 * tx]) = v;
      }
      __syncthreads();
      for (int cc = ty; cc < kTile; cc += kTileRowsPerPass) {
        const int64_t c = c0 + cc, r = r0 + 2 * tx;
        if (c >= C || r >= R) continue;
        const __nv_bfloat162 v = __halves2bfloat162(tile[2 * tx][cc], tile[2 * tx + 1][cc]);
        if constexpr (PAIRS) {
          *reinterpret_cast<__nv_bfloat162*>(ys + c * R + r) = v;
        } else {
          ys[c * R + r] = v.x;
          if (r + 1 < R) ys[c * R + r + 1] = v.y;
        }
      }
      __syncthreads();
    }
}

__global__ void channel_bias_kernel(__nv_bfloat16* y, const __nv_bfloat16* bias, int64_t C, int64_t HW,
                                   int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16(__bfloat162float(y[i]) + __bfloat162float(bias[(i / HW) % C]));
}

// ---------------------------------------------------------------------------------------------------------------
// The decode tail. Both are a few megabytes at 1024x1024, so one element (unpacking) or one pixel (uint8) per thread
// is enough. The arithmetic is the CPU reference's (cpu_ops.h: unscale_latent, unit_pixel, u8_pixel) with correctly
// rounded operations that nvcc may neither approximate nor contract into an FMA, so on the same bf16 values both
// compute the same floats; the unpacked latents are then rounded to bf16.

__global__ void unpack_unscale_kernel(const __nv_bfloat16* packed, __nv_bfloat16* out, int64_t C, int64_t h,
                                      int64_t w, float scaling, float shift, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = i % w, y = (i / w) % h, c = (i / (w * h)) % C, b = i / (w * h * C);
    const int64_t token = (b * (h / 2) + y / 2) * (w / 2) + x / 2;
    const float v = __bfloat162float(packed[token * 4 * C + c * 4 + (y % 2) * 2 + x % 2]);
    out[i] = __float2bfloat16_rn(__fadd_rn(__fdiv_rn(v, scaling), shift));
  }
}

__global__ void image_to_u8_kernel(const __nv_bfloat16* image, uint8_t* out, int64_t C, int64_t HW, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / HW, p = i - b * HW;
    for (int64_t c = 0; c < C; ++c) {
      float v = __fadd_rn(__fdiv_rn(__bfloat162float(image[(b * C + c) * HW + p]), 2.0f), 0.5f);
      if (!isnan(v)) v = fminf(fmaxf(v, 0.0f), 1.0f);
      v = __fmul_rn(v, 255.0f);
      out[i * C + c] = isnan(v) ? uint8_t(0) : uint8_t(rintf(v));  // rintf: half to even, as numpy rounds
    }
  }
}

}  // namespace

void launch_group_norm(const GroupNormArgs& a, float2* scratch, cudaStream_t stream) {
  const char* op = "group_norm";
  const int64_t groups_total = a.B * a.groups, n = (a.C / a.groups) * a.HW;
  if (groups_total == 0 || n == 0) return;
  if (2 * groups_total > kGroupNormScratch)
    fail(op, "launch", std::to_string(groups_total) + " (sample, group) pairs exceed the statistics scratch");
  float2 *stats = scratch, *partials = scratch + groups_total;
  const int64_t max_splits = std::min(kMaxSplits, (kGroupNormScratch - groups_total) / groups_total);
  int64_t splits = std::clamp(ceil_div(n, kStatsChunk), int64_t(1), max_splits);
  const int64_t chunk = ceil_div(ceil_div(n, splits), 8) * 8;  // whole 8-wide loads per chunk
  splits = ceil_div(n, chunk);
  const dim3 grid{unsigned(splits), unsigned(groups_total)};
  if (n % 8 == 0 && aligned(a.x, 16))
    group_norm_stats_kernel<8><<<grid, kThreads, 0, stream>>>(a.x, n, chunk, partials);
  else
    group_norm_stats_kernel<1><<<grid, kThreads, 0, stream>>>(a.x, n, chunk, partials);
  check_launch(op, "group_norm_stats_kernel");
  group_norm_finalize_kernel<<<unsigned(ceil_div(groups_total, 128)), 128, 0, stream>>>(partials, groups_total,
                                                                                       splits, n, chunk, a.eps, stats);
  check_launch(op, "group_norm_finalize_kernel");
  const int64_t total = a.B * a.C * a.HW;
  if (a.HW % 8 == 0 && aligned(a.x, 16) && aligned(a.y, 16))
    group_norm_apply_kernel<8><<<grid_for(total / 8, kThreads), kThreads, 0, stream>>>(a, stats, total / 8);
  else
    group_norm_apply_kernel<1><<<grid_for(total, kThreads), kThreads, 0, stream>>>(a, stats, total);
  check_launch(op, "group_norm_apply_kernel");
}

void launch_upsample_nearest2x(const __nv_bfloat16* x, __nv_bfloat16* y, int64_t planes, int64_t H, int64_t W,
                               cudaStream_t stream, const char* op) {
  const int64_t total = planes * H * W;
  if (total == 0) return;
  if (W % 4 == 0 && aligned(x, 8) && aligned(y, 16))
    upsample_kernel<4><<<grid_for(total / 4, kThreads), kThreads, 0, stream>>>(x, y, W, total / 4);
  else
    upsample_kernel<1><<<grid_for(total, kThreads), kThreads, 0, stream>>>(x, y, W, total);
  check_launch(op, "upsample_kernel");
}

void launch_transpose_last2(const __nv_bfloat16* x, __nv_bfloat16* y, int64_t B, int64_t R, int64_t C,
                            cudaStream_t stream, const char* op) {
  if (B == 0 || R == 0 || C == 0) return;
  if (ceil_div(C, kTile) > INT32_MAX) fail(op, "launch", "rows too long to transpose");
  const dim3 grid(unsigned(ceil_div(C, kTile)), unsigned(std::min<int64_t>(ceil_div(R, kTile), 65535)),
                  unsigned(std::min<int64_t>(B, 65535)));
  const dim3 block(32, kTileRowsPerPass);
  if (R % 2 == 0 && C % 2 == 0 && aligned(x, 4) && aligned(y, 4))
    transpose_kernel<true><<<grid, block, 0, stream>>>(x, y, B, R, C);
  else
    transpose_kernel<false><<<grid, block, 0, stream>>>(x, y, B, R, C);
  check_launch(op, "transpose_kernel");
}

void launch_channel_bias(__nv_bfloat16* y, const __nv_bfloat16* bias, int64_t B, int64_t C, int64_t HW,
                         cudaStream_t stream, const char* op) {
  const int64_t total = B * C * HW;
  if (total == 0) return;
  channel_bias_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(y, bias, C, HW, total);
  check_launch(op, "channel_bias_kernel");
}

void launch_unpack_unscale_latents(const __nv_bfloat16* packed, __nv_bfloat16* out, int64_t B, int64_t C, int64_t h,
                                   int64_t w, float scaling, float shift, cudaStream_t stream, const char* op) {
  const int64_t total = B * C * h * w;
  if (total == 0) return;
  unpack_unscale_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(packed, out, C, h, w, scaling, shift,
                                                                          total);
  check_launch(op, "unpack_unscale_kernel");
}

void launch_image_to_u8(const __nv_bfloat16* image, uint8_t* out, int64_t B, int64_t C, int64_t HW,
                        cudaStream_t stream, const char* op) {
  const int64_t total = B * HW;
  if (total == 0 || C == 0) return;
  image_to_u8_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(image, out, C, HW, total);
  check_launch(op, "image_to_u8_kernel");
}

}  // namespace fluxswap::cuda
