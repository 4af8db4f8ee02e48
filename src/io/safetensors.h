#pragma once
// safetensors files: a strict reader (mmap, zero-copy tensor views, every structural check the format implies)
// and a writer. A malformed file is always an Error naming the file and, where there is one, the tensor key.
#include <cstdint>
#include <functional>
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

// How read() and read_in_background() share out the data region. Zero fields take FLUXSWAP_READ_THREADS /
// FLUXSWAP_READ_CHUNK_MB when set, else min(16, cores) threads and 1 MiB chunks (a chunk is checked right after it
// is read, while it is still in the core's L2).
struct SafetensorsReadOptions {
  unsigned threads = 0;
  uint64_t chunk_bytes = 0;
  // Copy from a mapping of the file instead of pread (also FLUXSWAP_READ_MMAP=1): a user-space copy beats the
  // kernel's page-by-page one on some hosts (~25% on a tmpfs file on the dev VM), but a file truncated while it is
  // being read then kills the process with SIGBUS instead of failing the read, so it is for measuring only.
  bool from_mapping = false;
  // Called by a reader thread before it reads chunk c of the data region: lets tests hold a chunk back.
  std::function<void(uint64_t chunk)> before_chunk;
  // read_in_background: chunks are taken by the lowest rank of the tensors they hold (ties in file order) instead
  // of in file order, so a consumer that needs the tensors in another order (a LoRA in the order a step uses it)
  // gets them sooner. Unset: file order.
  std::function<int64_t(const std::string& key)> read_rank;
  // read_in_background: the readers start at resume_read() instead of at once. start_loading_lora_adapter resumes
  // them once it has mapped the file's keys onto the model: that mapping chases pointers through the header and ran
  // up to four times slower beside readers that keep the memory bus busy. Waiting for a paused read resumes it.
  bool paused = false;
};

class SafetensorsFile : public std::enable_shared_from_this<SafetensorsFile> {
 public:
  static constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference implementation's limit

  // Maps the file read-only and validates its header against its size. Throws Error.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  // Reads the file into memory from `allocate` with all cores, checking every float tensor for NaN/Inf on the way
  // (while its bytes are in cache): the fast path from the page cache to a device. Validates like open().
  static std::shared_ptr<SafetensorsFile> read(const std::string& path, const HostBufferAllocator& allocate,
                                               const SafetensorsReadOptions& options = {});
  // The same read, returning once the header is parsed (structural errors are thrown here): the data region
  // arrives in the background, chunk by chunk in file order, so a consumer can upload the first tensors while later
  // ones are still being read. Views from tensor() point at memory whose bytes are defined only once wait_for()
  // has returned for them; values_checked() turns true in wait_until_read().
  static std::shared_ptr<SafetensorsFile> read_in_background(const std::string& path,
                                                             const HostBufferAllocator& allocate,
                                                             const SafetensorsReadOptions& options = {});
  // Maps the file read-only and shared (MAP_SHARED: the page cache's own pages, which an upload can pin in place and
  // send by DMA with no CPU copy; Backend::copy_from_host_registered, timed by `bench --lora-read-sweep`), with the
  // page table filled at once only when `populate` (MAP_POPULATE is one thread's work; pinning fills it too, from
  // several threads). Validates like open(); nothing checks the values.
  static std::shared_ptr<SafetensorsFile> open_shared(const std::string& path, bool populate);
  // Parses an in-memory image (fuzzing, tests, network uploads); `label` stands for the path in messages.
  static std::shared_ptr<SafetensorsFile> from_bytes(std::string bytes, const std::string& label);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Where the tensors' bytes are (the data region, after the header), wherever this file's image lives.
  std::pair<const void*, size_t> data_region() const { return {data_, size_ - size_t(data_ - bytes_)}; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }  // in data-offset order
  std::vector<std::string> keys() const;                                    // sorted
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const SafetensorsEntry* find(const std::string& name) const;

  // A borrowed CPU view of the tensor's bytes; it keeps this file mapped while it lives.
  // Throws Error naming the file and key when the key is absent.
  Tensor tensor(const std::string& name) const;

  // After read() (or wait_until_read()): whether the values were checked, and the first non-finite value of each
  // tensor that has one.
  bool values_checked() const { return values_checked_; }
  const std::map<std::string, NonFiniteValue>& non_finite() const { return non_finite_; }

  // Arrival of a file from read_in_background(); every other file is all there from the start. Memory outside the
  // file's image (copies made from it) counts as there.
  // Whether bytes [p, p + n) are in memory (and their float values checked).
  bool arrived(const void* p, size_t n) const;
  // Blocks until they are. Throws Error naming the file when the read failed before reaching them.
  void wait_for(const void* p, size_t n) const;
  // Blocks until the whole file is in and checked, then fills values_checked() / non_finite(). Throws Error on a
  // read failure (every time it is called).
  void wait_until_read() const;
  // Starts the readers of a read_in_background(..., {.paused = true}); does nothing for any other file or again.
  void resume_read() const;
  bool complete() const;
  // From the open() of the file to its last chunk checked; 0 for files not read in the background.
  double read_seconds() const;
  // The tensor's bytes now, whether or not the background read has reached them: its view when it has, else a
  // copy read from the file on the calling thread (for the few small values parsing needs early, such as alphas).
  Tensor tensor_now(const std::string& name) const;

 private:
  struct BackgroundRead;  // safetensors_read.cpp

  SafetensorsFile() = default;
  void parse();

  std::string path_;
  const uint8_t* bytes_ = nullptr;  // whole file image
  size_t size_ = 0;
  const uint8_t* data_ = nullptr;  // data region
  void* mapping_ = nullptr;         // mmap base, or null when owned_ holds the bytes
  std::string owned_;
  std::shared_ptr<void> buffer_;  // read(): the file image
  mutable bool values_checked_ = false;  // set by wait_until_read() under its once flag
  mutable std::map<std::string, NonFiniteValue> non_finite_;
  std::map<std::string, std::string> metadata_;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;
  // Declared last so that it goes first: its reader threads write into buffer_ until joined.
  std::shared_ptr<BackgroundRead> background_;
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
