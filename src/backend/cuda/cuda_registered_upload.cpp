// Uploads straight from pageable memory pinned in place (cudaHostRegister, read-only): a file mapped from the page
// cache goes to the device by DMA with no CPU copy. Pinning costs per page, so the region is pinned in chunks by a
// few threads while the issuing thread sends each chunk as soon as it is pinned, and a last thread unpins each chunk
// once its DMA is done; the call returns when everything is on the device and unpinned. Any chunk that cannot be
// pinned goes the ordinary (staged) way instead, and the report says why.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "backend/cuda/cuda_backend.h"

namespace fluxswap::cuda {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

struct Piece {
  const char* src;
  char* dst;
  size_t bytes;
};

enum class ChunkState { Pending, Pinned, Failed, Issued };

struct Chunk {
  char* begin = nullptr;
  size_t bytes = 0;
  std::vector<Piece> pieces;
  ChunkState state = ChunkState::Pending;
  bool pinned = false;  // registered and not yet unregistered
  std::string error;
  cudaEvent_t start = nullptr, end = nullptr;
};

std::string error_text(cudaError_t e) { return std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")"; }

// What the device says about pinning pageable memory; `why_not` empty when read-only pinning is possible.
std::string pinning_support(int device, std::string* why_not) {
  int supported = 0, read_only = 0, pageable = 0, host_tables = 0;
  auto attr = [&](int* v, cudaDeviceAttr a) {
    if (cudaDeviceGetAttribute(v, a, device) != cudaSuccess) cudaGetLastError(), *v = -1;
  };
  attr(&supported, cudaDevAttrHostRegisterSupported);
  attr(&read_only, cudaDevAttrHostRegisterReadOnlySupported);
  attr(&pageable, cudaDevAttrPageableMemoryAccess);
  attr(&host_tables, cudaDevAttrPageableMemoryAccessUsesHostPageTables);
  if (supported != 1)
    *why_not = "the device does not support cudaHostRegister (cudaDevAttrHostRegisterSupported " +
               std::to_string(supported) + ")";
  else if (read_only != 1)
    *why_not = "the device does not support cudaHostRegisterReadOnly (cudaDevAttrHostRegisterReadOnlySupported " +
               std::to_string(read_only) + "), needed to pin a read-only file mapping";
  return "HostRegisterSupported " + std::to_string(supported) + ", HostRegisterReadOnlySupported " +
         std::to_string(read_only) + ", PageableMemoryAccess " + std::to_string(pageable) +
         ", PageableMemoryAccessUsesHostPageTables " + std::to_string(host_tables);
}

// Pieces (sorted by source, each inside one chunk) in page-aligned chunks of `chunk` bytes counted from the page of
// the first source; a chunk covers only the pages its pieces touch, so no page outside the sources is pinned.
std::vector<Chunk> plan_chunks(const std::vector<Piece>& sorted, size_t chunk, size_t page) {
  std::vector<Chunk> chunks;
  const uintptr_t base = reinterpret_cast<uintptr_t>(sorted.front().src) / page * page;
  size_t current = SIZE_MAX;
  for (Piece p : sorted) {
    while (p.bytes > 0) {
      const size_t k = (reinterpret_cast<uintptr_t>(p.src) - base) / chunk;
      const uintptr_t chunk_end = base + (k + 1) * chunk;
      const size_t n = std::min<size_t>(p.bytes, chunk_end - reinterpret_cast<uintptr_t>(p.src));
      if (k != current) {
        chunks.emplace_back();
        chunks.back().begin = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(p.src) / page * page);
        current = k;
      }
      Chunk& c = chunks.back();
      Piece* last = c.pieces.empty() ? nullptr : &c.pieces.back();
      if (last && last->src + last->bytes == p.src && last->dst + last->bytes == p.dst)
        last->bytes += n;  // neighbours in both places: one transfer
      else
        c.pieces.push_back({p.src, p.dst, n});
      const uintptr_t end = (reinterpret_cast<uintptr_t>(p.src) + n + page - 1) / page * page;
      c.bytes = std::max<size_t>(c.bytes, end - reinterpret_cast<uintptr_t>(c.begin));
      p.src += n, p.dst += n, p.bytes -= n;
    }
  }
  return chunks;
}

}  // namespace

