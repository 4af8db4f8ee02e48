#pragma once
// The LoRAs a client may name: the *.safetensors files under --lora-dir, named by their path relative to it
// without the extension ("style", "people/alice"). A name is resolved against the directory only after checking
// that it cannot leave it ("..", absolute paths, a symlink pointing outside): clients pick files, never paths.
//
// AdapterCache keeps recently used adapters parsed (LoraAdapter objects as load_lora_adapter returns them), LRU.
// Parsing happens on the HTTP handler thread, before a request is queued: a malformed file is answered at once
// (422 naming the file) and the GPU worker never spends time reading files.
#include <cstdint>
#include <filesystem>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "lora/lora_adapter.h"

namespace fluxswap {

class Metrics;

class LoraRegistry {
 public:
  explicit LoraRegistry(const std::string& dir);  // empty: no LoRAs; otherwise it must be a directory

  struct Entry {
    std::string name;
    std::string file;  // relative to the directory
    uintmax_t bytes = 0;
  };
  std::vector<Entry> list() const;  // sorted by name

  // The canonical path of the named file. HttpError 400 for a name that is malformed or would leave the
  // directory, 404 for no such LoRA.
  std::string resolve(const std::string& name) const;
  bool enabled() const { return !root_.empty(); }

 private:
  std::filesystem::path root_;  // canonical
};

class AdapterCache {
 public:
  AdapterCache(size_t capacity, Metrics& metrics) : capacity_(capacity), metrics_(metrics) {}

  // The parsed adapter of `path` (a resolved registry path), parsing it on a miss; a file changed on disk since
  // it was parsed is parsed again. HttpError 422 naming `name` and the problem for a file that is not a usable
  // LoRA for this model. `host`: where the file is read to (empty: mapped).
  std::shared_ptr<const LoraAdapter> get(const std::string& name, const std::string& path, const FluxConfig& config,
                                         bool* was_cached = nullptr, const HostBufferAllocator& host = {});
  bool contains(const std::string& path) const;
  size_t size() const;

 private:
  struct Item {
    std::string path;
    uintmax_t bytes = 0;
    std::filesystem::file_time_type mtime;
    std::shared_ptr<const LoraAdapter> adapter;
  };
  size_t capacity_;
  Metrics& metrics_;
  mutable std::mutex mutex_;
  std::list<Item> items_;  // most recently used first
};

}  // namespace fluxswap
