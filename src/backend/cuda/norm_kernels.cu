// layer_norm_modulate (one block per row, float32 two-pass statistics; FLUX's widths from registers) and qk_norm_rope (one warp per token and
// head: RMSNorm of q and k in float32, RoPE on pairs (2j, 2j+1), v copied, all written head-major).
#include <cuda_fp8.h>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_utils.cuh"

namespace fluxswap::cuda {

namespace {

constexpr int kNormThreads = 128;

// Statistics by row_mean_rstd, then the output: three passes over the row, the last two from L1.
template <int VEC>
__global__ void __launch_bounds__(kNormThreads)
    layer_norm_modulate_kernel(RowsView x, VecsView shift, VecsView scale, RowsView y) {
  __shared__ float scratch[32];
  const int64_t b = blockIdx.x / x.N, n = blockIdx.x - b * x.N, C = x.C;
  const __nv_bfloat16* xr = row_ptr(x, b, n);
  const float2 stats = row_mean_rstd<VEC>(xr, C, 1e-6f, scratch);
  const float mean = stats.x, inv = stats.y;
  float v[VEC];
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

// Rows of exactly CHUNKS * 1024 elements (FLUX: 3072): the row is read once into registers, so the statistics
// and the output cost no second pass through the caches.
template <int CHUNKS>
__global__ void __launch_bounds__(kNormThreads)
    layer_norm_modulate_regs_kernel(RowsView x, VecsView shift, VecsView scale, RowsView y) {
  __shared__ float scratch[32];
  const int64_t b = blockIdx.x / x.N, n = blockIdx.x - b * x.N;
  constexpr int C = CHUNKS * kNormThreads * 8;
  const __nv_bfloat16* xr = row_ptr(x, b, n);
  float v[CHUNKS][8];
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i) {
    load_bf16<8>(xr + (i * kNormThreads + threadIdx.x) * 8, v[i]);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += v[i][e];
  }
  const float mean = block_sum(sum, scratch) / float(C);
  float sq = 0.0f;
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i)
#pragma unroll
    for (int e = 0; e < 8; ++e) sq += (v[i][e] - mean) * (v[i][e] - mean);
  const float inv = rsqrtf(block_sum(sq, scratch) / float(C) + 1e-6f);
  const __nv_bfloat16 *sh = shift.p + b * shift.sb, *sc = scale.p + b * scale.sb;
  __nv_bfloat16* yr = row_ptr(y, b, n);
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i) {
    const int64_t c = (i * kNormThreads + threadIdx.x) * 8;
    float h[8], k[8];
    load_bf16<8>(sh + c, h);
    load_bf16<8>(sc + c, k);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[i][e] = (v[i][e] - mean) * inv * (1.0f + k[e]) + h[e];
    store_bf16<8>(yr + c, v[i]);
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
  Fp8QkTarget fp8;  // used by the kFp8 instantiations only
};

// Two rotated values of q or k to their destination: bf16, or e4m3 at the FP8 scale (a 2-byte pair).
template <bool kFp8>
__device__ inline void store_pair(const RopeParams& p, int part, int64_t index, float a, float b) {
  if constexpr (kFp8) {
    uint8_t* dst = part == 0 ? p.fp8.q8 : p.fp8.k8;
    reinterpret_cast<__nv_fp8x2_storage_t*>(dst)[index] = __nv_cvt_float2_to_fp8x2(
        make_float2(a * p.fp8.qk_scale, b * p.fp8.qk_scale), __NV_SATFINITE, __NV_E4M3);
  } else {
    __nv_bfloat16* dst = part == 0 ? p.out.q : p.out.k;
    reinterpret_cast<__nv_bfloat162*>(dst)[index] = __floats2bfloat162_rn(a, b);
  }
}

// Four consecutive values (element `index`, a multiple of 4) in one 8-byte (bf16) or 4-byte (e4m3) store.
template <bool kFp8>
__device__ inline void store_quad(const RopeParams& p, int part, int64_t index, float4 v) {
  if constexpr (kFp8) {
    const float s = p.fp8.qk_scale;
    const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(v.x * s, v.y * s), __NV_SATFINITE, __NV_E4M3);
    const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(v.z * s, v.w * s), __NV_SATFINITE, __NV_E4M3);
    *reinterpret_cast<uint32_t*>((part == 0 ? p.fp8.q8 : p.fp8.k8) + index) = lo | (hi << 16);
  } else {
    uint2 o;
    *reinterpret_cast<__nv_bfloat162*>(&o.x) = __floats2bfloat162_rn(v.x, v.y);
    *reinterpret_cast<__nv_bfloat162*>(&o.y) = __floats2bfloat162_rn(v.z, v.w);
    *reinterpret_cast<uint2*>((part == 0 ? p.out.q : p.out.k) + index) = o;
  }
}

