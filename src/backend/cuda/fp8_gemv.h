#pragma once
// The FP8 linear for a few rows (the modulation linears: one conditioning vector per sample): a weight-streaming
// kernel instead of a GEMM, whose tiles would mostly multiply padding. The same arithmetic as the FP8 GEMM path
// and the CPU reference: each x row quantised to e4m3 with its own scale (quant/fp8.h), float32 accumulation, the
// product scaled by the row's and the output feature's scales, plus bias.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fluxswap::cuda {

// Rows of x the kernel takes at most (they are columns of an m16n8k32 tensor-core product), and whether a shape fits
// it (K a multiple of 16, at most 4096). The kernel needs sm_89 or newer; the launchers refuse older GPUs.
constexpr int64_t kFp8GemvMaxRows = 2;
bool fp8_gemv_fits(int64_t rows, int64_t K);
// The alignment the kernels need: weight rows 16-byte aligned (ldw in bytes), x rows 16-byte aligned (ldx in
// elements).
bool fp8_gemv_weights_ok(const void* wq, int64_t ldw);
bool fp8_gemv_input_ok(const void* x, int64_t ldx);

// y[r, n] = e4m3(x[r]) . wq[n] * (sx[r] * w_scale[n]) + bias[n]; x rows at stride ldx (bf16), wq rows at stride ldw
// (bytes, K a multiple of 16, 16-byte aligned rows; x rows 16-byte aligned too), y rows at stride ldy; bias may be
// null.
void launch_fp8_gemv(const __nv_bfloat16* x, int64_t ldx, int64_t rows, int64_t K, const uint8_t* wq, int64_t ldw,
                     const float* w_scale, const __nv_bfloat16* bias, int64_t nout, __nv_bfloat16* y, int64_t ldy,
                     cudaStream_t stream);

// One linear of a batch (launch_fp8_gemv_batch), as launch_fp8_gemv's arguments. Its output features are cut into
// tiles of kFp8GemvTileRows; tile_begin is the number of tiles of the items before it in the list.
constexpr int64_t kFp8GemvTileRows = 16;
struct Fp8GemvItem {
  const uint8_t* wq;
  int64_t ldw;
  const float* w_scale;
  const __nv_bfloat16* bias;  // or null
  __nv_bfloat16* y;
  int64_t ldy;
  int64_t nout;
  int64_t tile_begin;
};
int64_t fp8_gemv_tiles(int64_t nout);

// launch_fp8_gemv for every item of `items` (device memory, n_items entries, `tiles` tiles in all, each item with
// nout >= 1) on the same x, in one launch whose blocks stream all the items' weights; every y bit for bit as
// launch_fp8_gemv writes it. The list is read by the kernel: it must stay unchanged until the launch completes.
void launch_fp8_gemv_batch(const __nv_bfloat16* x, int64_t ldx, int64_t rows, int64_t K, const Fp8GemvItem* items,
                           int64_t n_items, int64_t tiles, cudaStream_t stream);

}  // namespace fluxswap::cuda
