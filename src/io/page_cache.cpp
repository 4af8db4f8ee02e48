#include "io/page_cache.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "core/error.h"

namespace fluxswap {

PageCacheResidency page_cache_residency(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(path + ": cannot open to check its page-cache residency: " + std::strerror(errno));
  struct stat st {};
  const bool stat_ok = ::fstat(fd, &st) == 0;
  const int stat_err = errno;
  if (!stat_ok || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(path + (stat_ok ? ": not a regular file, expected a file to check for page-cache residency"
                                : ": cannot stat: " + std::string(std::strerror(stat_err))));
  }
  PageCacheResidency r;
  r.bytes = uint64_t(st.st_size);
  if (r.bytes == 0) {
    ::close(fd);
    return r;
  }
  // A plain mapping (no MAP_POPULATE) faults nothing in: mincore then reports what the kernel already had.
  void* m = ::mmap(nullptr, size_t(r.bytes), PROT_READ, MAP_SHARED, fd, 0);
  const int map_err = errno;
  ::close(fd);
  if (m == MAP_FAILED)
    throw Error(path + ": cannot map " + std::to_string(r.bytes) + " bytes to check page-cache residency: " +
                std::strerror(map_err));
  const uint64_t page = uint64_t(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> in((r.bytes + page - 1) / page);
  const bool ok = ::mincore(m, size_t(r.bytes), in.data()) == 0;
  const int core_err = errno;
  ::munmap(m, size_t(r.bytes));
  if (!ok) throw Error(path + ": mincore failed: " + std::strerror(core_err));
  for (size_t i = 0; i < in.size(); ++i)
    if (in[i] & 1) r.resident_bytes += std::min(page, r.bytes - uint64_t(i) * page);
  return r;
}

}  // namespace fluxswap
