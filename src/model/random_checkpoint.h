#pragma once
// Checkpoint files full of seeded random values, generated and written tensor by tensor, chunk by chunk, on all
// cores, so that a FLUX.1-dev-sized pipeline (~34 GB) is made without holding more than a few chunks in memory.
// Element i of a tensor named N is mean + std * normal_from_counter(stream(seed, N), i) (core/counter_rng.h): the
// same seed gives the same files whatever the thread count.
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace fluxswap {

struct RandomTensor {
  std::string name;
  Shape shape;
  DType dtype = DType::BF16;  // F32, BF16, F16 or F8_E4M3
  float mean = 0.0f, std = 0.0f;  // std 0: every element is `mean`
  float fp8_scale = 1.0f;         // F8_E4M3: the file holds e4m3(value / fp8_scale), saturating
};

uint64_t random_tensor_bytes(const RandomTensor& t);

struct RandomCheckpointFile {
  std::string path;
  std::vector<RandomTensor> tensors;
};

// The files of one checkpoint in `dir`: `<stem>.safetensors` when everything fits in max_shard_bytes, else the
// Hugging Face sharded layout, `<stem>-00001-of-0000N.safetensors` ... (tensors in order, a new shard whenever the
// next tensor would overflow this one) plus `<stem>.safetensors.index.json`, which this writes.
std::vector<RandomCheckpointFile> plan_random_checkpoint(const std::string& dir, const std::string& stem,
                                                         const std::vector<RandomTensor>& tensors,
                                                         uint64_t max_shard_bytes);

struct RandomWriteOptions {
  uint64_t seed = 0;
  unsigned threads = 0;  // 0: every core
  bool evict = false;    // write each file through to disk and drop it from the page cache when done
  // Called from the calling thread about every `progress_seconds` and once at the end: (tensor bytes written,
  // tensor bytes in all).
  std::function<void(uint64_t, uint64_t)> progress;
  double progress_seconds = 2.0;
};

// Writes every file (each appears under its name only once complete). Returns the bytes of the files, headers
// included. Error naming the file on an I/O failure; files already complete stay.
uint64_t write_random_checkpoints(const std::vector<RandomCheckpointFile>& files, const RandomWriteOptions& options);

}  // namespace fluxswap