// One atomic per block raises v_amax to the block's max |v|, and only when it would change it: with tens of
// thousands of blocks on one address, the plain read first keeps the atomics to the few that set a new maximum.
__device__ inline void raise_v_amax(float v_max, float* v_amax) {
  __shared__ float scratch[32];
  const float m = block_max(v_max, scratch);
  if (threadIdx.x == 0 && m > *reinterpret_cast<volatile float*>(v_amax))
    atomicMax(reinterpret_cast<int*>(v_amax), __float_as_int(m));  // non-negative floats order as their bits
}

__device__ inline float abs_max2(__nv_bfloat162 v) {
  const float2 f = __bfloat1622float2(v);
  return fmaxf(fabsf(f.x), fabsf(f.y));
}

// Lane l handles the pairs l, l + 32, ...: a warp's loads of one head are contiguous.
template <bool kFp8>
__global__ void __launch_bounds__(kRopeWarps * 32) qk_norm_rope_kernel(RopeParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t item = blockIdx.x * int64_t(kRopeWarps) + threadIdx.x / 32;
  const int64_t H = p.out.H, D = p.out.D, half = D / 2;
  float v_max = 0.0f;
  if (item < p.qkv.B * p.qkv.N * H) {
    const int64_t h = item % H, row = item / H;
    const int64_t b = row / p.qkv.N, n = row - b * p.qkv.N, s = p.seq_offset + n;
    const __nv_bfloat16* src = row_ptr(p.qkv, b, n) + h * D;
    const int64_t dst_off = ((b * H + h) * p.out.S + s) * D;

    const __nv_bfloat162* v_src = reinterpret_cast<const __nv_bfloat162*>(src + 2 * H * D);
    __nv_bfloat162* v_dst = reinterpret_cast<__nv_bfloat162*>(p.out.v + dst_off);
    for (int64_t j = lane; j < half; j += 32) {
      v_dst[j] = v_src[j];
      if constexpr (kFp8) v_max = fmaxf(v_max, abs_max2(v_src[j]));
    }

    const float2* rope = reinterpret_cast<const float2*>(p.rope) + s * half;
    for (int part = 0; part < 2; ++part) {
      const __nv_bfloat162* in = reinterpret_cast<const __nv_bfloat162*>(src + part * H * D);
      const __nv_bfloat162* w = reinterpret_cast<const __nv_bfloat162*>(part == 0 ? p.q_norm : p.k_norm);
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
        store_pair<kFp8>(p, part, dst_off / 2 + j, a * cs.x - c * cs.y, c * cs.x + a * cs.y);
      }
    }
  }
  if constexpr (kFp8) raise_v_amax(v_max, p.fp8.v_amax);
}

// head_dim 128 (FLUX): lane l owns elements 4l .. 4l+3 (pairs 2l and 2l+1) of q, k and v, so each warp moves a
// head with one 8-byte access per lane and tensor, all three loads in flight before the first reduction.
template <bool kFp8>
__global__ void __launch_bounds__(kRopeWarps * 32) qk_norm_rope_d128_kernel(RopeParams p) {
  constexpr int D = 128;
  const int lane = threadIdx.x % 32;
  const int64_t item = blockIdx.x * int64_t(kRopeWarps) + threadIdx.x / 32;
  const int64_t H = p.out.H;
  float v_max = 0.0f;
  if (item < p.qkv.B * p.qkv.N * H) {
    const int64_t h = item % H, row = item / H;
    const int64_t b = row / p.qkv.N, n = row - b * p.qkv.N, s = p.seq_offset + n;
    const __nv_bfloat16* src = row_ptr(p.qkv, b, n) + h * D + 4 * lane;
    const int64_t dst_off = ((b * H + h) * p.out.S + s) * D + 4 * lane;

    const uint2 q_raw = *reinterpret_cast<const uint2*>(src);
    const uint2 k_raw = *reinterpret_cast<const uint2*>(src + H * D);
    const uint2 v_raw = *reinterpret_cast<const uint2*>(src + 2 * H * D);
    const float4 cs = *reinterpret_cast<const float4*>(p.rope + (s * (D / 2) + 2 * lane) * 2);  // (cos, sin) x 2
    *reinterpret_cast<uint2*>(p.out.v + dst_off) = v_raw;
    if constexpr (kFp8)
      v_max = fmaxf(abs_max2(*reinterpret_cast<const __nv_bfloat162*>(&v_raw.x)),
                    abs_max2(*reinterpret_cast<const __nv_bfloat162*>(&v_raw.y)));

    auto rotate = [&](uint2 raw, const __nv_bfloat16* norm, int part) {
      const float2 x0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
      const float2 x1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
      const float inv = rsqrtf(warp_sum(x0.x * x0.x + x0.y * x0.y + x1.x * x1.x + x1.y * x1.y) / float(D) + 1e-6f);
      const uint2 w_raw = *reinterpret_cast<const uint2*>(norm + 4 * lane);
      const float2 w0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w_raw.x));
      const float2 w1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w_raw.y));
      const float a0 = x0.x * inv * w0.x, c0 = x0.y * inv * w0.y, a1 = x1.x * inv * w1.x, c1 = x1.y * inv * w1.y;
      store_quad<kFp8>(p, part, dst_off, make_float4(a0 * cs.x - c0 * cs.y, c0 * cs.x + a0 * cs.y,
                                                    a1 * cs.z - c1 * cs.w, c1 * cs.z + a1 * cs.w));
    };
    rotate(q_raw, p.q_norm, 0);
    rotate(k_raw, p.k_norm, 1);
  }
  if constexpr (kFp8) raise_v_amax(v_max, p.fp8.v_amax);
}

}  // namespace

