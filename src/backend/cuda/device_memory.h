#pragma once
// Device allocations with byte counters and an optional budget. Each allocation is owned by a shared_ptr whose
// deleter frees it and updates the counters; the counters are shared with the deleters, so a Tensor may outlive its
// backend.
#include <atomic>
#include <cstddef>
#include <memory>

namespace fluxswap::cuda {

class DeviceMemory {
 public:
  explicit DeviceMemory(int device);

  // `op` names the caller in the error raised when the device is out of memory or the budget would be exceeded.
  std::shared_ptr<void> allocate(size_t bytes, const char* op);

  size_t in_use() const { return counters_->in_use.load(); }
  size_t peak() const { return counters_->peak.load(); }
  // Starts the peak again from what is in use now.
  void reset_peak() { counters_->peak.store(counters_->in_use.load()); }

  // A budget emulating a smaller card: an allocation that would take in_use() past it throws Error instead of
  // reaching cudaMalloc, so the emulation never silently uses more than the card it stands for. 0: none. Lowering it
  // below what is in use is allowed; later allocations then fail until enough is freed.
  void set_limit(size_t bytes) { counters_->limit.store(bytes); }
  size_t limit() const { return counters_->limit.load(); }

  // Used memory of the whole device as the driver reports it (cudaMemGetInfo: total - free): this allocator's
  // memory plus the CUDA context, libraries' own allocations and other processes.
  size_t device_used() const;

 private:
  struct Counters {
    std::atomic<size_t> in_use{0}, peak{0}, limit{0};
  };
  // Counts `size` bytes as in use before they are allocated, so concurrent allocations cannot overshoot the budget
  // together; throws the budget error when they would exceed it.
  void reserve(size_t size, const char* op);
  int device_;
  std::shared_ptr<Counters> counters_;
};

}  // namespace fluxswap::cuda
