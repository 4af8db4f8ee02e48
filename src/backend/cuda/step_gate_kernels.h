#pragma once
// The device side of Backend's step gates (cuda_step_gates.cpp): a gate is a 32-bit round number in device memory,
// open when it has reached the round the compute queue is in (the word after the gates).
#include <cstdint>

#include <cuda_runtime.h>

namespace fluxswap::cuda {

// One thread that returns once flags[gate] has reached flags[count] (the current round; wrap-around safe), then
// writes the device clock (ns) to *passed.
void launch_wait_gate(const uint32_t* flags, int gate, int count, uint64_t* passed, cudaStream_t stream);
// *word = value, ordered after the stream's earlier work, then the device clock (ns) to *stamp.
void launch_set_word(uint32_t* word, uint32_t value, uint64_t* stamp, cudaStream_t stream);

}  // namespace fluxswap::cuda
