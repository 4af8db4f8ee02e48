#include "backend/cuda/step_gate_kernels.h"

#include "backend/cuda/cuda_check.h"

namespace fluxswap::cuda {

namespace {

__device__ inline uint64_t clock_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void wait_gate_kernel(const volatile uint32_t* flags, int gate, int count, uint64_t* passed) {
  // Volatile loads go to L2, where the other stream's write lands; a short sleep keeps the spin off the memory system.
  while (int32_t(flags[gate] - flags[count]) < 0) __nanosleep(256);
  *passed = clock_ns();
}

__global__ void set_word_kernel(uint32_t* word, uint32_t value, uint64_t* stamp) {
  __threadfence();  // the stream's earlier writes (a slot fill) are visible before the gate opens
  *reinterpret_cast<volatile uint32_t*>(word) = value;
  *stamp = clock_ns();
}

}  // namespace

void launch_wait_gate(const uint32_t* flags, int gate, int count, uint64_t* passed, cudaStream_t stream) {
  wait_gate_kernel<<<1, 1, 0, stream>>>(flags, gate, count, passed);
  check_launch("wait_gate", "wait_gate_kernel");
}

void launch_set_word(uint32_t* word, uint32_t value, uint64_t* stamp, cudaStream_t stream) {
  set_word_kernel<<<1, 1, 0, stream>>>(word, value, stamp);
  check_launch("open_gate", "set_word_kernel");
}

}  // namespace fluxswap::cuda
