#pragma once
// Device allocations with byte counters. Each allocation is owned by a shared_ptr whose deleter frees it and
// updates the counters; the counters are shared with the deleters, so a Tensor may outlive its backend.
#include <atomic>
#include <cstddef>
#include <memory>

namespace fluxswap::cuda {

class DeviceMemory {
 public:
  explicit DeviceMemory(int device);

  // `op` names the caller in the error raised when the device is out of memory.
  std::shared_ptr<void> allocate(size_t bytes, const char* op);

  size_t in_use() const { return counters_->in_use.load(); }
  size_t peak() const { return counters_->peak.load(); }

 private:
  struct Counters {
    std::atomic<size_t> in_use{0}, peak{0};
  };
  int device_;
  std::shared_ptr<Counters> counters_;
};

}  // namespace fluxswap::cuda
