#pragma once
// Host -> device copies straight out of pageable memory pinned in place for the copy: a file mapped from the page
// cache (or tmpfs), so that an upload from a file costs the DMA and the pinning instead of a CPU copy into pinned
// memory first (13-16 GB/s on the lent H100 host whatever the reader does: under half of what the bus takes). Only
// `fluxswap bench --lora-read-sweep` uses it, to time it: as the LoRA swap path it was measured slower than a pread
// into pinned memory (pinning runs at only ~10 GB/s there).
// Backend::copy_from_host_registered takes these; the types live here so that backend.h stays small.
#include <cstddef>
#include <string>

namespace fluxswap {

struct RegisteredUploadOptions {
  // Pinning walks the page table and pins every 4 KiB page, so the region is pinned chunk by chunk and each chunk
  // goes by DMA while the next ones are being pinned.
  size_t chunk_bytes = size_t(64) << 20;
  // Threads pinning chunks at once.
  unsigned threads = 4;
};

struct RegisteredUploadReport {
  bool registered = false;  // every byte inside the region went by DMA from memory pinned in place
  std::string fallback;     // else why not; those copies then went the ordinary way (copy_from_host_batch)
  std::string support;      // what the device says about pinning pageable memory (for reports)
  size_t chunks = 0, registered_chunks = 0;
  size_t direct_bytes = 0;  // sent from memory pinned in place
  size_t other_bytes = 0;   // sent the ordinary way (outside the region, converted, or after a pinning failure)
  double register_seconds = 0;    // inside the pinning calls, summed over the threads
  double unregister_seconds = 0;  // inside the unpinning calls
  double dma_seconds = 0;         // the copy engine busy with the pinned chunks (device events, summed)
  double wait_seconds = 0;        // the issuing thread waiting for chunks to be pinned
  double on_device_seconds = 0;   // from the call until every byte was on the device
  double total_seconds = 0;       // until the call returned (the last chunk unpinned)
};

}  // namespace fluxswap
