#pragma once
// Shared by the tests: where the golden fixtures are (env FLUXSWAP_FIXTURES overrides the build-time path), a
// temporary folder that cleans itself up, the message of an expected Error, and byte-level tensor comparisons.
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <string>

#include "core/error.h"
#include "core/tensor.h"

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

// An Error message (or any string) containing `part`, shown in full when it does not.
#define EXPECT_HAS(msg, part) \
  EXPECT_NE((msg).find(part), std::string::npos) << "missing \"" << (part) << "\" in: " << (msg)

#define FLUXSWAP_REQUIRE_FIXTURES() \
  if (!::fluxswap::test::have_fixtures()) GTEST_SKIP() << "no fixtures at " << ::fluxswap::test::fixtures_dir()

// The same bytes (host tensors of any shape with as many bytes).
inline bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}
// The same dtype, shape and bytes (host tensors).
inline bool same_bits(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && same_bytes(a, b);
}

// A float32 scalar (a LoRA `.alpha`).
inline Tensor scalar(float v) {
  Tensor t = Tensor::empty(DType::F32, {});
  t.ptr<float>()[0] = v;
  return t;
}

// Host float32 t filled with normal(mean, std) values.
inline void fill_normal(const Tensor& t, std::mt19937& rng, float std, float mean = 0.0f) {
  std::normal_distribution<float> n(mean, std);
  for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = n(rng);
}

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
