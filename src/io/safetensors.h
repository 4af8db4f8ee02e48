#pragma once
// safetensors files: a strict reader (mmap, zero-copy tensor views, every structural check the format implies)
// and a writer. A malformed file is always an Error naming the file and, where there is one, the tensor key.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/host_buffer.h"
#include "core/tensor.h"

namespace fluxswap {

struct SafetensorsEntry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin = 0;  // byte offsets into the data region (after the header)
  uint64_t end = 0;
};

// A tensor holding a NaN or an infinity, as found while reading.
struct NonFiniteValue {
  std::string name;
  int64_t element = 0;
  float value = 0;
};

class SafetensorsFile : public std::enable_shared_from_this<SafetensorsFile> {
 public:
  // Maps the file read-only and validates its header against its size. Throws Error.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  // Reads the file into memory from `allocate` with all cores, checking every float tensor for NaN/Inf on the way
  // (while its bytes are in cache): the fast path from the page cache to a device. Validates like open().
  static std::shared_ptr<SafetensorsFile> read(const std::string& path, const HostBufferAllocator& allocate);
  // Parses an in-memory image (fuzzing, tests, network uploads); `label` stands for the path in messages.
  static std::shared_ptr<SafetensorsFile> from_bytes(std::string bytes, const std::string& label);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }  // in data-offset order
  std::vector<std::string> keys() const;                                    // sorted
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const SafetensorsEntry* find(const std::string& name) const;

  // A borrowed CPU view of the tensor's bytes; it keeps this file mapped while it lives.
  // Throws Error naming the file and key when the key is absent.
  Tensor tensor(const std::string& name) const;

  // After read(): whether the values were checked, and the first non-finite value of each tensor that has one.
  bool values_checked() const { return values_checked_; }
  const std::map<std::string, NonFiniteValue>& non_finite() const { return non_finite_; }

 private:
  SafetensorsFile() = default;
  void parse();

  std::string path_;
  const uint8_t* bytes_ = nullptr;  // whole file image
  size_t size_ = 0;
  const uint8_t* data_ = nullptr;  // data region
  void* mapping_ = nullptr;         // mmap base, or null when owned_ holds the bytes
  std::string owned_;
  std::shared_ptr<void> buffer_;  // read(): the file image
  bool values_checked_ = false;
  std::map<std::string, NonFiniteValue> non_finite_;
  std::map<std::string, std::string> metadata_;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;
};

// One checkpoint that may be split over shards: a `.safetensors` file, or a `*.safetensors.index.json` whose
// `weight_map` names the shard of each key (shards are opened lazily, and each listed key must be in its shard).
class SafetensorsCollection {
 public:
  static SafetensorsCollection open(const std::string& path);
  static SafetensorsCollection of(std::shared_ptr<SafetensorsFile> file);

  const std::string& path() const { return path_; }
  std::vector<std::string> keys() const;  // sorted
  bool contains(const std::string& name) const;
  const SafetensorsEntry& entry(const std::string& name) const;  // throws Error naming path and key
  Tensor tensor(const std::string& name) const;                  // throws Error naming path and key
  // The first shard's `__metadata__` (the index file's "metadata" is not tensor metadata).
  const std::map<std::string, std::string>& metadata() const;

 private:
  const SafetensorsFile& file_for(const std::string& name) const;

  std::string path_;
  std::map<std::string, std::string> key_to_shard_;  // empty for a single file
  mutable std::map<std::string, std::shared_ptr<SafetensorsFile>> shards_;
  std::shared_ptr<SafetensorsFile> single_;
};

// Writes tensors (any device-CPU layout; written contiguous, in the given order) and optional metadata.
std::string serialize_safetensors(const std::vector<std::pair<std::string, Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata = {});
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace fluxswap
