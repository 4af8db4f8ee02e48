#pragma once
// Finding the first NaN or infinity of many device tensors in one launch: an upload straight from a mapped file has
// no host pass over the values, so they are checked on the device before anything reads them.
#include <cuda_runtime.h>

#include <cstdint>

namespace fluxswap::cuda {

// Elements each block scans (a multiple of 8, so 16-byte words never straddle two blocks).
constexpr int64_t kNonFiniteTile = 16384;

struct NonFiniteDesc {
  const void* data;
  int64_t numel;
  int64_t first_block;  // blocks of the tensors before this one (tiles of kNonFiniteTile elements)
  uint32_t mask;        // exponent bits: all set means NaN or infinity
  int32_t elem_bytes;   // 2 (BF16, F16) or 4 (F32)
};

// `descs` (device memory, `count`, ascending first_block) over `blocks` blocks in all; first[i] (device, set to all
// ones before) gets the lowest index of a non-finite element of tensor i. Enqueued on `stream`.
void launch_find_non_finite(const NonFiniteDesc* descs, int count, int64_t blocks, unsigned long long* first,
                            cudaStream_t stream);

}  // namespace fluxswap::cuda
