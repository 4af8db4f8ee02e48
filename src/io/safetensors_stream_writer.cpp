#include "io/safetensors_stream_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>

#include "core/error.h"

namespace fluxswap {

namespace {

std::string os_error() { return std::strerror(errno); }

void write_all(int fd, const char* p, size_t n, uint64_t at, const std::string& what) {
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, p, n, off_t(at));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw Error(what + ": write failed: " + (w < 0 ? os_error() : std::string("no progress")));
    p += w;
    n -= size_t(w);
    at += uint64_t(w);
  }
}

}  // namespace

SafetensorsStreamWriter::SafetensorsStreamWriter(const std::string& path,
                                                 const std::vector<SafetensorsLayoutEntry>& entries,
                                                 const std::map<std::string, std::string>& metadata)
    : path_(path), tmp_(path + ".tmp"), entries_(entries), begins_(entries.size()), ends_(entries.size()) {
  std::vector<size_t> order(entries_.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return dtype_size(entries_[a].dtype) > dtype_size(entries_[b].dtype); });
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> seen;
  for (size_t i : order) {
    const SafetensorsLayoutEntry& e = entries_[i];
    if (e.name == "__metadata__" || !seen.insert(e.name).second)
      throw Error(path + ": tensor name '" + e.name + "' is reserved or given twice, expected unique names");
    for (int64_t d : e.shape)
      if (d < 0) throw Error(path + ": tensor '" + e.name + "' has a negative dimension in " + shape_str(e.shape));
    begins_[i] = data_bytes_;
    data_bytes_ += uint64_t(shape_numel(e.shape)) * dtype_size(e.dtype);
    ends_[i] = data_bytes_;
    header[e.name] = {{"dtype", std::string(dtype_name(e.dtype))},
                      {"shape", e.shape},
                      {"data_offsets", {begins_[i], ends_[i]}}};
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  data_start_ = 8 + text.size();
  written_ = std::make_unique<std::atomic<uint64_t>[]>(entries_.size());
  for (size_t i = 0; i < entries_.size(); ++i) written_[i] = 0;

  fd_ = ::open(tmp_.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error(tmp_ + ": cannot create: " + os_error());
  try {
    if (::fallocate(fd_, 0, 0, off_t(file_bytes())) != 0 && errno != EOPNOTSUPP)
      throw Error(tmp_ + ": cannot reserve " + std::to_string(file_bytes()) + " bytes: " + os_error());
    char len[8];
    for (int b = 0; b < 8; ++b) len[b] = char(uint64_t(text.size()) >> (8 * b));
    write_all(fd_, len, 8, 0, tmp_);
    write_all(fd_, text.data(), text.size(), 8, tmp_);
  } catch (...) {
    ::close(fd_);
    std::remove(tmp_.c_str());
    throw;
  }
}

SafetensorsStreamWriter::~SafetensorsStreamWriter() {
  if (finished_) return;
  if (fd_ >= 0) ::close(fd_);
  std::remove(tmp_.c_str());
}

void SafetensorsStreamWriter::write(size_t i, uint64_t offset, const void* data, size_t n) {
  if (i >= entries_.size() || offset + n > tensor_bytes(i))
    throw Error(tmp_ + ": write of bytes [" + std::to_string(offset) + ", " + std::to_string(offset + n) +
                ") outside tensor #" + std::to_string(i));
  write_all(fd_, static_cast<const char*>(data), n, data_start_ + begins_[i] + offset, tmp_);
  written_[i] += n;
}

void SafetensorsStreamWriter::finish(bool evict) {
  for (size_t i = 0; i < entries_.size(); ++i)
    if (written_[i] != tensor_bytes(i))
      throw Error(tmp_ + ": tensor '" + entries_[i].name + "' got " + std::to_string(written_[i]) + " of its " +
                  std::to_string(tensor_bytes(i)) + " bytes");
  if (evict) {
    if (::fdatasync(fd_) != 0) throw Error(tmp_ + ": fdatasync failed: " + os_error());
    ::posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED);  // advice only: a kernel that ignores it costs nothing
  }
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) throw Error(tmp_ + ": write failed at close: " + os_error());
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0)
    throw Error(path_ + ": cannot rename " + tmp_ + " into place: " + os_error());
  finished_ = true;
}

}  // namespace fluxswap
