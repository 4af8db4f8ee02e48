#pragma once
// Host -> device copies whose sources may be views of a file still being read (SafetensorsFile::read_in_background):
// sent in the order of the host bytes, each batch as soon as its sources are in, so the transfers of the first
// tensors run while the later chunks are still being read. Sources outside the file (or with no file) count as in.
#include <functional>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "io/safetensors.h"

namespace fluxswap {

using HostToDevice = std::vector<std::pair<Tensor, Tensor>>;  // (host source, device destination)

struct StreamedUploadStats {
  size_t batches = 0;
  double waited_seconds = 0;  // blocked on the file
};

// `copies` sorted by host address. Each batch waits for at least `min_batch_bytes` of sources beyond the last batch
// (or all that remain: small transfers waste the bus) and then takes every further source already in. `send` gets
// every copy exactly once, in order. Throws Error from the file when its read fails before a source is in.
StreamedUploadStats upload_as_it_arrives(const SafetensorsFile* file, const HostToDevice& copies,
                                         size_t min_batch_bytes, const std::function<void(const HostToDevice&)>& send);

}  // namespace fluxswap
