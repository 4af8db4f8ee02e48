// The softmax step of the unfused attention: one block per query row reads the float32 scores (plus the bias row,
// under the causal mask), keeps a running (max, sum of exponentials) per thread in one pass, merges them across
// the block, and writes the bf16 probabilities in a second pass. Masked keys get exactly zero, as in the reference.
#include <cmath>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_utils.cuh"
#include "backend/cuda/text_kernels.h"

namespace fluxswap::cuda {

namespace {

constexpr int kThreads = 256;

// Merges the running softmax state (m2, l2) into (m, l): l is the sum of exp(v - m) over the values seen.
__device__ inline void merge(float& m, float& l, float m2, float l2) {
  if (l2 == 0.0f) return;
  if (l == 0.0f) {
    m = m2, l = l2;
    return;
  }
  const float mx = fmaxf(m, m2);
  l = l * expf(m - mx) + l2 * expf(m2 - mx);
  m = mx;
}

__global__ void __launch_bounds__(kThreads) attention_softmax_kernel(SoftmaxRows s) {
  __shared__ float part_m[kThreads / 32], part_l[kThreads / 32];
  const int64_t item = blockIdx.x;  // head * rows + row
  const int64_t h = item / s.rows, i = item - h * s.rows;
  const float* sc = s.scores + item * s.S;
  const float* bias = s.bias ? s.bias + h * s.bias_head_stride + i * s.S : nullptr;
  // Query row0 + i sees keys 0 .. row0 + i under the causal mask.
  const int64_t seen = s.causal ? min(s.row0 + i + 1, s.S) : s.S;

  float m = -INFINITY, l = 0.0f;
  for (int64_t j = threadIdx.x; j < seen; j += kThreads) {
    const float v = sc[j] + (bias ? bias[j] : 0.0f);
    if (v > m) {
      l = l * expf(m - v) + 1.0f;
      m = v;
    } else {
      l += expf(v - m);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), l2 = __shfl_xor_sync(0xffffffffu, l, o);
    merge(m, l, m2, l2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) part_m[warp] = m, part_l[warp] = l;
  __syncthreads();
  m = part_m[0], l = part_l[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) merge(m, l, part_m[w], part_l[w]);
  const float inv = 1.0f / l;

  __nv_bfloat16* p = s.p + item * s.S;
  for (int64_t j = threadIdx.x; j < s.S; j += kThreads) {
    const float v = j < seen ? expf(sc[j] + (bias ? bias[j] : 0.0f) - m) * inv : 0.0f;
    p[j] = __float2bfloat16_rn(v);
  }
}

}  // namespace

void launch_attention_softmax(const SoftmaxRows& s, cudaStream_t stream) {
  const int64_t items = s.heads * s.rows;
  if (items == 0 || s.S == 0) return;
  if (items > int64_t(INT32_MAX)) fail("attention_ex", "launch", "too many score rows in one chunk");
  attention_softmax_kernel<<<unsigned(items), kThreads, 0, stream>>>(s);
  check_launch("attention_ex", "attention_softmax_kernel");
}

}  // namespace fluxswap::cuda
