// layer_norm_modulate (one block per row, float32 two-pass statistics; FLUX's widths from registers), in bf16 or
// quantised per row to e4m3 for an FP8 linear, optionally after the gated residual that updates its input, and
// qk_norm_rope (one warp per token and head: RMSNorm of q and k in float32, RoPE on pairs (2j, 2j+1), v copied, all
// written head-major).
#include <cuda_fp8.h>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_utils.cuh"
#include "backend/cuda/fp8_quant_device.cuh"
#include "backend/cuda/gated_residual_device.cuh"

namespace fluxswap::cuda {

namespace {

constexpr int kNormThreads = 128;

// One element of y, its products spelled out: the bf16 and the FP8 instantiations below must agree bit for bit, so
// no contraction may be left to the compiler's choice (the sum and the difference cannot be contracted).
__device__ __forceinline__ float modulate(float v, float mean, float inv, float scale, float shift) {
  return __fmaf_rn(__fmul_rn(v - mean, inv), 1.0f + scale, shift);
}

__device__ __forceinline__ uint4 pack_bf16x8(const float (&v)[8]) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  return raw;
}

// y of the VEC elements at c: loads x, shift and scale there.
template <int VEC>
__device__ __forceinline__ void modulated(const __nv_bfloat16* xr, const __nv_bfloat16* sh, const __nv_bfloat16* sc,
                                          int64_t c, float mean, float inv, float (&v)[VEC]) {
  float h[VEC], s[VEC];
  load_bf16<VEC>(xr + c, v);
  load_bf16<VEC>(sh + c, h);
  load_bf16<VEC>(sc + c, s);
#pragma unroll
  for (int i = 0; i < VEC; ++i) v[i] = modulate(v[i], mean, inv, s[i], h[i]);
}

__device__ __forceinline__ float bf16_round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }


// The gated residual in front of the norm (x += gate[b] * branch), used by the kResidual instantiations only.
struct Residual {
  VecsView gate;
  RowsView branch;
};

// The residual update of one row by its block, chunk by chunk, written back before the statistics read the row
// again (the caller's barrier makes every thread's part visible to the others).
template <int VEC>
__device__ __forceinline__ void gated_residual_row(__nv_bfloat16* xr, const Residual& res, int64_t b, int64_t n,
                                                   int64_t C) {
  const __nv_bfloat16 *gr = res.gate.p + b * res.gate.sb, *br = row_ptr(res.branch, b, n);
  for (int64_t c = threadIdx.x * VEC; c < C; c += kNormThreads * VEC) {
    float a[VEC], g[VEC], d[VEC];
    load_bf16<VEC>(xr + c, a);
    load_bf16<VEC>(gr + c, g);
    load_bf16<VEC>(br + c, d);
#pragma unroll
    for (int i = 0; i < VEC; ++i) a[i] = gated_residual_value(a[i], g[i], d[i]);
    store_bf16<VEC>(xr + c, a);
  }
}

// The same for a row held in registers: v receives the updated values as bf16 holds them, which is what the unfused
// LayerNorm reads back. Every load is issued before the first store: as far as the compiler knows a store to x could
// alias a later load, which would otherwise serialise the chunks.
template <int CHUNKS>
__device__ __forceinline__ void gated_residual_regs(__nv_bfloat16* xr, const Residual& res, int64_t b, int64_t n,
                                                    float (&v)[CHUNKS][8]) {
  const __nv_bfloat16 *gr = res.gate.p + b * res.gate.sb, *br = row_ptr(res.branch, b, n);
  uint4 xv[CHUNKS], gv[CHUNKS], bv[CHUNKS];
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i) {
    const int64_t c = (i * kNormThreads + threadIdx.x) * 8;
    xv[i] = *reinterpret_cast<const uint4*>(xr + c);
    gv[i] = *reinterpret_cast<const uint4*>(gr + c);
    bv[i] = *reinterpret_cast<const uint4*>(br + c);
  }
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i) {
    float g[8], d[8];
    unpack_bf16x8(xv[i], v[i]);
    unpack_bf16x8(gv[i], g);
    unpack_bf16x8(bv[i], d);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[i][e] = gated_residual_value(v[i][e], g[e], d[e]);
    const uint4 rounded = pack_bf16x8(v[i]);
    *reinterpret_cast<uint4*>(xr + (i * kNormThreads + threadIdx.x) * 8) = rounded;
    unpack_bf16x8(rounded, v[i]);
  }
}

