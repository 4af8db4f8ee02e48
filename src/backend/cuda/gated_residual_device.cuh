#pragma once
// The gated residual's arithmetic, shared by gated_residual (elementwise_kernels.cu) and the LayerNorm it feeds
// (norm_kernels.cu), which must round every element of x identically.
#include <cuda_runtime.h>

namespace fluxswap::cuda {

// x + gate * branch as one fused multiply-add, spelled out: were it left to the compiler, either kernel could be
// contracted differently and the fused norm would no longer reproduce the two ops bit for bit.
__device__ __forceinline__ float gated_residual_value(float x, float gate, float branch) {
  return __fmaf_rn(gate, branch, x);
}

}  // namespace fluxswap::cuda
