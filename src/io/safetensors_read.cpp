// SafetensorsFile::read and read_in_background: the data region read by several threads into memory the caller
// hands out (pinned, for a CUDA upload), chunk by chunk in file order, every float element checked for NaN/Inf
// right after its chunk is read, while the bytes are still in the cache. Progress is a ChunkArrival, so a consumer
// can send the first tensors on while later chunks are still being read; a swap from a file then costs about the
// longer of the read and the transfer instead of their sum.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>

#include "core/dtype.h"
#include "core/error.h"
#include "io/chunk_arrival.h"
#include "io/nonfinite_scan.h"
#include "io/safetensors.h"

namespace fluxswap {

namespace {

// pread until done: a read may return fewer bytes than asked.
void read_exactly(int fd, uint8_t* dst, size_t bytes, uint64_t offset, const std::string& path) {
  while (bytes > 0) {
    const ssize_t n = ::pread(fd, dst, bytes, off_t(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      throw Error(path + ": cannot read " + std::to_string(bytes) + " bytes at offset " + std::to_string(offset) +
                  ": " + (n == 0 ? std::string("unexpected end of file") : std::strerror(errno)));
    dst += n, bytes -= size_t(n), offset += uint64_t(n);
  }
}

// Closes the descriptor unless it was handed on.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  Fd(Fd&& other) noexcept : fd(other.release()) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  int release() { return std::exchange(fd, -1); }
};

// The file opened for reading, with its size; Error naming it unless it is a regular file.
Fd open_regular_file(const std::string& path, size_t* size) {
  Fd fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (fd.fd < 0) throw Error(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd.fd, &st) != 0) throw Error(path + ": cannot stat: " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) throw Error(path + ": not a regular file, expected a .safetensors file");
  *size = size_t(st.st_size);
  return fd;
}

uint64_t env_or(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && std::atoll(v) > 0 ? uint64_t(std::atoll(v)) : fallback;
}

}  // namespace

struct SafetensorsFile::BackgroundRead {
  BackgroundRead(int fd_, std::string path_, uint8_t* data_, uint64_t data_offset_, uint64_t bytes, uint64_t chunk,
                 const std::vector<SafetensorsEntry>& entries_, std::function<void(uint64_t)> before_chunk_)
      : fd(fd_), path(std::move(path_)), data(data_), data_offset(data_offset_), arrival(bytes, chunk),
        entries(entries_), before_chunk(std::move(before_chunk_)) {}
  ~BackgroundRead() {
    stop = true;  // an abandoned read (its consumer failed) ends after the chunks in hand
    for (auto& t : workers)
      if (t.joinable()) t.join();
    unmap();
    ::close(fd);
  }
  void unmap() {
    if (mapping) ::munmap(mapping, mapping_bytes);
    mapping = nullptr;
  }

  void run(size_t w);
  void read_chunk(uint64_t c, std::map<std::string, NonFiniteValue>& bad);

