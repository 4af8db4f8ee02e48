#include "backend/cuda/device_memory.h"

#include <cuda_runtime.h>

#include <cstdio>

#include "backend/cuda/cuda_check.h"

namespace fluxswap::cuda {

namespace {

// "1234567 bytes (1.2 MiB)": exact for the request, readable for the totals.
std::string mib(size_t bytes) {
  char s[32];
  std::snprintf(s, sizeof s, "%.1f MiB", double(bytes) / double(1 << 20));
  return s;
}

}  // namespace

DeviceMemory::DeviceMemory(int device) : device_(device), counters_(std::make_shared<Counters>()) {}

void DeviceMemory::reserve(size_t size, const char* op) {
  size_t used = counters_->in_use.load();
  for (;;) {
    const size_t limit = counters_->limit.load();
    if (limit && used + size > limit)
      throw Error(std::string("cuda backend: ") + op + ": the device memory budget of " + std::to_string(limit) +
                  " bytes (" + mib(limit) + ") would be exceeded: allocating " + std::to_string(size) + " bytes (" +
                  mib(size) + ") with " + std::to_string(used) + " bytes (" + mib(used) +
                  ") in use (the budget is --vram / Backend::set_memory_limit)");
    if (counters_->in_use.compare_exchange_weak(used, used + size)) break;
  }
  const size_t now = used + size;
  size_t peak = counters_->peak.load();
  while (now > peak && !counters_->peak.compare_exchange_weak(peak, now)) {
  }
}

std::shared_ptr<void> DeviceMemory::allocate(size_t bytes, const char* op) {
  // Zero-byte tensors still get a distinct, non-null pointer (a null data pointer means "undefined").
  const size_t size = bytes ? bytes : 1;
  check(cudaSetDevice(device_), op, "cudaSetDevice");
  reserve(size, op);
  void* p = nullptr;
  if (cudaError_t e = cudaMalloc(&p, size); e != cudaSuccess) {
    counters_->in_use -= size;
    cudaGetLastError();  // cudaMalloc also left its error as the last error: the next launch check must not see it
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    fail(op, "cudaMalloc", std::string(cudaGetErrorName(e)) + " allocating " + std::to_string(size) + " bytes (" +
                               std::to_string(free_b >> 20) + " MiB free of " + std::to_string(total_b >> 20) +
                               " MiB, this backend holds " + std::to_string(in_use() >> 20) + " MiB)");
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

size_t DeviceMemory::device_used() const {
  int current = 0;
  cudaGetDevice(&current);
  if (current != device_) check(cudaSetDevice(device_), "device_memory_used", "cudaSetDevice");
  size_t free_b = 0, total_b = 0;
  const cudaError_t e = cudaMemGetInfo(&free_b, &total_b);
  if (current != device_) cudaSetDevice(current);
  check(e, "device_memory_used", "cudaMemGetInfo");
  return total_b - free_b;
}

}  // namespace fluxswap::cuda
