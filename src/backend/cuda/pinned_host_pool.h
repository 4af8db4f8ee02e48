#pragma once
// Pinned (page-locked) host buffers, recycled: pinning hundreds of megabytes costs more than reading a LoRA file,
// so a buffer given back is kept for the next file of at most its size. Buffers outlive the pool if still held.
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>

namespace fluxswap::cuda {

class PinnedHostPool : public std::enable_shared_from_this<PinnedHostPool> {
 public:
  ~PinnedHostPool();
  // A buffer of at least `bytes`; back to the pool when the last reference goes. Throws Error when pinning fails.
  std::shared_ptr<void> allocate(size_t bytes);
  // Whether [p, p + bytes) lies inside one buffer of this pool (in use or not).
  bool contains(const void* p, size_t bytes) const;

 private:
  void give_back(void* p, size_t bytes);

  mutable std::mutex mutex_;
  std::multimap<size_t, void*> free_;         // by size
  std::map<const char*, size_t> all_;         // start -> size, every buffer
};

}  // namespace fluxswap::cuda
