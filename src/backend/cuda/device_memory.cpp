#include "backend/cuda/device_memory.h"

#include <cuda_runtime.h>

#include "backend/cuda/cuda_check.h"

namespace fluxswap::cuda {

DeviceMemory::DeviceMemory(int device) : device_(device), counters_(std::make_shared<Counters>()) {}

std::shared_ptr<void> DeviceMemory::allocate(size_t bytes, const char* op) {
  // Zero-byte tensors still get a distinct, non-null pointer (a null data pointer means "undefined").
  const size_t size = bytes ? bytes : 1;
  check(cudaSetDevice(device_), op, "cudaSetDevice");
  void* p = nullptr;
  if (cudaError_t e = cudaMalloc(&p, size); e != cudaSuccess) {
    cudaGetLastError();  // cudaMalloc also left its error as the last error: the next launch check must not see it
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    fail(op, "cudaMalloc", std::string(cudaGetErrorName(e)) + " allocating " + std::to_string(size) + " bytes (" +
                               std::to_string(free_b >> 20) + " MiB free of " + std::to_string(total_b >> 20) +
                               " MiB, this backend holds " + std::to_string(in_use() >> 20) + " MiB)");
  }
  const size_t now = counters_->in_use += size;
  size_t peak = counters_->peak.load();
  while (now > peak && !counters_->peak.compare_exchange_weak(peak, now)) {
  }
  auto counters = counters_;
  const int device = device_;
  return std::shared_ptr<void>(p, [counters, device, size](void* q) {
    // Deleters must not throw; a failure here (e.g. at process exit, after the runtime unloaded) is ignored.
    int current = 0;
    cudaGetDevice(&current);
    if (current != device) cudaSetDevice(device);
    cudaFree(q);
    if (current != device) cudaSetDevice(current);
    counters->in_use -= size;
  });
}

}  // namespace fluxswap::cuda