RegisteredUploadReport CudaBackend::copy_from_host_registered(
    const void* region, size_t region_bytes, const std::vector<std::pair<Tensor, Tensor>>& host_to_device,
    const RegisteredUploadOptions& o) {
  const char* op = "copy_from_host_registered";
  const auto t0 = Clock::now();
  if (capturing_) bad(op, "host uploads cannot be recorded");
  RegisteredUploadReport r;
  const char* lo = static_cast<const char*>(region);
  const char* hi = lo + region_bytes;
  std::vector<Piece> direct;
  std::vector<std::pair<Tensor, Tensor>> other;
  for (const auto& [host, dst] : host_to_device) {
    const auto* p = static_cast<const char*>(host.data());
    const bool raw = host.device() == Device::CPU && dst.device() == Device::CUDA && host.dtype() == dst.dtype() &&
                     host.shape() == dst.shape() && host.is_contiguous() && dst.is_contiguous();
    if (raw && lo && host.nbytes() > 0 && p >= lo && p + host.nbytes() <= hi) {
      direct.push_back({p, static_cast<char*>(dst.data()), host.nbytes()});
      r.direct_bytes += host.nbytes();
    } else {
      other.emplace_back(host, dst);
      r.other_bytes += host.nbytes();
    }
  }
  if (!other.empty()) copy_from_host_batch(other);  // converted or outside the region: small, as before
  std::string why_not;
  r.support = pinning_support(stream_->device, &why_not);
  // The ordinary way for pieces that cannot be pinned: byte views, staged through pinned buffers.
  auto staged = [&](const std::vector<Piece>& pieces) {
    std::vector<std::pair<Tensor, Tensor>> bytes;
    for (const Piece& p : pieces)
      bytes.emplace_back(Tensor::borrow(const_cast<char*>(p.src), DType::U8, {int64_t(p.bytes)}),
                         Tensor::borrow(p.dst, DType::U8, {int64_t(p.bytes)}, Device::CUDA));
    copy_from_host_batch(bytes);
  };
  auto finish = [&] {
    check(cudaStreamSynchronize(stream()), op, "cudaStreamSynchronize");
    r.on_device_seconds = r.total_seconds = seconds_since(t0);
    return r;
  };
  if (direct.empty()) {
    r.fallback = region ? "no source inside the region could go as it is" : "no region given";
    return finish();
  }
  if (!why_not.empty()) {
    r.fallback = why_not;
    staged(direct);
    r.other_bytes += r.direct_bytes, r.direct_bytes = 0;
    return finish();
  }
  std::sort(direct.begin(), direct.end(), [](const Piece& a, const Piece& b) { return a.src < b.src; });
  const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  const size_t chunk_bytes = (std::max(o.chunk_bytes, page) + page - 1) / page * page;
  std::vector<Chunk> chunks = plan_chunks(direct, chunk_bytes, page);
  r.chunks = chunks.size();

  std::mutex mutex;
  std::condition_variable changed;
  std::atomic<size_t> next{0};
  std::atomic<bool> abort{false};
  const int device = stream_->device;
  double register_s = 0, unregister_s = 0;
  auto pin = [&] {
    cudaSetDevice(device);  // registration is per context: the device's, whichever thread asks
    while (!abort) {
      const size_t k = next.fetch_add(1);
      if (k >= chunks.size()) break;
      Chunk& c = chunks[k];
      const auto t = Clock::now();
      const cudaError_t e = cudaHostRegister(c.begin, c.bytes, cudaHostRegisterReadOnly);
      const double s = seconds_since(t);
      if (e != cudaSuccess) cudaGetLastError();  // not sticky; cleared so that no later check reports it
      {
        std::lock_guard<std::mutex> lock(mutex);
        register_s += s;
        c.pinned = e == cudaSuccess;
        c.state = c.pinned ? ChunkState::Pinned : ChunkState::Failed;
        if (!c.pinned)
          c.error = "cudaHostRegister of " + std::to_string(c.bytes) + " bytes failed: " + error_text(e);
      }
      changed.notify_all();
    }
  };
  // Unpins chunk after chunk once its DMA is over, overlapping the later DMAs.
  auto unpin = [&] {
    cudaSetDevice(device);
    for (Chunk& c : chunks) {
      {
        std::unique_lock<std::mutex> lock(mutex);
        changed.wait(lock, [&] { return c.state == ChunkState::Issued || c.state == ChunkState::Failed || abort; });
        if (c.state == ChunkState::Failed) continue;
        if (c.state != ChunkState::Issued) return;  // aborted: the caller unpins what is left
      }
      cudaEventSynchronize(c.end);
      const auto t = Clock::now();
      const cudaError_t e = cudaHostUnregister(c.begin);
      const double s = seconds_since(t);
      if (e != cudaSuccess) cudaGetLastError();
      std::lock_guard<std::mutex> lock(mutex);
      unregister_s += s;
      c.pinned = e != cudaSuccess && c.pinned;
    }
  };
  std::vector<std::thread> pinners;
  std::thread unpinner;
  auto join_all = [&] {
    for (auto& t : pinners)
      if (t.joinable()) t.join();
    if (unpinner.joinable()) unpinner.join();
  };
  auto release = [&] {  // after an error: nothing may stay pinned, nor any event alive
    {
      std::lock_guard<std::mutex> lock(mutex);
      abort = true;
    }
    changed.notify_all();
    join_all();
    cudaStreamSynchronize(stream());
    for (Chunk& c : chunks) {
      if (c.pinned) cudaHostUnregister(c.begin);
      if (c.start) cudaEventDestroy(c.start);
      if (c.end) cudaEventDestroy(c.end);
    }
    cudaGetLastError();
  };
  try {
    for (Chunk& c : chunks) {
      check(cudaEventCreate(&c.start), op, "cudaEventCreate");
      check(cudaEventCreate(&c.end), op, "cudaEventCreate");
    }
    const unsigned threads = std::max(1u, std::min<unsigned>(o.threads, unsigned(chunks.size())));
    for (unsigned i = 0; i < threads; ++i) pinners.emplace_back(pin);
    unpinner = std::thread(unpin);
    for (Chunk& c : chunks) {
      const auto t = Clock::now();
      {
        std::unique_lock<std::mutex> lock(mutex);
        changed.wait(lock, [&] { return c.state != ChunkState::Pending; });
      }
      r.wait_seconds += seconds_since(t);
      if (c.state == ChunkState::Failed) {
        if (r.fallback.empty()) r.fallback = c.error;
        staged(c.pieces);
        for (const Piece& p : c.pieces) r.other_bytes += p.bytes, r.direct_bytes -= p.bytes;
        continue;
      }
      check(cudaEventRecord(c.start, stream()), op, "cudaEventRecord");
      for (const Piece& p : c.pieces)
        check(cudaMemcpyAsync(p.dst, p.src, p.bytes, cudaMemcpyHostToDevice, stream()), op, "cudaMemcpyAsync");
      check(cudaEventRecord(c.end, stream()), op, "cudaEventRecord");
      {
        std::lock_guard<std::mutex> lock(mutex);
        c.state = ChunkState::Issued;
      }
      changed.notify_all();
      ++r.registered_chunks;
    }
    check(cudaStreamSynchronize(stream()), op, "cudaStreamSynchronize");
    r.on_device_seconds = seconds_since(t0);
  } catch (...) {
    release();
    throw;
  }
  join_all();
  for (Chunk& c : chunks) {
    float ms = 0;
    if (c.state == ChunkState::Issued && cudaEventElapsedTime(&ms, c.start, c.end) == cudaSuccess)
      r.dma_seconds += ms * 1e-3;
    if (c.pinned) cudaHostUnregister(c.begin);  // only after a failed unregistration: tried once more
    cudaEventDestroy(c.start);
    cudaEventDestroy(c.end);
  }
  cudaGetLastError();
  r.register_seconds = register_s;
  r.unregister_seconds = unregister_s;
  r.registered = r.registered_chunks == chunks.size();
  r.total_seconds = seconds_since(t0);
  return r;
}

}  // namespace fluxswap::cuda
