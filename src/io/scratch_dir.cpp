#include "io/scratch_dir.h"

#include <linux/magic.h>
#include <sys/statvfs.h>
#include <sys/vfs.h>

#include <filesystem>
#include <system_error>

namespace fluxswap {

namespace {
constexpr uint64_t kMarginBytes = uint64_t(256) << 20;

std::string mb(uint64_t bytes) { return std::to_string((bytes + (1 << 19)) >> 20) + " MiB"; }
}  // namespace

ScratchDirChoice choose_scratch_dir(const std::string& requested, uint64_t needed_bytes, const std::string& ram_dir) {
  if (!requested.empty()) return {requested, "given with --lora-dir"};
  std::error_code ec;
  const std::string fallback = std::filesystem::temp_directory_path(ec).string();
  const std::string tmp = ec || fallback.empty() ? std::string("/tmp") : fallback;
  if (!std::filesystem::is_directory(ram_dir, ec))
    return {tmp, ram_dir + " does not exist: the temp directory instead, which may be disk-backed (residency is "
                           "checked before timing)"};
  struct statfs fs {};
  if (::statfs(ram_dir.c_str(), &fs) != 0 || (fs.f_type != TMPFS_MAGIC && fs.f_type != RAMFS_MAGIC))
    return {tmp, ram_dir + " is not tmpfs/ramfs: the temp directory instead (residency is checked before timing)"};
  struct statvfs st {};
  if (::statvfs(ram_dir.c_str(), &st) != 0)
    return {tmp, "cannot statvfs " + ram_dir + ": the temp directory instead (residency is checked before timing)"};
  const uint64_t free_bytes = uint64_t(st.f_bavail) * uint64_t(st.f_frsize);
  if (free_bytes < needed_bytes + kMarginBytes)
    return {tmp, ram_dir + " has " + mb(free_bytes) + " free, " + mb(needed_bytes) + " + " + mb(kMarginBytes) +
                     " needed: the temp directory instead (residency is checked before timing)"};
  return {ram_dir, ram_dir + " is RAM-backed with " + mb(free_bytes) + " free: its files are in the page cache by "
                       "construction"};
}

ScratchFiles::~ScratchFiles() {
  for (const auto& p : paths_) {
    std::error_code ec;  // a destructor must not throw; a file that is already gone is fine
    std::filesystem::remove(p, ec);
  }
}

std::string ScratchFiles::add(std::string path) {
  paths_.push_back(path);
  return path;
}

}  // namespace fluxswap
