#pragma once
// Shared by the tests: where the golden fixtures are (env FLUXSWAP_FIXTURES overrides the build-time path), a
// temporary folder that cleans itself up, and the message of an expected Error.
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <random>
#include <string>

#include "core/error.h"

namespace fluxswap::test {

// The message of the Error `fn` throws, or "(no error)" (which then fails the caller's message checks).
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

inline std::string fixtures_dir() {
  if (const char* env = std::getenv("FLUXSWAP_FIXTURES")) return env;
#ifdef FLUXSWAP_FIXTURES
  return FLUXSWAP_FIXTURES;
#else
  return "../shared/fixtures";
#endif
}

inline bool have_fixtures() { return std::filesystem::exists(fixtures_dir() + "/tiny/config.json"); }

#define FLUXSWAP_REQUIRE_FIXTURES() \
  if (!::fluxswap::test::have_fixtures()) GTEST_SKIP() << "no fixtures at " << ::fluxswap::test::fixtures_dir()

class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() / ("fluxswap-test-" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace fluxswap::test
