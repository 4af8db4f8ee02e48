#include "backend/cuda/step_gate_kernels.h"

#include "backend/cuda/cuda_check.h"

namespace fluxswap::cuda {

namespace {

__global__ void wait_gate_kernel(const volatile uint32_t* flags, int gate, int count) {
  // Volatile loads go to L2, where the other stream's write lands; a short sleep keeps the spin off the memory system.
  while (int32_t(flags[gate] - flags[count]) < 0) __nanosleep(256);
}

__global__ void set_word_kernel(uint32_t* word, uint32_t value) {
  __threadfence();  // the stream's earlier writes (a slot fill) are visible before the gate opens
  *reinterpret_cast<volatile uint32_t*>(word) = value;
}

}  // namespace

void launch_wait_gate(const uint32_t* flags, int gate, int count, cudaStream_t stream) {
  wait_gate_kernel<<<1, 1, 0, stream>>>(flags, gate, count);
  check_launch("wait_gate", "wait_gate_kernel");
}

void launch_set_word(uint32_t* word, uint32_t value, cudaStream_t stream) {
  set_word_kernel<<<1, 1, 0, stream>>>(word, value);
  check_launch("open_gate", "set_word_kernel");
}

}  // namespace fluxswap::cuda
