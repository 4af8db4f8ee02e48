// page_cache_residency (mincore over a mapping) and the benchmark's scratch directory: a tmpfs file is resident by
// construction; the directory rule picks /dev/shm only when it is RAM-backed and has room, and says why otherwise.
#include <gtest/gtest.h>
#include <linux/magic.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "core/error.h"
#include "io/page_cache.h"
#include "io/scratch_dir.h"
#include "test_support.h"

namespace fluxswap {
namespace {

bool is_tmpfs(const std::string& dir) {
  struct statfs fs {};
  return ::statfs(dir.c_str(), &fs) == 0 && fs.f_type == TMPFS_MAGIC;
}

TEST(PageCache, ATmpfsFileIsResidentInFull) {
  if (!is_tmpfs("/dev/shm")) GTEST_SKIP() << "/dev/shm is not tmpfs here";
  ScratchFiles files;
  const std::string path = files.add("/dev/shm/fluxswap-test-residency-" + std::to_string(::getpid()));
  std::ofstream(path) << std::string(3 * 4096 + 100, 'x');
  const PageCacheResidency r = page_cache_residency(path);
  EXPECT_EQ(r.bytes, uint64_t(3 * 4096 + 100));
  EXPECT_EQ(r.resident_bytes, r.bytes);  // the last partial page counts for the file's bytes only
  EXPECT_EQ(r.fraction(), 1.0);
}

TEST(PageCache, EmptyMissingAndNonRegularFiles) {
  test::TempDir dir;
  std::ofstream(dir / "empty");
  const PageCacheResidency r = page_cache_residency(dir / "empty");
  EXPECT_EQ(r.bytes, 0u);
  EXPECT_EQ(r.fraction(), 1.0);
  const std::string missing = test::error_of([&] { page_cache_residency(dir / "missing"); });
  EXPECT_HAS(missing, dir / "missing");
  EXPECT_HAS(missing, "cannot open");
  const std::string folder = test::error_of([&] { page_cache_residency(dir.path().string()); });
  EXPECT_HAS(folder, "not a regular file");
}

TEST(ScratchDir, GivenDirectoryWins) {
  const ScratchDirChoice c = choose_scratch_dir("/some/where", 1);
  EXPECT_EQ(c.path, "/some/where");
  EXPECT_HAS(c.reason, "--lora-dir");
}

TEST(ScratchDir, RamDirectoryWhenItHasRoomElseTheTempDirectorySayingWhy) {
  const std::string tmp = std::filesystem::temp_directory_path().string();
  const ScratchDirChoice missing = choose_scratch_dir("", 1, "/no/such/dir");
  EXPECT_EQ(missing.path, tmp);
  EXPECT_HAS(missing.reason, "/no/such/dir does not exist");
  test::TempDir dir;
  if (!is_tmpfs(dir.path().string())) {
    const ScratchDirChoice disk = choose_scratch_dir("", 1, dir.path().string());
    EXPECT_EQ(disk.path, tmp);
    EXPECT_HAS(disk.reason, "not tmpfs");
  }
  if (!is_tmpfs("/dev/shm")) GTEST_SKIP() << "/dev/shm is not tmpfs here";
  const ScratchDirChoice shm = choose_scratch_dir("", 1 << 20);
  EXPECT_EQ(shm.path, "/dev/shm");
  EXPECT_HAS(shm.reason, "page cache by construction");
  const ScratchDirChoice full = choose_scratch_dir("", uint64_t(1) << 60);
  EXPECT_EQ(full.path, tmp);
  EXPECT_HAS(full.reason, "free");
  EXPECT_HAS(full.reason, "needed");
}

TEST(ScratchDir, FilesAreRemovedWhenTheListGoes) {
  test::TempDir dir;
  {
    ScratchFiles files;
    std::ofstream(files.add(dir / "a")) << "a";
    std::ofstream(files.add(dir / "b")) << "b";
    files.add(dir / "never-written");  // already gone is fine
    EXPECT_TRUE(std::filesystem::exists(dir / "a"));
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "a"));
  EXPECT_FALSE(std::filesystem::exists(dir / "b"));
}

}  // namespace
}  // namespace fluxswap
