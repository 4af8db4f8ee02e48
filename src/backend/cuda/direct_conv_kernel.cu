// The backend's own convolution (stride 1, zero padding, NCHW bf16, float32 accumulation): the fallback for the
// shapes cuDNN refuses (the tiny test VAEs' 4 -> 16 or 8 -> 3 channels) and for builds without cuDNN. Written to be
// obviously correct for any kernel size rather than fast: a block computes a 16x16 tile of output pixels for 8
// output channels, one pixel per thread, stepping through the input channels 4 at a time with the input tile (plus
// its halo) and the matching weights staged in shared memory.
#include <string>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/image_kernels.h"

namespace fluxswap::cuda {

namespace {

constexpr int kOutTile = 16;
constexpr int kThreads = kOutTile * kOutTile;
constexpr int kCoPerBlock = 8;  // two float4 weight reads per input value
constexpr int kCiPerStage = 4;
constexpr size_t kMaxSharedBytes = 48 * 1024;  // the default limit: no opt-in needed on any architecture

size_t shared_bytes(int64_t kh, int64_t kw) {
  const int64_t taps = kh * kw, tile = (kOutTile + kh - 1) * (kOutTile + kw - 1);
  return size_t(kCiPerStage * (taps * kCoPerBlock + tile)) * sizeof(float);
}

__global__ void __launch_bounds__(kThreads) direct_conv_kernel(ConvArgs a, int64_t tiles_x) {
  extern __shared__ float4 smem4[];
  const int kh = int(a.kh), kw = int(a.kw), taps = kh * kw;
  const int th = kOutTile + kh - 1, tw = kOutTile + kw - 1;
  // Weights first, [ci * taps + tap][co] with the 8 output channels contiguous (32-byte rows for float4 reads);
  // then the input tiles [ci][th][tw].
  float* w_tile = reinterpret_cast<float*>(smem4);
  float* in_tile = w_tile + kCiPerStage * taps * kCoPerBlock;
  const int64_t Ho = a.Ho(), Wo = a.Wo();
  const int64_t oy0 = int64_t(blockIdx.x / tiles_x) * kOutTile, ox0 = int64_t(blockIdx.x % tiles_x) * kOutTile;
  const int64_t co0 = int64_t(blockIdx.y) * kCoPerBlock, b = blockIdx.z;
  const int ly = threadIdx.x / kOutTile, lx = threadIdx.x % kOutTile;
  float acc[kCoPerBlock] = {};
  for (int64_t ci0 = 0; ci0 < a.Cin; ci0 += kCiPerStage) {
    for (int i = threadIdx.x; i < kCiPerStage * th * tw; i += kThreads) {
      const int ci = i / (th * tw), r = i - ci * th * tw, ty = r / tw, tx = r - ty * tw;
      const int64_t iy = oy0 + ty - a.pad, ix = ox0 + tx - a.pad;
      float v = 0.0f;  // the zero padding, and the channels past Cin in the last stage
      if (ci0 + ci < a.Cin && iy >= 0 && iy < a.H && ix >= 0 && ix < a.W)
        v = __bfloat162float(a.x[((b * a.Cin + ci0 + ci) * a.H + iy) * a.W + ix]);
      in_tile[i] = v;
    }
    for (int i = threadIdx.x; i < kCiPerStage * taps * kCoPerBlock; i += kThreads) {
      const int co = i % kCoPerBlock, k = i / kCoPerBlock, ci = k / taps, tap = k - ci * taps;
      float v = 0.0f;
      if (co0 + co < a.Cout && ci0 + ci < a.Cin)
        v = __bfloat162float(a.w[((co0 + co) * a.Cin + ci0 + ci) * taps + tap]);
      w_tile[i] = v;
    }
    __syncthreads();
    for (int ci = 0; ci < kCiPerStage; ++ci)
      for (int ky = 0; ky < kh; ++ky)
        for (int kx = 0; kx < kw; ++kx) {
          const float v = in_tile[(ci * th + ly + ky) * tw + lx + kx];
          const float4* wv = reinterpret_cast<const float4*>(w_tile + (ci * taps + ky * kw + kx) * kCoPerBlock);
          const float4 w0 = wv[0], w1 = wv[1];
          acc[0] += v * w0.x;
          acc[1] += v * w0.y;
          acc[2] += v * w0.z;
          acc[3] += v * w0.w;
          acc[4] += v * w1.x;
          acc[5] += v * w1.y;
          acc[6] += v * w1.z;
          acc[7] += v * w1.w;
        }
    __syncthreads();
  }
  const int64_t oy = oy0 + ly, ox = ox0 + lx;
  if (oy >= Ho || ox >= Wo) return;
#pragma unroll
  for (int co = 0; co < kCoPerBlock; ++co) {
    if (co0 + co >= a.Cout) break;
    const float bias = a.bias ? __bfloat162float(a.bias[co0 + co]) : 0.0f;
    a.y[((b * a.Cout + co0 + co) * Ho + oy) * Wo + ox] = __float2bfloat16(acc[co] + bias);
  }
}

}  // namespace

void launch_direct_conv(const ConvArgs& a, cudaStream_t stream) {
  const char* op = "conv2d";
  const int64_t Ho = a.Ho(), Wo = a.Wo();
  if (a.B == 0 || a.Cout == 0 || Ho <= 0 || Wo <= 0) return;
  const size_t smem = shared_bytes(a.kh, a.kw);
  if (smem > kMaxSharedBytes)
    fail(op, "launch", "a " + std::to_string(a.kh) + "x" + std::to_string(a.kw) + " kernel is too large for the "
                       "built-in convolution");
  const int64_t tiles_x = (Wo + kOutTile - 1) / kOutTile, tiles = tiles_x * ((Ho + kOutTile - 1) / kOutTile);
  const int64_t co_blocks = (a.Cout + kCoPerBlock - 1) / kCoPerBlock;
  if (tiles > INT32_MAX || co_blocks > 65535 || a.B > 65535) fail(op, "launch", "shape too large for the grid");
  const dim3 grid(unsigned(tiles), unsigned(co_blocks), unsigned(a.B));
  direct_conv_kernel<<<grid, kThreads, smem, stream>>>(a, tiles_x);
  check_launch(op, "direct_conv_kernel");
}

}  // namespace fluxswap::cuda
