#include <cuda_fp8.h>

#include <algorithm>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_utils.cuh"
#include "backend/cuda/fp8_gemv.h"
#include "backend/cuda/fp8_quant_device.cuh"

namespace fluxswap::cuda {

namespace {

// A block computes 16 output features (one m16n8k32 tile: the x rows are its first columns, the other six zero)
// over the whole of K. Its 8 warps split K into 64-byte steps (two MMAs), round robin, and every lane issues all
// of its weight loads (16 bytes of each of two feature rows per step) before doing anything else, so a block has
// its whole 16 x K tile in flight (48 KiB at K = 3072) while it quantises x. The tensor cores take e4m3 as it is:
// no conversion per weight and no shared-memory traffic per weight (the previous kernel converted every weight to
// float and read x as floats from shared memory, 8 bytes per weight byte, which capped it near 1.5 TB/s).
//
// Both kernels below (one linear; a batch of linears) are made of the same device functions, with tiles that start
// at a multiple of 16 features of their own linear, so a feature's sum is the same sequence of MMAs and additions in
// both: their outputs agree bit for bit.
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileRows = int(kFp8GemvTileRows);
constexpr int64_t kStepBytes = 64;
constexpr int kMaxSteps = 8;  // per warp: K <= 8 warps x 8 steps x 64 bytes
constexpr int64_t kMaxK = kWarps * kMaxSteps * kStepBytes;
static_assert(kThreads * 2 * 8 >= kMaxK, "x staging: two 8-value chunks per thread cover every K the kernel takes");
// Steps a warp holds registers for: 6 covers K <= 3072 (FLUX), 8 the rest; the steps past K are never issued, so
// the choice changes registers, not results.
constexpr int kStepsUpTo3072 = 6;
constexpr int64_t kK3072 = kWarps * kStepsUpTo3072 * kStepBytes;

// K order inside a step is free as long as A and B agree: lane (g, t) loads bytes 16t .. 16t + 15 of the step for
// feature rows g and g + 8 and of x row g, and hands words 0, 1 to the first MMA, words 2, 3 to the second. In the
// fragment layout of m16n8k32 (A: row g, k 4t.. in register 0 and 16 + 4t.. in register 2; row g + 8 in registers
// 1 and 3; B: k 4t.. and 16 + 4t.. of column g), that maps every byte of the step to one k of one MMA, the same
// for A and B.
__device__ inline void mma_e4m3(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // the launchers refuse GPUs below sm_89
#endif
}

// Shared memory of a block: x's codes and scales, the reduction scratch, and the warps' partial sums (two sets, so a
// block that runs tile after tile needs one barrier per tile: a set is rewritten only after the barrier that
// follows its readers).
struct GemvShared {
  // Row 1 of the codes 64 bytes past a multiple of 128: the two rows' B loads of a step fall on different banks.
  __align__(16) uint8_t xq[kFp8GemvMaxRows][kMaxK + 64];
  float sx[kFp8GemvMaxRows];
  float scratch[32];
  float partial[2][kWarps][kTileRows][kFp8GemvMaxRows];
};

// A tile's weights in this lane's registers: 16 bytes of feature rows n0 + g (lo) and n0 + g + 8 (hi) per step of
// its warp. Streaming loads (evict first): each weight is read once, and the activations around it should stay in
// L2. Rows past nout and bytes past K load as zero (uninitialised codes could be NaN).
template <int kSteps>
__device__ __forceinline__ void load_tile(const uint8_t* __restrict__ wq, int64_t ldw, int64_t nout, int64_t n0,
                                          int64_t K, uint4 (&lo)[kSteps], uint4 (&hi)[kSteps]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const bool lo_ok = n0 + g < nout, hi_ok = n0 + g + 8 < nout;
  const uint8_t* w_lo = wq + (lo_ok ? n0 + g : 0) * ldw + 16 * t;
  const uint8_t* w_hi = wq + (hi_ok ? n0 + g + 8 : 0) * ldw + 16 * t;
#pragma unroll
  for (int j = 0; j < kSteps; ++j) {
    const int64_t k = int64_t(warp + kWarps * j) * kStepBytes;
    const bool in = k + 16 * t < K;
    lo[j] = lo_ok && in ? __ldcs(reinterpret_cast<const uint4*>(w_lo + k)) : make_uint4(0, 0, 0, 0);
    hi[j] = hi_ok && in ? __ldcs(reinterpret_cast<const uint4*>(w_hi + k)) : make_uint4(0, 0, 0, 0);
  }
}

// x quantised as the row quantiser does it (the CPU reference's arithmetic), into e4m3 codes in shared memory. The
// caller's barrier makes them visible.
__device__ __forceinline__ void quantize_x(const __nv_bfloat16* __restrict__ x, int64_t ldx, int rows, int64_t K,
                                           GemvShared& sm) {
  for (int r = 0; r < rows; ++r) {
    const __nv_bfloat16* xr = x + r * ldx;
    uint4 cached[2];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t c = (threadIdx.x + int64_t(i) * kThreads) * 8;
      cached[i] = c < K ? *reinterpret_cast<const uint4*>(xr + c) : make_uint4(0, 0, 0, 0);
      amax = fmaxf(amax, amax8(cached[i]));
    }
    const float scale = e4m3_row_scale_dev(block_max(amax, sm.scratch)), inv = __frcp_rn(scale);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t c = (threadIdx.x + int64_t(i) * kThreads) * 8;
      if (c < K) *reinterpret_cast<uint2*>(&sm.xq[r][c]) = quantize8(cached[i], inv);
    }
    if (threadIdx.x == 0) sm.sx[r] = scale;
  }
}

