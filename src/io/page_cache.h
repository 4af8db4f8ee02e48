#pragma once
// How much of a file the kernel holds in its page cache right now (mincore over a mapping of it). A benchmark that
// claims to read "from the page cache" measures this instead of assuming it: some machines keep little of a
// disk-backed file cached, and then a read measures the disk.
#include <cstdint>
#include <string>

namespace fluxswap {

struct PageCacheResidency {
  uint64_t bytes = 0;           // file size
  uint64_t resident_bytes = 0;  // of it, in pages the kernel holds
  double fraction() const { return bytes ? double(resident_bytes) / double(bytes) : 1.0; }
};

// Throws Error naming the file when it cannot be opened, is not a regular file, or cannot be mapped.
PageCacheResidency page_cache_residency(const std::string& path);

}  // namespace fluxswap