void launch_layer_norm_modulate(const RowsView& x, const VecsView& shift, const VecsView& scale, const RowsView& y,
                                cudaStream_t stream) {
  const int64_t rows = x.B * x.N;
  if (rows == 0) return;
  if (rows > int64_t(INT32_MAX)) fail("layer_norm_modulate", "launch", "too many rows");
  const bool vec8 = vec8_ok(x) && vec8_ok(shift) && vec8_ok(scale) && vec8_ok(y);
  if (vec8 && x.C == 3 * kNormThreads * 8)
    layer_norm_modulate_regs_kernel<3><<<unsigned(rows), kNormThreads, 0, stream>>>(x, shift, scale, y);
  else if (vec8 && x.C == 4 * kNormThreads * 8)
    layer_norm_modulate_regs_kernel<4><<<unsigned(rows), kNormThreads, 0, stream>>>(x, shift, scale, y);
  else if (vec8)
    layer_norm_modulate_kernel<8><<<unsigned(rows), kNormThreads, 0, stream>>>(x, shift, scale, y);
  else
    layer_norm_modulate_kernel<1><<<unsigned(rows), kNormThreads, 0, stream>>>(x, shift, scale, y);
  check_launch("layer_norm_modulate", "layer_norm_modulate_kernel");
}

void launch_qk_norm_rope(const RowsView& qkv, const __nv_bfloat16* q_norm, const __nv_bfloat16* k_norm,
                         const float* rope, int64_t seq_offset, const QkvHeads& out, const Fp8QkTarget* fp8,
                         cudaStream_t stream) {
  const char* op = fp8 ? "qk_norm_rope_fp8" : "qk_norm_rope";
  if (out.D % 2 != 0 || out.D > 2 * 32 * kMaxPairsPerLane)
    fail(op, "launch", "head_dim must be even and at most 256, got " + std::to_string(out.D));
  // The kernel moves (2j, 2j+1) pairs as 4-byte words.
  if (qkv.sb % 2 || qkv.sn % 2 || reinterpret_cast<uintptr_t>(qkv.p) % 4)
    fail(op, "launch", "qkv rows must start on 4-byte boundaries (even strides and offset)");
  const int64_t items = qkv.B * qkv.N * out.H;
  if (items == 0) return;
  const int64_t blocks = (items + kRopeWarps - 1) / kRopeWarps;
  const RopeParams params{qkv, q_norm, k_norm, rope, seq_offset, out, fp8 ? *fp8 : Fp8QkTarget{}};
  // The 8-byte path needs every head to start on an 8-byte boundary.
  const bool d128 = out.D == 128 && qkv.sb % 4 == 0 && qkv.sn % 4 == 0 && reinterpret_cast<uintptr_t>(qkv.p) % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(q_norm) % 8 == 0 && reinterpret_cast<uintptr_t>(k_norm) % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(rope) % 16 == 0;
  const unsigned grid = unsigned(blocks), threads = kRopeWarps * 32;
  if (d128 && fp8)
    qk_norm_rope_d128_kernel<true><<<grid, threads, 0, stream>>>(params);
  else if (d128)
    qk_norm_rope_d128_kernel<false><<<grid, threads, 0, stream>>>(params);
  else if (fp8)
    qk_norm_rope_kernel<true><<<grid, threads, 0, stream>>>(params);
  else
    qk_norm_rope_kernel<false><<<grid, threads, 0, stream>>>(params);
  check_launch(op, "qk_norm_rope_kernel");
}

}  // namespace fluxswap::cuda