// One tile from the weights in registers to y: the warp's MMAs, the warps' partial sums added in a fixed order (so
// results do not depend on scheduling), scales and bias. Every thread of the block must call it (one barrier).
template <int kSteps>
__device__ __forceinline__ void finish_tile(const uint4 (&lo)[kSteps], const uint4 (&hi)[kSteps], int rows,
                                            int64_t K, GemvShared& sm, int set, const float* __restrict__ w_scale,
                                            const __nv_bfloat16* __restrict__ bias, int64_t nout, int64_t n0,
                                            __nv_bfloat16* __restrict__ y, int64_t ldy) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  // Columns g >= rows of B are zero, and so is every k past K on both sides.
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int j = 0; j < kSteps; ++j) {
    const int64_t k = int64_t(warp + kWarps * j) * kStepBytes;
    if (k >= K) break;  // the same for the whole warp, as mma.sync needs
    const uint4 b = g < rows && k + 16 * t < K ? *reinterpret_cast<const uint4*>(&sm.xq[g][k + 16 * t])
                                               : make_uint4(0, 0, 0, 0);
    mma_e4m3(acc, lo[j].x, hi[j].x, lo[j].y, hi[j].y, b.x, b.y);
    mma_e4m3(acc, lo[j].z, hi[j].z, lo[j].w, hi[j].w, b.z, b.w);
  }
  // Lanes t = 0 hold columns 0 and 1 (x rows 0 and 1) of features g and g + 8.
  float(*partial)[kTileRows][kFp8GemvMaxRows] = sm.partial[set];
  if (t == 0) {
    partial[warp][g][0] = acc[0];
    partial[warp][g][1] = acc[1];
    partial[warp][g + 8][0] = acc[2];
    partial[warp][g + 8][1] = acc[3];
  }
  __syncthreads();
  if (threadIdx.x < kTileRows * rows) {
    const int f = threadIdx.x % kTileRows, r = threadIdx.x / kTileRows;
    const int64_t n = n0 + f;
    if (n < nout) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += partial[w][f][r];
      const float b = bias ? __bfloat162float(bias[n]) : 0.0f;
      // Spelled out, so that no contraction is left to the compiler's choice in either kernel.
      y[r * ldy + n] = __float2bfloat16_rn(__fmaf_rn(sum, __fmul_rn(sm.sx[r], w_scale[n]), b));
    }
  }
}

