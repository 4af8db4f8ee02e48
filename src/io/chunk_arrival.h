#pragma once
// Which part of a byte range being read by several threads, chunk by chunk, is in memory. Chunks finish in any
// order. ready() is the longest run of finished chunks from the start, for consumers that walk the range in order;
// has() / wait_range() ask about any range, for readers that take the chunks in another order (a LoRA read in the
// order a step needs it). A failed read wakes every waiter with its message.
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace fluxswap {

class ChunkArrival {
 public:
  using Clock = std::chrono::steady_clock;

  // `bytes` split into chunks of `chunk_bytes` (> 0), the last one shorter.
  ChunkArrival(uint64_t bytes, uint64_t chunk_bytes);

  uint64_t bytes() const { return bytes_; }
  uint64_t chunks() const { return uint64_t(done_.size()); }
  // [begin, end) of chunk c.
  std::pair<uint64_t, uint64_t> chunk(uint64_t c) const;
  // The chunks that hold any of [begin, end) (first, one past the last).
  std::pair<uint64_t, uint64_t> chunks_of(uint64_t begin, uint64_t end) const;

  // A reader thread finished chunk c (idempotent).
  void finish(uint64_t c);
  // A reader thread failed; the first message is kept. Waiters for bytes not in yet throw it.
  void fail(const std::string& message);

  // Bytes [0, ready()) are in.
  uint64_t ready() const;
  bool complete() const { return ready() == bytes_; }
  // Blocks until bytes [0, end) are in (end is clamped to bytes()); returns ready(). Throws Error with the
  // failure's message when the read failed before getting there.
  uint64_t wait_until(uint64_t end) const;
  // Whether every chunk holding [begin, end) is finished; wait_range blocks until they are (throws as wait_until).
  bool has(uint64_t begin, uint64_t end) const;
  void wait_range(uint64_t begin, uint64_t end) const;
  // When the last chunk finished (only meaningful once complete()).
  Clock::time_point completed_at() const;

 private:
  const uint64_t bytes_, chunk_bytes_;
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  bool all_done(uint64_t begin, uint64_t end) const;  // under mutex_
  std::vector<bool> done_;
  uint64_t run_ = 0;  // chunks [0, run_) are finished
  uint64_t ready_ = 0;
  std::string failure_;
  Clock::time_point completed_at_{};
};

}  // namespace fluxswap
