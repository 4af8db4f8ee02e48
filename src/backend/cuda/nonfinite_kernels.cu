#include "backend/cuda/cuda_check.h"
#include "backend/cuda/nonfinite_kernels.h"

namespace fluxswap::cuda {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ bool all_ones(uint32_t bits, uint32_t mask) { return (bits & mask) == mask; }

// One tile of one tensor per block. 16-byte loads where the tensor is 16-byte aligned (every tile start is, then),
// element loads for the rest. Each thread walks its elements in increasing order and stops at its first hit, so the
// atomicMin of the hits is the tensor's first bad element.
__global__ void find_non_finite_kernel(const NonFiniteDesc* descs, int count, unsigned long long* first) {
  int lo = 0, hi = count - 1;  // the last tensor whose first block is at or before this one
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (descs[mid].first_block <= int64_t(blockIdx.x))
      lo = mid;
    else
      hi = mid - 1;
  }
  const NonFiniteDesc d = descs[lo];
  const int64_t e0 = (int64_t(blockIdx.x) - d.first_block) * kNonFiniteTile;
  const int64_t e1 = min(d.numel, e0 + kNonFiniteTile);
  const int per_word = 16 / d.elem_bytes;
  const bool aligned = (reinterpret_cast<uintptr_t>(d.data) & 15) == 0;
  const int64_t words_end = aligned ? e1 / per_word * per_word : e0;  // [e0, words_end) in whole 16-byte words
  unsigned long long found = ~0ull;
  for (int64_t w = e0 / per_word + threadIdx.x; w < words_end / per_word && found == ~0ull; w += blockDim.x) {
    const uint4 q = reinterpret_cast<const uint4*>(d.data)[w];
    const uint32_t parts[4] = {q.x, q.y, q.z, q.w};
    for (int j = 0; j < 4 && found == ~0ull; ++j) {
      if (d.elem_bytes == 4) {
        if (all_ones(parts[j], d.mask)) found = (unsigned long long)(w * 4 + j);
      } else if (all_ones(parts[j] & 0xffffu, d.mask)) {  // little-endian: the lower half comes first
        found = (unsigned long long)(w * 8 + 2 * j);
      } else if (all_ones(parts[j] >> 16, d.mask)) {
        found = (unsigned long long)(w * 8 + 2 * j + 1);
      }
    }
  }
  for (int64_t e = words_end + threadIdx.x; e < e1 && found == ~0ull; e += blockDim.x) {
    const uint32_t bits = d.elem_bytes == 4 ? static_cast<const uint32_t*>(d.data)[e]
                                            : uint32_t(static_cast<const uint16_t*>(d.data)[e]);
    if (all_ones(bits, d.mask)) found = (unsigned long long)e;
  }
  if (found != ~0ull) atomicMin(first + lo, found);
}

}  // namespace

void launch_find_non_finite(const NonFiniteDesc* descs, int count, int64_t blocks, unsigned long long* first,
                            cudaStream_t stream) {
  if (count <= 0 || blocks <= 0) return;
  // gridDim.x allows 2^31 - 1 blocks: 35 T elements, far beyond any device's memory.
  find_non_finite_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(descs, count, first);
  check_launch("find_non_finite", "find_non_finite_kernel");
}

}  // namespace fluxswap::cuda
