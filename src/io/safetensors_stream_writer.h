#pragma once
// A safetensors file written in place: the header (every name, dtype and shape) goes first, so each tensor's place
// in the file is known before its values exist, and tensor bytes then arrive in any order from any thread. For
// checkpoints too large to hold in memory (random FLUX.1-dev-sized weights for load-time measurements).
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace fluxswap {

struct SafetensorsLayoutEntry {
  std::string name;
  DType dtype = DType::BF16;
  Shape shape;
};

class SafetensorsStreamWriter {
 public:
  // Creates `path`.tmp, reserves the whole file on disk (a full disk fails here, not hours later) and writes the
  // header. Tensors are laid out by descending element size (stable), which keeps each one aligned to its element
  // size as the reference writer does. Error naming the file on a duplicate or reserved name or an I/O failure.
  SafetensorsStreamWriter(const std::string& path, const std::vector<SafetensorsLayoutEntry>& entries,
                          const std::map<std::string, std::string>& metadata = {});
  // Removes the temporary file unless finish() ran.
  ~SafetensorsStreamWriter();
  SafetensorsStreamWriter(const SafetensorsStreamWriter&) = delete;
  SafetensorsStreamWriter& operator=(const SafetensorsStreamWriter&) = delete;

  const std::string& path() const { return path_; }
  size_t size() const { return entries_.size(); }
  const SafetensorsLayoutEntry& entry(size_t i) const { return entries_[i]; }  // in the order given
  uint64_t tensor_bytes(size_t i) const { return ends_[i] - begins_[i]; }
  uint64_t file_bytes() const { return data_start_ + data_bytes_; }

  // Bytes [offset, offset + n) of tensor i. Safe to call from several threads at once.
  void write(size_t i, uint64_t offset, const void* data, size_t n);
  // Checks that every tensor got all its bytes, closes and renames the file into place. With `evict`, first writes
  // it through to the disk and drops it from the page cache, so that the next reader really reads the disk.
  void finish(bool evict = false);

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  std::vector<SafetensorsLayoutEntry> entries_;
  std::vector<uint64_t> begins_, ends_;  // data-region offsets, per entry in the order given
  uint64_t data_start_ = 0, data_bytes_ = 0;
  std::unique_ptr<std::atomic<uint64_t>[]> written_;
  bool finished_ = false;
};

}  // namespace fluxswap
