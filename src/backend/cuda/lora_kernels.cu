#include "backend/cuda/cuda_check.h"
#include "backend/cuda/lora_kernels.h"

namespace fluxswap::cuda {

namespace {

constexpr int kThreads = 256;
constexpr unsigned kBlocksPerCopy = 48;

// One row of blocks (blockIdx.y) per copy; grid-stride over its elements. float32 math, like axpy onto zeros.
__global__ void scaled_copies_kernel(const ScaledCopyDesc* descs) {
  const ScaledCopyDesc d = descs[blockIdx.y];
  const int64_t total = d.rows * d.cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / d.cols, c = i - r * d.cols;
    d.dst[r * d.dst_ld + c] = __float2bfloat16(d.alpha * __bfloat162float(d.src[r * d.src_ld + c]));
  }
}

}  // namespace

void launch_scaled_copies(const ScaledCopyDesc* descs, int64_t count, cudaStream_t stream) {
  // gridDim.y is limited to 65535: long lists go in pieces.
  for (int64_t first = 0; first < count; first += 65535) {
    const unsigned n = unsigned(count - first < 65535 ? count - first : 65535);
    scaled_copies_kernel<<<dim3(kBlocksPerCopy, n), kThreads, 0, stream>>>(descs + first);
    check_launch("scaled_copy_batch", "scaled_copies_kernel");
  }
}

}  // namespace fluxswap::cuda