// Statistics by row_mean_rstd, then the output: three passes over the row, the last two from L1. The FP8 form
// needs the row's max |y| before its first code, so it computes y twice (the same arithmetic both times) instead
// of keeping a row of unknown width. With kResidual the row is updated first, and the passes read it back.
template <int VEC, bool kFp8, bool kResidual>
__global__ void __launch_bounds__(kNormThreads)
    layer_norm_modulate_kernel(RowsView x, VecsView shift, VecsView scale, RowsView y, Fp8RowsOut q, Residual res) {
  __shared__ float scratch[32];
  const int64_t b = blockIdx.x / x.N, n = blockIdx.x - b * x.N, C = x.C;
  if constexpr (kResidual) {
    gated_residual_row<VEC>(row_ptr(x, b, n), res, b, n, C);
    __syncthreads();
  }
  const __nv_bfloat16* xr = row_ptr(x, b, n);
  const float2 stats = row_mean_rstd<VEC>(xr, C, 1e-6f, scratch);
  const float mean = stats.x, inv = stats.y;
  float v[VEC];
  const __nv_bfloat16 *sh = shift.p + b * shift.sb, *sc = scale.p + b * scale.sb;
  if constexpr (!kFp8) {
    __nv_bfloat16* yr = row_ptr(y, b, n);
    for (int64_t c = threadIdx.x * VEC; c < C; c += kNormThreads * VEC) {
      modulated<VEC>(xr, sh, sc, c, mean, inv, v);
      store_bf16<VEC>(yr + c, v);
    }
  } else {
    float amax = 0.0f;
    for (int64_t c = threadIdx.x * VEC; c < C; c += kNormThreads * VEC) {
      modulated<VEC>(xr, sh, sc, c, mean, inv, v);
      if constexpr (VEC == 8)
        amax = fmaxf(amax, amax8(pack_bf16x8(v)));
      else
        amax = fmaxf(amax, fabsf(bf16_round(v[0])));
    }
    const float s = e4m3_row_scale_dev(block_max(amax, scratch)), rinv = __frcp_rn(s);
    if (threadIdx.x == 0) q.scales[b * x.N + n] = s;
    uint8_t* qr = q.q + b * q.sb + n * q.sn;
    for (int64_t c = threadIdx.x * VEC; c < C; c += kNormThreads * VEC) {
      modulated<VEC>(xr, sh, sc, c, mean, inv, v);
      if constexpr (VEC == 8)
        *reinterpret_cast<uint2*>(qr + c) = quantize8(pack_bf16x8(v), rinv);
      else
        qr[c] = quantize1(bf16_round(v[0]), rinv);
    }
  }
}

