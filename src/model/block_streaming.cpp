#include "model/block_streaming.h"

#include <algorithm>

#include "core/error.h"

namespace fluxswap {

namespace {
std::string block_name(size_t b) { return "transformer block " + std::to_string(b); }
}  // namespace

void BlockStreamer::configure(Backend& backend, const std::vector<std::vector<Tensor*>>& blocks,
                              const std::vector<bool>& resident, int depth) {
  const bool none = std::all_of(resident.begin(), resident.end(), [](bool r) { return r; });
  if (!none && resident.size() != blocks.size())
    throw Error("block streaming: a plan for " + std::to_string(resident.size()) + " blocks, the transformer has " +
                std::to_string(blocks.size()));
  if (!none && (depth < 1 || depth + 1 > Backend::kStreamBuffers))
    throw Error("block streaming: prefetch depth " + std::to_string(depth) + " is not in 1.." +
                std::to_string(Backend::kStreamBuffers - 1));
  if (offload_.size() != blocks.size()) {
    if (active()) throw Error("internal: the transformer's block count changed while streaming");
    offload_.assign(blocks.size(), WeightOffload());
  }
  backend.synchronize();  // queued steps may still read the buffers
  // Leaving first, then the buffers, then what comes back: the peak stays below both configurations' sums.
  std::vector<int> ordinal(blocks.size(), -1);
  std::vector<size_t> streamed;
  for (size_t b = 0; b < blocks.size() && !none; ++b)
    if (!resident[b]) {
      ordinal[b] = int(streamed.size());
      streamed.push_back(b);
      offload_[b].offload(backend, blocks[b], block_name(b));
    }
  ring_.clear();
  for (size_t b = 0; b < blocks.size(); ++b)
    if (ordinal[b] < 0 && !offload_[b].resident()) offload_[b].onload(backend, blocks[b], block_name(b));
  ordinal_ = std::move(ordinal);
  streamed_ = std::move(streamed);
  depth_ = streamed_.empty() ? 0 : depth;
  if (streamed_.empty()) return;
  uint64_t largest = 0;
  for (size_t b : streamed_) largest = std::max(largest, offload_[b].arena_bytes());
  const size_t buffers = std::min(streamed_.size(), size_t(depth_ + 1));
  for (size_t i = 0; i < buffers; ++i) ring_.push_back(backend.empty(DType::U8, {int64_t(largest)}));
  for (size_t j = 0; j < streamed_.size(); ++j)
    offload_[streamed_[j]].bind(ring_[size_t(buffer_of(j))], blocks[streamed_[j]], block_name(streamed_[j]));
}

uint64_t BlockStreamer::bytes_per_forward() const {
  uint64_t total = 0;
  for (size_t b : streamed_) total += offload_[b].arena_bytes();
  return total;
}

uint64_t BlockStreamer::buffer_bytes() const {
  uint64_t total = 0;
  for (const Tensor& t : ring_) total += t.nbytes();
  return total;
}

void BlockStreamer::invalidate(size_t block) {
  if (streamed(block)) throw Error("internal: a streamed block's weights cannot change on the device");
  if (block < offload_.size()) offload_[block].invalidate();
}

void BlockStreamer::upload(Backend& backend, size_t ordinal) {
  const WeightOffload& o = offload_[streamed_[ordinal]];
  const Tensor& buffer = ring_[size_t(buffer_of(ordinal))];
  backend.stream_upload(o.host_arena(), buffer.narrow(0, 0, int64_t(o.arena_bytes())), buffer_of(ordinal));
}

void BlockStreamer::begin(Backend& backend) {
  for (size_t j = 0; j < streamed_.size() && j < size_t(depth_); ++j) upload(backend, j);
}

void BlockStreamer::before_block(Backend& backend, size_t block) {
  if (!streamed(block)) return;
  const size_t j = size_t(ordinal_[block]);
  backend.wait_stream_upload(buffer_of(j));
  if (j + size_t(depth_) < streamed_.size()) upload(backend, j + size_t(depth_));
}

}  // namespace fluxswap
