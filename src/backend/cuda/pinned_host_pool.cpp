#include "backend/cuda/pinned_host_pool.h"

#include <cuda_runtime.h>

#include <string>

#include "core/error.h"

namespace fluxswap::cuda {

PinnedHostPool::~PinnedHostPool() {
  for (auto& [size, p] : free_) cudaFreeHost(p);
}

std::shared_ptr<void> PinnedHostPool::allocate(size_t bytes) {
  void* p = nullptr;
  size_t size = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    // The smallest free buffer that fits, unless it wastes more than half of itself.
    if (auto it = free_.lower_bound(bytes); it != free_.end() && it->first / 2 <= bytes) {
      size = it->first, p = it->second;
      free_.erase(it);
    }
  }
  if (!p) {
    size = bytes;
    if (cudaError_t e = cudaHostAlloc(&p, size, cudaHostAllocDefault); e != cudaSuccess)
      throw Error("cannot pin " + std::to_string(size) + " bytes of host memory: " + cudaGetErrorString(e));
    std::lock_guard<std::mutex> lock(mutex_);
    all_[static_cast<const char*>(p)] = size;
  }
  std::weak_ptr<PinnedHostPool> pool = weak_from_this();
  return std::shared_ptr<void>(p, [pool, size](void* q) {
    if (auto owner = pool.lock())
      owner->give_back(q, size);
    else
      cudaFreeHost(q);
  });
}

bool PinnedHostPool::contains(const void* p, size_t bytes) const {
  const auto* c = static_cast<const char*>(p);
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = all_.upper_bound(c);
  if (it == all_.begin()) return false;
  --it;
  return c >= it->first && c + bytes <= it->first + it->second;
}

void PinnedHostPool::give_back(void* p, size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  free_.emplace(bytes, p);
}

}  // namespace fluxswap::cuda
