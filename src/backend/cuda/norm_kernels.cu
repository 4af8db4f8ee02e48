// layer_norm_modulate (one block per row, float32 two-pass statistics) and qk_norm_rope (one warp per token and
// head: RMSNorm of q and k in float32, RoPE on pairs (2j, 2j+1), v copied, all written head-major).
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_utils.cuh"

namespace fluxswap::cuda {

namespace {

constexpr int kNormThreads = 128;

// Three passes over the row (mean, variance around the mean, output): the row stays in L1 between them, so the
// extra reads cost no device-memory traffic and the variance has no cancellation.
template <int VEC>
__global__ void __launch_bounds__(kNormThreads)
    layer_norm_modulate_kernel(RowsView x, VecsView shift, VecsView scale, RowsView y) {
  __shared__ float scratch[32];
  const int64_t b = blockIdx.x / x.N, n = blockIdx.x - b * x.N, C = x.C;
  const __nv_bfloat16* xr = row_ptr(x, b, n);
  float v[VEC];
  float sum = 0.0f;
  for (int64_t c = threadIdx.x * VEC; c < C; c += kNormThreads * VEC) {
    load_bf16<VEC>(xr + c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += v[i];
  }
  const float mean = block_sum(sum, scratch) / float(C);
  float sq = 0.0f;
  for (int64_t c = threadIdx.x * VEC; c < C; c += kNormThreads * VEC) {
    load_bf16<VEC>(xr + c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sq += (v[i] - mean) * (v[i] - mean);
  }
  const float inv = rsqrtf(block_sum(sq, scratch) / float(C) + 1e-6f);
  const __nv_bfloat16 *sh = shift.p + b * shift.sb, *sc = scale.p + b * scale.sb;
  __nv_bfloat16* yr = row_ptr(y, b, n);
  for (int64_t c = threadIdx.x * VEC; c < C; c += kNormThreads * VEC) {
    float h[VEC], s[VEC];
    load_bf16<VEC>(xr + c, v);
    load_bf16<VEC>(sh + c, h);
    load_bf16<VEC>(sc + c, s);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = (v[i] - mean) * inv * (1.0f + s[i]) + h[i];
    store_bf16<VEC>(yr + c, v);
  }
}

constexpr int kRopeWarps = 8;
constexpr int kMaxPairsPerLane = 4;  // head_dim <= 256

struct RopeParams {
  RowsView qkv;
  const __nv_bfloat16 *q_norm, *k_norm;
  const float* rope;
  int64_t seq_offset;
  QkvHeads out;
};

// Lane l handles the pairs l, l + 32, ...: a warp's loads of one head are contiguous.
__global__ void __launch_bounds__(kRopeWarps * 32) qk_norm_rope_kernel(RopeParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t item = blockIdx.x * int64_t(kRopeWarps) + threadIdx.x / 32;
  const int64_t H = p.out.H, D = p.out.D, half = D / 2;
  if (item >= p.qkv.B * p.qkv.N * H) return;
  const int64_t h = item % H, row = item / H;
  const int64_t b = row / p.qkv.N, n = row - b * p.qkv.N, s = p.seq_offset + n;
  const __nv_bfloat16* src = row_ptr(p.qkv, b, n) + h * D;
  const int64_t dst_off = ((b * H + h) * p.out.S + s) * D;

  const __nv_bfloat162* v_src = reinterpret_cast<const __nv_bfloat162*>(src + 2 * H * D);
  __nv_bfloat162* v_dst = reinterpret_cast<__nv_bfloat162*>(p.out.v + dst_off);
  for (int64_t j = lane; j < half; j += 32) v_dst[j] = v_src[j];

  const float2* rope = reinterpret_cast<const float2*>(p.rope) + s * half;
  for (int part = 0; part < 2; ++part) {
    const __nv_bfloat162* in = reinterpret_cast<const __nv_bfloat162*>(src + part * H * D);
    const __nv_bfloat162* w = reinterpret_cast<const __nv_bfloat162*>(part == 0 ? p.q_norm : p.k_norm);
    __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>((part == 0 ? p.out.q : p.out.k) + dst_off);
    float2 vals[kMaxPairsPerLane];
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxPairsPerLane; ++i) {
      const int64_t j = lane + 32 * i;
      vals[i] = j < half ? __bfloat1622float2(in[j]) : make_float2(0.0f, 0.0f);
      ss += vals[i].x * vals[i].x + vals[i].y * vals[i].y;
    }
    const float inv = rsqrtf(warp_sum(ss) / float(D) + 1e-6f);
#pragma unroll
    for (int i = 0; i < kMaxPairsPerLane; ++i) {
      const int64_t j = lane + 32 * i;
      if (j >= half) break;
      const float2 wj = __bfloat1622float2(w[j]), cs = rope[j];
      const float a = vals[i].x * inv * wj.x, c = vals[i].y * inv * wj.y;
      dst[j] = __floats2bfloat162_rn(a * cs.x - c * cs.y, c * cs.x + a * cs.y);
    }
  }
}

}  // namespace

void launch_layer_norm_modulate(const RowsView& x, const VecsView& shift, const VecsView& scale, const RowsView& y,
                                cudaStream_t stream) {
  const int64_t rows = x.B * x.N;
  if (rows == 0) return;
  if (rows > int64_t(INT32_MAX)) fail("layer_norm_modulate", "launch", "too many rows");
  if (vec8_ok(x) && vec8_ok(shift) && vec8_ok(scale) && vec8_ok(y))
    layer_norm_modulate_kernel<8><<<unsigned(rows), kNormThreads, 0, stream>>>(x, shift, scale, y);
  else
    layer_norm_modulate_kernel<1><<<unsigned(rows), kNormThreads, 0, stream>>>(x, shift, scale, y);
  check_launch("layer_norm_modulate", "layer_norm_modulate_kernel");
}

void launch_qk_norm_rope(const RowsView& qkv, const __nv_bfloat16* q_norm, const __nv_bfloat16* k_norm,
                         const float* rope, int64_t seq_offset, const QkvHeads& out, cudaStream_t stream) {
  if (out.D % 2 != 0 || out.D > 2 * 32 * kMaxPairsPerLane)
    fail("qk_norm_rope", "launch", "head_dim must be even and at most 256, got " + std::to_string(out.D));
  // The kernel moves (2j, 2j+1) pairs as 4-byte words.
  if (qkv.sb % 2 || qkv.sn % 2 || reinterpret_cast<uintptr_t>(qkv.p) % 4)
    fail("qk_norm_rope", "launch", "qkv rows must start on 4-byte boundaries (even strides and offset)");
  const int64_t items = qkv.B * qkv.N * out.H;
  if (items == 0) return;
  const int64_t blocks = (items + kRopeWarps - 1) / kRopeWarps;
  qk_norm_rope_kernel<<<unsigned(blocks), kRopeWarps * 32, 0, stream>>>(
      RopeParams{qkv, q_norm, k_norm, rope, seq_offset, out});
  check_launch("qk_norm_rope", "qk_norm_rope_kernel");
}

}  // namespace fluxswap::cuda
