#include "io/chunk_arrival.h"

#include <algorithm>

#include "core/error.h"

namespace fluxswap {

ChunkArrival::ChunkArrival(uint64_t bytes, uint64_t chunk_bytes) : bytes_(bytes), chunk_bytes_(chunk_bytes) {
  if (chunk_bytes == 0) throw Error("ChunkArrival: chunk size 0, expected at least one byte");
  done_.assign(size_t((bytes + chunk_bytes - 1) / chunk_bytes), false);
  if (bytes == 0) completed_at_ = Clock::now();
}

std::pair<uint64_t, uint64_t> ChunkArrival::chunk(uint64_t c) const {
  return {c * chunk_bytes_, std::min(bytes_, (c + 1) * chunk_bytes_)};
}

std::pair<uint64_t, uint64_t> ChunkArrival::chunks_of(uint64_t begin, uint64_t end) const {
  end = std::min(end, bytes_);
  if (begin >= end) return {0, 0};
  return {begin / chunk_bytes_, (end + chunk_bytes_ - 1) / chunk_bytes_};
}

void ChunkArrival::finish(uint64_t c) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (c >= done_.size() || done_[c]) return;
  done_[c] = true;
  if (c == run_) {  // the run from the start grows
    while (run_ < done_.size() && done_[run_]) ++run_;
    ready_ = std::min(bytes_, run_ * chunk_bytes_);
    if (ready_ == bytes_) completed_at_ = Clock::now();
  }
  changed_.notify_all();  // range waiters may be waiting for any chunk
}

void ChunkArrival::fail(const std::string& message) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (failure_.empty()) failure_ = message.empty() ? "read failed" : message;
  changed_.notify_all();
}

uint64_t ChunkArrival::ready() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return ready_;
}

uint64_t ChunkArrival::wait_until(uint64_t end) const {
  end = std::min(end, bytes_);
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] { return ready_ >= end || !failure_.empty(); });
  if (ready_ < end) throw Error(failure_);
  return ready_;
}

bool ChunkArrival::all_done(uint64_t begin, uint64_t end) const {
  const auto [first, last] = chunks_of(begin, end);
  for (uint64_t c = std::max(first, run_); c < last; ++c)
    if (!done_[c]) return false;
  return true;
}

bool ChunkArrival::has(uint64_t begin, uint64_t end) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return all_done(begin, end);
}

void ChunkArrival::wait_range(uint64_t begin, uint64_t end) const {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] { return all_done(begin, end) || !failure_.empty(); });
  if (!all_done(begin, end)) throw Error(failure_);
}

ChunkArrival::Clock::time_point ChunkArrival::completed_at() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return completed_at_;
}

}  // namespace fluxswap