template <int kSteps>
__global__ void __launch_bounds__(kThreads, 2)
    fp8_gemv_kernel(const __nv_bfloat16* __restrict__ x, int64_t ldx, int rows, int64_t K,
                    const uint8_t* __restrict__ wq, int64_t ldw, const float* __restrict__ w_scale,
                    const __nv_bfloat16* __restrict__ bias, int64_t nout, __nv_bfloat16* __restrict__ y,
                    int64_t ldy) {
  __shared__ GemvShared sm;
  const int64_t n0 = int64_t(blockIdx.x) * kTileRows;
  uint4 lo[kSteps], hi[kSteps];
  load_tile<kSteps>(wq, ldw, nout, n0, K, lo, hi);
  quantize_x(x, ldx, rows, K, sm);
  __syncthreads();
  finish_tile<kSteps>(lo, hi, rows, K, sm, 0, w_scale, bias, nout, n0, y, ldy);
}

// The item of `tile`, from the item of an earlier tile (a block's tiles only go up).
__device__ __forceinline__ int item_of(const Fp8GemvItem* __restrict__ items, int n_items, int64_t tile, int item) {
  while (item + 1 < n_items && tile >= items[item + 1].tile_begin) ++item;
  return item;
}

// A batch of linears on one x: each block quantises x once, then takes tiles blockIdx.x, + gridDim.x, ... across all
// items (one block per SM slot, so the grid sweeps the weights in address order), and loads the next tile into the
// other register set before computing the current one: the weights stream without a gap per tile, and nothing is
// spent per tile on launching a block or on x.
template <int kSteps>
__global__ void __launch_bounds__(kThreads, 1)
    fp8_gemv_batch_kernel(const __nv_bfloat16* __restrict__ x, int64_t ldx, int rows, int64_t K,
                          const Fp8GemvItem* __restrict__ items, int n_items, int64_t tiles) {
  __shared__ GemvShared sm;
  uint4 lo0[kSteps], hi0[kSteps], lo1[kSteps], hi1[kSteps];
  int64_t tile = blockIdx.x;  // < tiles: the grid is never larger
  int item = item_of(items, n_items, tile, 0);
  auto load = [&](int i, int64_t t, uint4(&lo)[kSteps], uint4(&hi)[kSteps]) {
    const Fp8GemvItem& it = items[i];
    load_tile<kSteps>(it.wq, it.ldw, it.nout, (t - it.tile_begin) * kTileRows, K, lo, hi);
  };
  auto finish = [&](int i, int64_t t, const uint4(&lo)[kSteps], const uint4(&hi)[kSteps], int set) {
    const Fp8GemvItem& it = items[i];
    finish_tile<kSteps>(lo, hi, rows, K, sm, set, it.w_scale, it.bias, it.nout, (t - it.tile_begin) * kTileRows,
                        it.y, it.ldy);
  };
  load(item, tile, lo0, hi0);
  quantize_x(x, ldx, rows, K, sm);
  __syncthreads();
  // Two tiles per pass, so that each register set keeps its name (a copy between sets would wait for the loads).
  for (;;) {
    int64_t next = tile + gridDim.x;
    int next_item = item;
    if (next < tiles) {
      next_item = item_of(items, n_items, next, item);
      load(next_item, next, lo1, hi1);
    }
    finish(item, tile, lo0, hi0, 0);
    if (next >= tiles) break;
    tile = next, item = next_item;

    next = tile + gridDim.x;
    if (next < tiles) {
      next_item = item_of(items, n_items, next, item);
      load(next_item, next, lo0, hi0);
    }
    finish(item, tile, lo1, hi1, 1);
    if (next >= tiles) break;
    tile = next, item = next_item;
  }
}

int compute_capability() {
  int device = 0, major = 0, minor = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return major * 10 + minor;
}

void require_sm89(const char* op) {
  static const int cc = compute_capability();
  if (cc < 89) fail(op, "fp8_gemv", "e4m3 tensor-core products need sm_89 or newer");
}