  const int fd;
  const std::string path;
  uint8_t* const data;         // the data region in the caller's memory
  const uint64_t data_offset;  // where it starts in the file
  ChunkArrival arrival;
  const std::vector<SafetensorsEntry>& entries;  // the file's, sorted by offset, tiling the data region
  const std::function<void(uint64_t)> before_chunk;
  std::chrono::steady_clock::time_point started;
  std::atomic<uint64_t> next{0};  // chunks are handed out in order, so the ready run grows steadily
  std::vector<uint64_t> order;    // read_rank: the chunks in the order they are handed out (else 0, 1, ...)
  std::atomic<bool> stop{false};
  std::vector<std::map<std::string, NonFiniteValue>> found;  // per worker: the first bad element of each tensor
  std::vector<std::thread> workers;
  std::once_flag merged;
  std::once_flag resumed;
  void* mapping = nullptr;  // from_mapping: the whole file, unmapped by the last worker out
  size_t mapping_bytes = 0;
  std::atomic<size_t> running{0};
};

void SafetensorsFile::BackgroundRead::run(size_t w) {
  while (!stop) {
    const uint64_t i = next.fetch_add(1);
    if (i >= arrival.chunks()) break;
    const uint64_t c = order.empty() ? i : order[i];
    try {
      if (before_chunk) before_chunk(c);
      read_chunk(c, found[w]);
    } catch (const std::exception& e) {
      arrival.fail(e.what());
      stop = true;
      break;
    }
    arrival.finish(c);
  }
  // Unmapping costs ~10 ms for a 700 MB file: here, off the consumer's path, once nobody copies from it.
  if (--running == 0) unmap();
}

// Reads chunk c and checks the float elements whose first byte lies in it. An element straddling the chunk's end
// is completed from the file into a local copy, so no byte of the buffer is ever written by two threads.
void SafetensorsFile::BackgroundRead::read_chunk(uint64_t c, std::map<std::string, NonFiniteValue>& bad) {
  const auto [lo, hi] = arrival.chunk(c);
  if (mapping)
    std::memcpy(data + lo, static_cast<const uint8_t*>(mapping) + data_offset + lo, hi - lo);
  else
    read_exactly(fd, data + lo, hi - lo, data_offset + lo, path);
  auto record = [&](const SafetensorsEntry& e, uint64_t element, const uint8_t* p) {
    auto it = bad.find(e.name);
    if (it != bad.end() && it->second.element <= int64_t(element)) return;
    float v = 0;
    convert_to_f32(e.dtype, p, &v, 1);
    bad[e.name] = {e.name, int64_t(element), v};
  };
  auto e = std::upper_bound(entries.begin(), entries.end(), lo,
                            [](uint64_t at, const SafetensorsEntry& x) { return at < x.end; });
  for (; e != entries.end() && e->begin < hi; ++e) {
    if (!dtype_is_float(e->dtype) || e->end == e->begin) continue;
    const uint64_t es = dtype_size(e->dtype);
    const uint64_t from = std::max(lo, e->begin), to = std::min(hi, e->end);
    const uint64_t first = (from - e->begin + es - 1) / es, last = (to - e->begin + es - 1) / es;
    if (first >= last) continue;
    // [first, whole): wholly inside this chunk; [whole, last): at most one element running past its end.
    const uint64_t whole = std::max(first, std::min(last, (hi - e->begin) / es));
    if (first < whole) {
      const uint8_t* p = data + e->begin + first * es;
      const size_t n = size_t(whole - first);
      // One fast pass; the exact element is looked for only in the rare chunk that has one.
      if (any_non_finite(e->dtype, p, n)) {
        const int64_t i = first_non_finite(e->dtype, p, n);
        record(*e, first + uint64_t(i), p + uint64_t(i) * es);
        continue;
      }
    }
    for (uint64_t k = whole; k < last; ++k) {
      uint8_t element[16];
      const uint64_t at = e->begin + k * es, mine = hi - at;
      std::memcpy(element, data + at, mine);
      read_exactly(fd, element + mine, es - mine, data_offset + hi, path);
      if (first_non_finite(e->dtype, element, 1) == 0) record(*e, k, element);
    }
  }
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::read(const std::string& path, const HostBufferAllocator& allocate,
                                                       const SafetensorsReadOptions& options) {
  auto f = read_in_background(path, allocate, options);
  f->wait_until_read();
  return f;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::read_in_background(const std::string& path,
                                                                     const HostBufferAllocator& allocate,
                                                                     const SafetensorsReadOptions& options) {
  const auto started = std::chrono::steady_clock::now();
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  Fd fd = open_regular_file(path, &f->size_);
  f->buffer_ = allocate(std::max<size_t>(f->size_, 1));
  if (!f->buffer_) throw Error(path + ": cannot allocate " + std::to_string(f->size_) + " bytes to read it into");
  auto* bytes = static_cast<uint8_t*>(f->buffer_.get());
  f->bytes_ = bytes;
  // The header first (parse() reads nothing else); the data region follows in the background.
  uint64_t header = 0;
  if (f->size_ >= 8) {
    read_exactly(fd.fd, bytes, 8, 0, path);
    for (int i = 7; i >= 0; --i) header = (header << 8) | bytes[i];
    if (header <= kMaxHeaderBytes && header <= f->size_ - 8) read_exactly(fd.fd, bytes + 8, header, 8, path);
  }
  f->parse();

  const uint64_t data_begin = 8 + header, data_size = f->size_ - data_begin;
  const uint64_t chunk = options.chunk_bytes ? options.chunk_bytes : env_or("FLUXSWAP_READ_CHUNK_MB", 1) << 20;
  const uint64_t cores = std::max(1u, std::thread::hardware_concurrency());
  // One core is left to the caller, which parses the file's contents (a LoRA's key mapping) and plans the upload
  // while the readers run: with every core reading, that work took twice as long and delayed a swap by as much.
  const uint64_t threads = options.threads ? options.threads
                                           : env_or("FLUXSWAP_READ_THREADS", std::clamp<uint64_t>(cores - 1, 1, 16));
  auto bg = std::make_shared<BackgroundRead>(fd.release(), path, bytes + data_begin, data_begin, data_size, chunk,
                                             f->entries_, options.before_chunk);
  bg->started = started;
  if (options.read_rank) {
    std::vector<int64_t> rank(bg->arrival.chunks(), INT64_MAX);
    for (const SafetensorsEntry& e : f->entries_) {
      const auto [first, last] = bg->arrival.chunks_of(e.begin, e.end);
      const int64_t r = options.read_rank(e.name);
      for (uint64_t c = first; c < last; ++c) rank[c] = std::min(rank[c], r);
    }
    bg->order.resize(rank.size());
    for (uint64_t c = 0; c < rank.size(); ++c) bg->order[c] = c;
    std::stable_sort(bg->order.begin(), bg->order.end(), [&](uint64_t a, uint64_t b) { return rank[a] < rank[b]; });
  }
  if ((options.from_mapping || env_or("FLUXSWAP_READ_MMAP", 0)) && data_size > 0) {
    // No MAP_POPULATE: populating is one thread's work; faults taken by all the readers spread it.
    void* m = ::mmap(nullptr, f->size_, PROT_READ, MAP_SHARED, bg->fd, 0);
    if (m == MAP_FAILED)
      throw Error(path + ": cannot mmap " + std::to_string(f->size_) + " bytes: " + std::strerror(errno));
    bg->mapping = m, bg->mapping_bytes = f->size_;
  }
  const size_t workers = size_t(std::min<uint64_t>(threads, bg->arrival.chunks()));
  bg->found.resize(workers);
  bg->running = workers;
  f->background_ = bg;  // from here on, destroying the file stops and joins the workers
  if (!options.paused) f->resume_read();
  return f;
}

void SafetensorsFile::resume_read() const {
  if (!background_) return;
  BackgroundRead& bg = *background_;
  std::call_once(bg.resumed, [&] {
    try {
      for (size_t w = 0; w < bg.found.size(); ++w) bg.workers.emplace_back([b = &bg, w] { b->run(w); });
    } catch (const std::system_error& e) {
      // Readers that did start stop after their chunk; every waiter gets the failure, and no retry starts a second
      // set of readers on the same slots. (The ones never started never count `running` down: the destructor unmaps.)
      bg.stop = true;
      bg.arrival.fail(path_ + ": cannot start the reader threads: " + e.what());
    }
  });
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open_shared(const std::string& path, bool populate) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  Fd fd = open_regular_file(path, &f->size_);
  if (f->size_ >= 8) {  // mmap of an empty file fails; short files are reported by parse()
    void* m = ::mmap(nullptr, f->size_, PROT_READ, MAP_SHARED | (populate ? MAP_POPULATE : 0), fd.fd, 0);
    if (m == MAP_FAILED)
      throw Error(path + ": cannot mmap " + std::to_string(f->size_) + " bytes: " + std::strerror(errno));
    f->mapping_ = m;
    f->bytes_ = static_cast<const uint8_t*>(m);
  }
  f->parse();
  return f;
}

bool SafetensorsFile::arrived(const void* p, size_t n) const {
  if (!background_) return true;
  const auto* q = static_cast<const uint8_t*>(p);
  const uint64_t region = background_->arrival.bytes();
  if (q < data_ || q >= data_ + region) return true;  // the header, or memory that is not this file's image
  return background_->arrival.has(uint64_t(q - data_), uint64_t(q - data_) + n);
}

void SafetensorsFile::wait_for(const void* p, size_t n) const {
  if (!background_) return;
  resume_read();
  const auto* q = static_cast<const uint8_t*>(p);
  if (q < data_ || q >= data_ + background_->arrival.bytes()) return;
  background_->arrival.wait_range(uint64_t(q - data_), uint64_t(q - data_) + n);
}

void SafetensorsFile::wait_until_read() const {
  if (!background_) return;
  resume_read();
  BackgroundRead& bg = *background_;
  bg.arrival.wait_until(bg.arrival.bytes());
  // Every chunk finished, so every worker is done with its findings (finish() and wait_until() share a lock); the
  // workers may still be on their way out (unmapping), and are joined by the destructor, off the caller's path.
  std::call_once(bg.merged, [&] {
    for (auto& m : bg.found)
      for (auto& [name, v] : m) {
        auto it = non_finite_.find(name);
        if (it == non_finite_.end() || v.element < it->second.element) non_finite_[name] = v;
      }
    values_checked_ = true;
  });
}

bool SafetensorsFile::complete() const { return !background_ || background_->arrival.complete(); }

double SafetensorsFile::read_seconds() const {
  if (!background_ || !background_->arrival.complete()) return 0;
  return std::chrono::duration<double>(background_->arrival.completed_at() - background_->started).count();
}

Tensor SafetensorsFile::tensor_now(const std::string& name) const {
  Tensor view = tensor(name);  // throws for an unknown name
  if (arrived(view.data(), view.nbytes())) return view;
  const SafetensorsEntry& e = *find(name);
  Tensor copy = Tensor::empty(e.dtype, e.shape);
  read_exactly(background_->fd, static_cast<uint8_t*>(copy.data()), e.end - e.begin,
               background_->data_offset + e.begin, path_);
  return copy;
}

}  // namespace fluxswap
