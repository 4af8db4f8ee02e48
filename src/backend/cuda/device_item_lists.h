#pragma once
// The CUDA backend's batched launches read their item lists (descriptors with pointers and sizes) from device
// memory; these are those lists, uploaded once per distinct content.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend/cuda/cuda_backend.h"

namespace fluxswap::cuda {

// Item lists of batched launches (linear_fp8_batch, gated_output_factors) on the device, keyed by their kind and
// contents (pointers, strides, sizes): a list issued once outside a recording is found again while recording, with
// no upload. Lists are packed into chunks, and none is ever freed or rewritten: a recorded graph keeps reading the
// copy it was captured with. (A list whose tensors moved is a new key; the old copy, a few KiB, stays.)
struct DeviceItemLists {
  std::unordered_map<std::string, const void*> lists;
  std::vector<Tensor> chunks;
  size_t used = 0;  // bytes taken in the last chunk
};

// The device copy of a descriptor list: found, or uploaded (outside recordings only) into fresh chunk bytes, which no
// launch in flight reads.
template <class Item, class Alloc>
const Item* device_list(DeviceItemLists& cache, const std::vector<Item>& descs, bool capturing, Alloc&& alloc,
                        cudaStream_t stream, const char* op) {
  const size_t bytes = descs.size() * sizeof(Item);
  std::string key = op;  // the kind
  key.push_back('\0');
  key.append(reinterpret_cast<const char*>(descs.data()), bytes);
  if (auto it = cache.lists.find(key); it != cache.lists.end()) return static_cast<const Item*>(it->second);
  if (capturing) bad(op, "a new list of items was first issued while recording; run it once before record()");
  constexpr size_t kChunkBytes = 64 * 1024;
  if (cache.chunks.empty() || cache.used + bytes > size_t(cache.chunks.back().nbytes())) {
    cache.chunks.push_back(alloc(int64_t(std::max(kChunkBytes, bytes))));
    cache.used = 0;
  }
  auto* dst = reinterpret_cast<Item*>(static_cast<char*>(cache.chunks.back().data()) + cache.used);
  // From pageable memory: the call returns once the list is staged, so `descs` may go.
  check(cudaMemcpyAsync(dst, descs.data(), bytes, cudaMemcpyHostToDevice, stream), op, "cudaMemcpyAsync");
  cache.used += (bytes + 255) / 256 * 256;
  cache.lists.emplace(std::move(key), dst);
  return dst;
}

}  // namespace fluxswap::cuda
