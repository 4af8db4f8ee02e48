#pragma once
// Transformer blocks that do not all fit on the device (a "streamed" memory plan): the blocks planned off the device
// wait in pinned host memory, one arena each, and pass through a few device buffers in turn, each uploaded on the
// backend's copy queue while earlier blocks compute. A block's tensors always point into the same buffer (its
// position among the streamed blocks modulo the buffer count), so a recorded step replays the uploads as well.
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/weight_offload.h"

namespace fluxswap {

class BlockStreamer {
 public:
  // blocks[b]: the device tensors of block b in execution order (rewritten in place). Blocks with resident[b] false
  // leave the device (their bytes copied to pinned host memory the first time, or taken from host tensors) and are
  // bound to one of depth + 1 buffers; blocks resident again come back onto the device. An empty `resident` or one
  // with every block resident ends streaming. depth 1 or 2: uploads in flight while a block computes.
  void configure(Backend& backend, const std::vector<std::vector<Tensor*>>& blocks, const std::vector<bool>& resident,
                 int depth);
  bool active() const { return !streamed_.empty(); }
  bool streamed(size_t block) const { return block < ordinal_.size() && ordinal_[block] >= 0; }
  int depth() const { return depth_; }
  size_t streamed_blocks() const { return streamed_.size(); }
  // Host -> device bytes per forward pass, and the device bytes of the buffers.
  uint64_t bytes_per_forward() const;
  uint64_t block_upload_bytes(size_t block) const { return streamed(block) ? offload_[block].arena_bytes() : 0; }
  uint64_t buffer_bytes() const;
  // Block b's weights changed on the device while resident: its host copy is stale.
  void invalidate(size_t block);

  // In the forward pass: begin() before the first block starts the first uploads; before_block(b) before each block
  // makes the block wait for its own upload and starts the one `depth` streamed blocks ahead into the buffer the
  // previous block has just been given its last work on.
  void begin(Backend& backend);
  void before_block(Backend& backend, size_t block);

 private:
  void upload(Backend& backend, size_t ordinal);
  int buffer_of(size_t ordinal) const { return int(ordinal % ring_.size()); }

  std::vector<WeightOffload> offload_;  // per block (used for the streamed ones)
  std::vector<int> ordinal_;            // per block: position among the streamed blocks, -1 when resident
  std::vector<size_t> streamed_;        // the streamed blocks in execution order
  std::vector<Tensor> ring_;            // depth + 1 device buffers
  int depth_ = 0;
};

}  // namespace fluxswap