// Rows of exactly CHUNKS * 1024 elements (FLUX: 3072): the row is read once into registers, so the statistics
// and the output cost no second pass through the caches; the FP8 form quantises from the same registers. With
// kResidual the row is updated in registers and written back once: x crosses HBM once each way.
template <int CHUNKS, bool kFp8, bool kResidual>
__global__ void __launch_bounds__(kNormThreads)
    layer_norm_modulate_regs_kernel(RowsView x, VecsView shift, VecsView scale, RowsView y, Fp8RowsOut q,
                                    Residual res) {
  __shared__ float scratch[32];
  const int64_t b = blockIdx.x / x.N, n = blockIdx.x - b * x.N;
  constexpr int C = CHUNKS * kNormThreads * 8;
  __nv_bfloat16* xr = row_ptr(x, b, n);
  float v[CHUNKS][8];
  if constexpr (kResidual) gated_residual_regs<CHUNKS>(xr, res, b, n, v);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i) {
    if constexpr (!kResidual) load_bf16<8>(xr + (i * kNormThreads + threadIdx.x) * 8, v[i]);
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
  uint4 out[CHUNKS];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i) {
    const int64_t c = (i * kNormThreads + threadIdx.x) * 8;
    float h[8], k[8];
    load_bf16<8>(sh + c, h);
    load_bf16<8>(sc + c, k);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[i][e] = modulate(v[i][e], mean, inv, k[e], h[e]);
    out[i] = pack_bf16x8(v[i]);
    if constexpr (kFp8)
      amax = fmaxf(amax, amax8(out[i]));
    else
      *reinterpret_cast<uint4*>(row_ptr(y, b, n) + c) = out[i];
  }
  if constexpr (kFp8) {
    const float s = e4m3_row_scale_dev(block_max(amax, scratch)), rinv = __frcp_rn(s);
    if (threadIdx.x == 0) q.scales[b * x.N + n] = s;
    uint8_t* qr = q.q + b * q.sb + n * q.sn;
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i)
      *reinterpret_cast<uint2*>(qr + (i * kNormThreads + threadIdx.x) * 8) = quantize8(out[i], rinv);
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
    if (kFp8 || p.out.v)
      for (int64_t j = lane; j < half; j += 32) {
        if (p.out.v) reinterpret_cast<__nv_bfloat162*>(p.out.v + dst_off)[j] = v_src[j];
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
// head with one 8-byte access per lane and tensor. A warp takes kHeads heads of one token: their 3 x kHeads loads
// are in flight before the first reduction, and the token's RoPE angles are read once for all of them.
template <bool kFp8, int kHeads>
__global__ void __launch_bounds__(kRopeWarps * 32) qk_norm_rope_d128_kernel(RopeParams p) {
  constexpr int D = 128;
  const int lane = threadIdx.x % 32;
  const int64_t item = blockIdx.x * int64_t(kRopeWarps) + threadIdx.x / 32;
  const int64_t H = p.out.H, groups = H / kHeads;
  float v_max = 0.0f;
  if (item < p.qkv.B * p.qkv.N * groups) {
    const int64_t h0 = item % groups * kHeads, row = item / groups;
    const int64_t b = row / p.qkv.N, n = row - b * p.qkv.N, s = p.seq_offset + n;
    const __nv_bfloat16* src = row_ptr(p.qkv, b, n) + h0 * D + 4 * lane;
    const int64_t dst_off = ((b * H + h0) * p.out.S + s) * D + 4 * lane, head_stride = p.out.S * D;

    uint2 q_raw[kHeads], k_raw[kHeads], v_raw[kHeads];
#pragma unroll
    for (int g = 0; g < kHeads; ++g) {
      q_raw[g] = *reinterpret_cast<const uint2*>(src + g * D);
      k_raw[g] = *reinterpret_cast<const uint2*>(src + H * D + g * D);
      if (kFp8 || p.out.v) v_raw[g] = *reinterpret_cast<const uint2*>(src + 2 * H * D + g * D);
    }
    const float4 cs = *reinterpret_cast<const float4*>(p.rope + (s * (D / 2) + 2 * lane) * 2);  // (cos, sin) x 2
    const uint2 qw_raw = *reinterpret_cast<const uint2*>(p.q_norm + 4 * lane);
    const uint2 kw_raw = *reinterpret_cast<const uint2*>(p.k_norm + 4 * lane);

    auto rotate = [&](uint2 raw, uint2 w_raw, int part, int64_t off) {
      const float2 x0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
      const float2 x1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
      const float inv = rsqrtf(warp_sum(x0.x * x0.x + x0.y * x0.y + x1.x * x1.x + x1.y * x1.y) / float(D) + 1e-6f);
      const float2 w0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w_raw.x));
      const float2 w1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w_raw.y));
      const float a0 = x0.x * inv * w0.x, c0 = x0.y * inv * w0.y, a1 = x1.x * inv * w1.x, c1 = x1.y * inv * w1.y;
      store_quad<kFp8>(p, part, off, make_float4(a0 * cs.x - c0 * cs.y, c0 * cs.x + a0 * cs.y,
                                                a1 * cs.z - c1 * cs.w, c1 * cs.z + a1 * cs.w));
    };
