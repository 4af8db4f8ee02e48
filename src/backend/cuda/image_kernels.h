#pragma once
// Launchers for the VAE decoder's kernels on contiguous NCHW bf16 tensors (float32 math inside). Like kernels.h:
// they enqueue on `stream` without synchronising and throw Error naming the op when a launch fails.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fluxswap::cuda {

// GroupNorm over (C / groups, H, W) of x [B, C, H, W], affine weight/bias [C], then SiLU when `silu`; y may be x.
struct GroupNormArgs {
  const __nv_bfloat16 *x, *weight, *bias;
  __nv_bfloat16* y;
  int64_t B, C, HW, groups;
  float eps;
  bool silu;
};
// float2 entries of device scratch the launcher needs (per-chunk partial statistics, then per-group mean and
// 1/std); B * groups may be at most half of it.
constexpr int64_t kGroupNormScratch = int64_t(1) << 16;
void launch_group_norm(const GroupNormArgs& args, float2* scratch, cudaStream_t stream);

// y [planes, 2H, 2W] = x [planes, H, W] repeated 2x2.
void launch_upsample_nearest2x(const __nv_bfloat16* x, __nv_bfloat16* y, int64_t planes, int64_t H, int64_t W,
                               cudaStream_t stream, const char* op);

// y [B, C, R] = x [B, R, C] transposed in 64x64 tiles through shared memory; y must not overlap x.
void launch_transpose_last2(const __nv_bfloat16* x, __nv_bfloat16* y, int64_t B, int64_t R, int64_t C,
                            cudaStream_t stream, const char* op);

// y[b, c, :] += bias[c] for y [B, C, HW]: the bias of a convolution that cuDNN could not fuse.
void launch_channel_bias(__nv_bfloat16* y, const __nv_bfloat16* bias, int64_t B, int64_t C, int64_t HW,
                         cudaStream_t stream, const char* op);

// y [B, Cout, Ho, Wo] = conv2d(x [B, Cin, H, W], w [Cout, Cin, kh, kw]) + bias (may be null), stride 1, zero
// padding `pad`. The backend's own convolution for what cuDNN refuses or lacks: a direct convolution through
// shared memory, correct for any shape rather than fast.
struct ConvArgs {
  const __nv_bfloat16 *x, *w, *bias;
  __nv_bfloat16* y;
  int64_t B, Cin, H, W, Cout, kh, kw, pad;
  __host__ __device__ int64_t Ho() const { return H + 2 * pad - kh + 1; }
  __host__ __device__ int64_t Wo() const { return W + 2 * pad - kw + 1; }
};
void launch_direct_conv(const ConvArgs& args, cudaStream_t stream);

// The pipeline's decode tail (Backend::unpack_unscale_latents, Backend::image_to_u8), the same float32 arithmetic
// as the CPU reference (cpu_ops.h) on the bf16 values.
// out [B, C, h, w] = packed [B, (h/2)(w/2), 4C] unpacked, / scaling + shift; h and w even.
void launch_unpack_unscale_latents(const __nv_bfloat16* packed, __nv_bfloat16* out, int64_t B, int64_t C, int64_t h,
                                   int64_t w, float scaling, float shift, cudaStream_t stream, const char* op);
// out [B, HW, C] uint8 = round_half_even(clamp(x / 2 + 0.5, 0, 1) * 255) of image [B, C, HW], NaN -> 0.
void launch_image_to_u8(const __nv_bfloat16* image, uint8_t* out, int64_t B, int64_t C, int64_t HW,
                        cudaStream_t stream, const char* op);

}  // namespace fluxswap::cuda