// Blocks of the batch kernel that run at once on the whole device.
template <int kSteps>
int64_t resident_batch_blocks(const char* op) {
  static const int64_t blocks = [op] {
    int device = 0, sms = 0, per_sm = 0;
    check(cudaGetDevice(&device), op, "cudaGetDevice");
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), op, "cudaDeviceGetAttribute");
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fp8_gemv_batch_kernel<kSteps>, kThreads, 0), op,
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    return int64_t(std::max(sms, 1)) * std::max(per_sm, 1);
  }();
  return blocks;
}

}  // namespace

bool fp8_gemv_fits(int64_t rows, int64_t K) {
  return rows >= 1 && rows <= kFp8GemvMaxRows && K > 0 && K % 16 == 0 && K <= kMaxK;
}

bool fp8_gemv_weights_ok(const void* wq, int64_t ldw) {
  return ldw % 16 == 0 && reinterpret_cast<uintptr_t>(wq) % 16 == 0;
}

bool fp8_gemv_input_ok(const void* x, int64_t ldx) {
  return ldx % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

int64_t fp8_gemv_tiles(int64_t nout) { return (nout + kTileRows - 1) / kTileRows; }

void launch_fp8_gemv(const __nv_bfloat16* x, int64_t ldx, int64_t rows, int64_t K, const uint8_t* wq, int64_t ldw,
                     const float* w_scale, const __nv_bfloat16* bias, int64_t nout, __nv_bfloat16* y, int64_t ldy,
                     cudaStream_t stream) {
  if (!fp8_gemv_fits(rows, K) || !fp8_gemv_weights_ok(wq, ldw) || !fp8_gemv_input_ok(x, ldx))
    fail("linear_fp8", "fp8_gemv", "shape or alignment the kernel does not take");
  require_sm89("linear_fp8");
  const int64_t blocks = fp8_gemv_tiles(nout);
  if (blocks == 0) return;
  if (blocks > int64_t(INT32_MAX)) fail("linear_fp8", "fp8_gemv", "too many output features");
  if (K <= kK3072)
    fp8_gemv_kernel<kStepsUpTo3072><<<unsigned(blocks), kThreads, 0, stream>>>(x, ldx, int(rows), K, wq, ldw,
                                                                              w_scale, bias, nout, y, ldy);
  else
    fp8_gemv_kernel<kMaxSteps><<<unsigned(blocks), kThreads, 0, stream>>>(x, ldx, int(rows), K, wq, ldw, w_scale,
                                                                         bias, nout, y, ldy);
  check_launch("linear_fp8", "fp8_gemv_kernel");
}

void launch_fp8_gemv_batch(const __nv_bfloat16* x, int64_t ldx, int64_t rows, int64_t K, const Fp8GemvItem* items,
                           int64_t n_items, int64_t tiles, cudaStream_t stream) {
  const char* op = "linear_fp8_batch";
  if (!fp8_gemv_fits(rows, K) || !fp8_gemv_input_ok(x, ldx))
    fail(op, "fp8_gemv_batch", "shape or alignment the kernel does not take");
  if (n_items > int64_t(INT32_MAX)) fail(op, "fp8_gemv_batch", "too many items");
  require_sm89(op);
  if (n_items == 0 || tiles == 0) return;
  const bool small = K <= kK3072;
  const int64_t grid = std::min(tiles, small ? resident_batch_blocks<kStepsUpTo3072>(op)
                                             : resident_batch_blocks<kMaxSteps>(op));
  if (small)
    fp8_gemv_batch_kernel<kStepsUpTo3072><<<unsigned(grid), kThreads, 0, stream>>>(x, ldx, int(rows), K, items,
                                                                                  int(n_items), tiles);
  else
    fp8_gemv_batch_kernel<kMaxSteps><<<unsigned(grid), kThreads, 0, stream>>>(x, ldx, int(rows), K, items,
                                                                             int(n_items), tiles);
  check_launch(op, "fp8_gemv_batch_kernel");
}

}  // namespace fluxswap::cuda
