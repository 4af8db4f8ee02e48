#pragma once
// Where whole files are read to on their way to a device: the CUDA backend hands out pinned memory, which uploads
// send by DMA as it is; the CPU backend has no use for one (files are mapped instead).
#include <cstddef>
#include <functional>
#include <memory>

namespace fluxswap {

using HostBufferAllocator = std::function<std::shared_ptr<void>(size_t bytes)>;

}  // namespace fluxswap