#pragma unroll
    for (int g = 0; g < kHeads; ++g) {
      const int64_t off = dst_off + g * head_stride;
      if (p.out.v) *reinterpret_cast<uint2*>(p.out.v + off) = v_raw[g];
      if constexpr (kFp8)
        v_max = fmaxf(v_max, fmaxf(abs_max2(*reinterpret_cast<const __nv_bfloat162*>(&v_raw[g].x)),
                                   abs_max2(*reinterpret_cast<const __nv_bfloat162*>(&v_raw[g].y))));
      rotate(q_raw[g], qw_raw, 0, off);
      rotate(k_raw[g], kw_raw, 1, off);
    }
  }
  if constexpr (kFp8) raise_v_amax(v_max, p.fp8.v_amax);
}

}  // namespace

namespace {

// The kernel choice of every form; `vec8` includes the bf16 output's alignment for the bf16 form only, so the FP8
// form matches the bf16 form into aligned rows. The residual forms take the kernel the plain ones would, so their
// statistics are summed in the same order.
template <bool kFp8, bool kResidual>
void launch_norm(const RowsView& x, const VecsView& shift, const VecsView& scale, const RowsView& y,
                 const Fp8RowsOut& q, const Residual& res, bool vec8, cudaStream_t stream, const char* op) {
  const int64_t rows = x.B * x.N;
  if (rows == 0) return;
  if (rows > int64_t(INT32_MAX)) fail(op, "launch", "too many rows");
  const unsigned grid = unsigned(rows);
  constexpr int T = kNormThreads;
  if (vec8 && x.C == 3 * T * 8)
    layer_norm_modulate_regs_kernel<3, kFp8, kResidual><<<grid, T, 0, stream>>>(x, shift, scale, y, q, res);
  else if (vec8 && x.C == 4 * T * 8)
    layer_norm_modulate_regs_kernel<4, kFp8, kResidual><<<grid, T, 0, stream>>>(x, shift, scale, y, q, res);
  else if (vec8)
    layer_norm_modulate_kernel<8, kFp8, kResidual><<<grid, T, 0, stream>>>(x, shift, scale, y, q, res);
  else
    layer_norm_modulate_kernel<1, kFp8, kResidual><<<grid, T, 0, stream>>>(x, shift, scale, y, q, res);
  check_launch(op, "layer_norm_modulate_kernel");
}

void check_fp8_out(const Fp8RowsOut& q, const char* op) {
  if (q.sn % 8 || q.sb % 8 || reinterpret_cast<uintptr_t>(q.q) % 8)
    fail(op, "launch", "e4m3 rows must start on 8-byte boundaries (strides multiples of 8)");
}

// The fused forms' residual operands follow the LayerNorm's access width: a misaligned gate or branch beside rows
// the norm reads 16 bytes at a time is left to the unfused pair (rare: the transformer's operands are aligned).
bool residual_fits(const Residual& res, bool vec8) { return !vec8 || (vec8_ok(res.gate) && vec8_ok(res.branch)); }

}  // namespace

void launch_layer_norm_modulate(const RowsView& x, const VecsView& shift, const VecsView& scale, const RowsView& y,
                                cudaStream_t stream) {
  const bool vec8 = vec8_ok(x) && vec8_ok(shift) && vec8_ok(scale) && vec8_ok(y);
  launch_norm<false, false>(x, shift, scale, y, Fp8RowsOut{}, Residual{}, vec8, stream, "layer_norm_modulate");
}

