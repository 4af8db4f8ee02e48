#include "model/random_checkpoint.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/counter_rng.h"
#include "core/dtype.h"
#include "core/error.h"
#include "io/safetensors_stream_writer.h"
#include "quant/fp8.h"

namespace fluxswap {

namespace {

// Elements per unit of work: 4M values are ~0.1 s of generation on one core and 16 MB of float buffer per thread.
constexpr int64_t kChunkElements = int64_t(1) << 22;

uint64_t stream_of(uint64_t seed, const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a of the name: streams follow names, not positions in a file
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  return splitmix64(h ^ splitmix64(seed));
}

// Elements [begin, begin + n) of tensor t in its file dtype, into out.
void generate(const RandomTensor& t, uint64_t stream, int64_t begin, int64_t n, std::vector<float>& values,
              std::vector<uint8_t>& out) {
  values.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i)
    values[size_t(i)] = t.std == 0.0f ? t.mean : t.mean + t.std * normal_from_counter(stream, uint64_t(begin + i));
  out.resize(size_t(n) * dtype_size(t.dtype));
  if (t.dtype == DType::F8_E4M3) {
    const float inv = 1.0f / t.fp8_scale;
    for (int64_t i = 0; i < n; ++i) out[size_t(i)] = quant::e4m3_from_f32(values[size_t(i)] * inv);
  } else {
    convert_from_f32(values.data(), t.dtype, out.data(), size_t(n));
  }
}

struct Chunk {
  size_t file, tensor;
  int64_t begin, n;
};

}  // namespace

uint64_t random_tensor_bytes(const RandomTensor& t) { return uint64_t(shape_numel(t.shape)) * dtype_size(t.dtype); }

std::vector<RandomCheckpointFile> plan_random_checkpoint(const std::string& dir, const std::string& stem,
                                                         const std::vector<RandomTensor>& tensors,
                                                         uint64_t max_shard_bytes) {
  std::vector<std::vector<RandomTensor>> shards(1);
  uint64_t in_shard = 0, total = 0;
  for (const RandomTensor& t : tensors) {
    const uint64_t b = random_tensor_bytes(t);
    if (!shards.back().empty() && in_shard + b > max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(t);
    in_shard += b;
    total += b;
  }
  const std::filesystem::path d(dir);
  if (shards.size() == 1) return {{(d / (stem + ".safetensors")).string(), shards[0]}};

  std::vector<RandomCheckpointFile> files;
  nlohmann::json weight_map = nlohmann::json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    const std::string file = stem + name;
    for (const RandomTensor& t : shards[s]) weight_map[t.name] = file;
    files.push_back({(d / file).string(), std::move(shards[s])});
  }
  const std::string index = (d / (stem + ".safetensors.index.json")).string();
  std::ofstream out(index);
  out << nlohmann::json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}.dump(2) << "\n";
  if (!out) throw Error(index + ": cannot write");
  return files;
}

uint64_t write_random_checkpoints(const std::vector<RandomCheckpointFile>& files, const RandomWriteOptions& o) {
  std::vector<std::unique_ptr<SafetensorsStreamWriter>> writers;
  std::vector<std::vector<uint64_t>> streams;  // per file, per tensor
  std::vector<Chunk> chunks;
  std::vector<size_t> chunks_left;  // per file: whoever writes its last chunk finishes it
  uint64_t data_bytes = 0, file_bytes = 0;
  for (size_t f = 0; f < files.size(); ++f) {
    std::vector<SafetensorsLayoutEntry> layout;
    streams.emplace_back();
    for (const RandomTensor& t : files[f].tensors) {
      if (t.dtype != DType::F32 && t.dtype != DType::BF16 && t.dtype != DType::F16 && t.dtype != DType::F8_E4M3)
        throw Error(files[f].path + ": tensor '" + t.name + "' is " + std::string(dtype_name(t.dtype)) +
                    ", expected F32, BF16, F16 or F8_E4M3");
      layout.push_back({t.name, t.dtype, t.shape});
      streams.back().push_back(stream_of(o.seed, t.name));
      data_bytes += random_tensor_bytes(t);
    }
    writers.push_back(std::make_unique<SafetensorsStreamWriter>(files[f].path, layout));
    file_bytes += writers.back()->file_bytes();
    size_t n = 0;
    for (size_t i = 0; i < files[f].tensors.size(); ++i) {
      const int64_t numel = shape_numel(files[f].tensors[i].shape);
      for (int64_t b = 0; b < numel; b += kChunkElements, ++n)
        chunks.push_back({f, i, b, std::min(kChunkElements, numel - b)});
    }
    chunks_left.push_back(n);
    if (n == 0) writers.back()->finish(o.evict);  // nothing to wait for
  }

  std::atomic<size_t> next{0};
  std::atomic<uint64_t> done{0};
  std::mutex m;
  std::condition_variable all_done;
  std::string error;
  const unsigned threads = o.threads ? o.threads : std::max(1u, std::thread::hardware_concurrency());
  unsigned running = threads;
  std::vector<std::thread> pool;
  for (unsigned w = 0; w < threads; ++w)
    pool.emplace_back([&] {
      std::vector<float> values;
      std::vector<uint8_t> bytes;
      try {
        for (size_t c = next++; c < chunks.size(); c = next++) {
          const Chunk& k = chunks[c];
          const RandomTensor& t = files[k.file].tensors[k.tensor];
          generate(t, streams[k.file][k.tensor], k.begin, k.n, values, bytes);
          writers[k.file]->write(k.tensor, uint64_t(k.begin) * dtype_size(t.dtype), bytes.data(), bytes.size());
          done += bytes.size();
          bool last;
          {
            std::lock_guard<std::mutex> lock(m);
            last = --chunks_left[k.file] == 0;
          }
          if (last) writers[k.file]->finish(o.evict);
        }
      } catch (const std::exception& e) {
        next = chunks.size();  // the others stop after their current chunk
        std::lock_guard<std::mutex> lock(m);
        if (error.empty()) error = e.what();
      }
      std::lock_guard<std::mutex> lock(m);
      if (--running == 0) all_done.notify_all();
    });
  {
    std::unique_lock<std::mutex> lock(m);
    const auto period = std::chrono::duration<double>(o.progress_seconds);
    while (!all_done.wait_for(lock, period, [&] { return running == 0; }))
      if (o.progress) {
        lock.unlock();
        o.progress(done.load(), data_bytes);
        lock.lock();
      }
  }
  for (auto& t : pool) t.join();
  if (!error.empty()) throw Error(error);
  if (o.progress) o.progress(done.load(), data_bytes);
  return file_bytes;
}

}  // namespace fluxswap
