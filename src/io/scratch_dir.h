#pragma once
// Where a benchmark writes files that it then reads back "from the page cache": a RAM-backed directory (tmpfs,
// /dev/shm) holds them there by construction, while a disk-backed one may drop them at once (the lent GPU machine
// keeps ~1 GB cached, so a read there measured its virtual disk).
#include <cstdint>
#include <string>
#include <vector>

namespace fluxswap {

struct ScratchDirChoice {
  std::string path;
  std::string reason;  // which rule picked it, for the printout
};

// `requested` when not empty; else `ram_dir` when it is a tmpfs/ramfs directory with room for `needed_bytes` plus
// a 256 MiB margin (statvfs, what an unprivileged writer may use); else the system temp directory.
ScratchDirChoice choose_scratch_dir(const std::string& requested, uint64_t needed_bytes,
                                    const std::string& ram_dir = "/dev/shm");

// Files removed when this goes, also when the benchmark fails half-way (a 700 MB file left in /dev/shm holds RAM).
class ScratchFiles {
 public:
  ScratchFiles() = default;
  ScratchFiles(const ScratchFiles&) = delete;
  ScratchFiles& operator=(const ScratchFiles&) = delete;
  ~ScratchFiles();
  std::string add(std::string path);  // returns it
  const std::vector<std::string>& paths() const { return paths_; }

 private:
  std::vector<std::string> paths_;
};

}  // namespace fluxswap