void launch_layer_norm_modulate_fp8(const RowsView& x, const VecsView& shift, const VecsView& scale,
                                    const Fp8RowsOut& q, cudaStream_t stream) {
  const char* op = "layer_norm_modulate_fp8";
  check_fp8_out(q, op);
  const bool vec8 = vec8_ok(x) && vec8_ok(shift) && vec8_ok(scale);
  launch_norm<true, false>(x, shift, scale, RowsView{}, q, Residual{}, vec8, stream, op);
}

void launch_gated_residual_layer_norm_modulate(const RowsView& x, const VecsView& gate, const RowsView& branch,
                                               const VecsView& shift, const VecsView& scale, const RowsView& y,
                                               cudaStream_t stream) {
  const bool vec8 = vec8_ok(x) && vec8_ok(shift) && vec8_ok(scale) && vec8_ok(y);
  const Residual res{gate, branch};
  if (!residual_fits(res, vec8)) {
    launch_gated_residual(x, gate, branch, stream);
    launch_layer_norm_modulate(x, shift, scale, y, stream);
    return;
  }
  launch_norm<false, true>(x, shift, scale, y, Fp8RowsOut{}, res, vec8, stream, "gated_residual_layer_norm_modulate");
}

void launch_gated_residual_layer_norm_modulate_fp8(const RowsView& x, const VecsView& gate, const RowsView& branch,
                                                   const VecsView& shift, const VecsView& scale, const Fp8RowsOut& q,
                                                   cudaStream_t stream) {
  const char* op = "gated_residual_layer_norm_modulate_fp8";
  check_fp8_out(q, op);
  const bool vec8 = vec8_ok(x) && vec8_ok(shift) && vec8_ok(scale);
  const Residual res{gate, branch};
  if (!residual_fits(res, vec8)) {
    launch_gated_residual(x, gate, branch, stream);
    launch_layer_norm_modulate_fp8(x, shift, scale, q, stream);
    return;
  }
  launch_norm<true, true>(x, shift, scale, RowsView{}, q, res, vec8, stream, op);
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
  const RopeParams params{qkv, q_norm, k_norm, rope, seq_offset, out, fp8 ? *fp8 : Fp8QkTarget{}};
  // The 8-byte path needs every head to start on an 8-byte boundary; it takes 4 heads a warp where H allows.
  const bool d128 = out.D == 128 && qkv.sb % 4 == 0 && qkv.sn % 4 == 0 && reinterpret_cast<uintptr_t>(qkv.p) % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(q_norm) % 8 == 0 && reinterpret_cast<uintptr_t>(k_norm) % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(rope) % 16 == 0;
  const bool by4 = d128 && out.H % 4 == 0;
  const int64_t warps = by4 ? items / 4 : items;
  const unsigned grid = unsigned((warps + kRopeWarps - 1) / kRopeWarps), threads = kRopeWarps * 32;
  if (by4 && fp8)
    qk_norm_rope_d128_kernel<true, 4><<<grid, threads, 0, stream>>>(params);
  else if (by4)
    qk_norm_rope_d128_kernel<false, 4><<<grid, threads, 0, stream>>>(params);
  else if (d128 && fp8)
    qk_norm_rope_d128_kernel<true, 1><<<grid, threads, 0, stream>>>(params);
  else if (d128)
    qk_norm_rope_d128_kernel<false, 1><<<grid, threads, 0, stream>>>(params);
  else if (fp8)
    qk_norm_rope_kernel<true><<<grid, threads, 0, stream>>>(params);
  else
    qk_norm_rope_kernel<false><<<grid, threads, 0, stream>>>(params);
  check_launch(op, "qk_norm_rope_kernel");
}

}  // namespace fluxswap::cuda
