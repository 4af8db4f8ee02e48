#pragma once
// NF4 (bitsandbytes layout, see quant/nf4.h) on the GPU: dequantisation to bf16 rows, and y = x · dequant(W)^T for
// the T5 linears in two forms: dequantise to a bf16 scratch and run cuBLASLt (fastest at prompt lengths, where the
// product is compute-bound), or one fused kernel that dequantises W tile by tile into shared memory and multiplies on
// bf16 tensor cores (no scratch; for few tokens, where the product is bound by reading W).
//
// Launchers take raw device pointers, enqueue on `stream` without synchronising, never allocate (so they can be
// captured in a CUDA graph), and throw fluxswap::Error naming the launcher on a bad argument or a failed launch.
// Dequantised values are bit-identical to the CPU reference (dequantize_nf4 rounded to bf16 to nearest even): the
// same float32 products in the same order, with no fused multiply-adds.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fluxswap::cuda {

// One NF4 matrix on the device: logical [rows, cols] row-major (a linear's [out, in]), flattened row by row into
// bnb's blocks.
struct Nf4Matrix {
  const uint8_t* packed = nullptr;  // (rows * cols + 1) / 2 bytes; element 2i in the high nibble of byte i
  int64_t rows = 0, cols = 0;
  int64_t blocksize = 64;  // a power of two from 32 to 4096
  // Exactly one of the two absmax forms:
  const float* absmax = nullptr;         // float32 per block, or
  const uint8_t* absmax_q = nullptr;     // nested: per block an index into nested_code,
  const float* nested_absmax = nullptr;  //   a float32 scale per nested block,
  const float* nested_code = nullptr;    //   the 256-entry map,
  int64_t nested_blocksize = 256;
  float nested_offset = 0.0f;  //   and the offset: absmax = nested_code[q] * nested_absmax[b / nb] + offset
  float code[16] = {};         // the quant map (kNf4Code), passed by value to the kernels
};

// out[r, c] (row stride ld_out elements, >= cols) = bf16(code[q] * absmax) for the whole matrix.
void launch_nf4_dequantize(const Nf4Matrix& w, __nv_bfloat16* out, int64_t ld_out, cudaStream_t stream);

// y[T, rows] (row stride ldy) = x[T, cols] (row stride ldx) · dequant(W)^T, float32 accumulation, bf16 out:
// dequantises W into w_scratch (rows * cols bf16, contiguous) and multiplies with cuBLASLt on `handle`, using up to
// workspace_bytes of `workspace` (may be null with 0 bytes). The plan is chosen on every call (a heuristic query of
// microseconds, against a product of tens of microseconds or more).
void nf4_linear_cublaslt(cublasLtHandle_t handle, const Nf4Matrix& w, const __nv_bfloat16* x, int64_t ldx, int64_t T,
                         __nv_bfloat16* y, int64_t ldy, __nv_bfloat16* w_scratch, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream);

// Whether launch_nf4_fused_gemm takes these operands: cols a multiple of 64, ldx a multiple of 8, x and packed
// 16-byte aligned.
bool nf4_fused_gemm_supported(const Nf4Matrix& w, const __nv_bfloat16* x, int64_t ldx);
// The same product as nf4_linear_cublaslt in one kernel, without scratch. Throws Error when the operands are not
// supported (see above).
void launch_nf4_fused_gemm(const Nf4Matrix& w, const __nv_bfloat16* x, int64_t ldx, int64_t T, __nv_bfloat16* y,
                           int64_t ldy, cudaStream_t stream);

}  // namespace fluxswap::cuda
