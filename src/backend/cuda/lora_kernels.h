#pragma once
// Filling runtime LoRA slots: many small scaled copies in one launch instead of one launch each (a FLUX.1 adapter
// on every block linear is ~1000 of them, and launches, not bytes, dominated the swap).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fluxswap::cuda {

// dst[r, c] = alpha * src[r, c] for r < rows, c < cols; row strides in elements.
struct ScaledCopyDesc {
  const __nv_bfloat16* src;
  __nv_bfloat16* dst;
  int64_t rows, cols, src_ld, dst_ld;
  float alpha;
};

// `descs` in device memory; count of them. Enqueued on `stream`.
void launch_scaled_copies(const ScaledCopyDesc* descs, int64_t count, cudaStream_t stream);

}  // namespace fluxswap::cuda
