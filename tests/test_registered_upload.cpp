// What `bench --lora-read-sweep` needs on the CPU: a file mapped shared (SafetensorsFile::open_shared) sees the bytes
// open() sees, with its data region where the tensors are; and the Backend default of copy_from_host_registered,
// which the CPU reference runs on: the ordinary copy in place of pinning, and a report that says so.
#include <gtest/gtest.h>

#include <cstring>

#include "backend/backend.h"
#include "io/safetensors.h"
#include "test_support.h"

namespace fluxswap {
namespace {

std::string fixture_lora(const std::string& name) {
  return test::fixtures_dir() + "/tiny/lora_" + name + ".safetensors";
}

TEST(SafetensorsOpenShared, SeesTheBytesOpenSees) {
  FLUXSWAP_REQUIRE_FIXTURES();
  for (bool populate : {false, true}) {
    const auto a = SafetensorsFile::open(fixture_lora("b_peft"));
    const auto b = SafetensorsFile::open_shared(fixture_lora("b_peft"), populate);
    ASSERT_EQ(a->data_region().second, b->data_region().second);
    EXPECT_EQ(std::memcmp(a->data_region().first, b->data_region().first, a->data_region().second), 0);
    const auto& e = b->entries().front();
    EXPECT_EQ(b->tensor(e.name).data(), static_cast<const char*>(b->data_region().first) + e.begin);
  }
}

TEST(BackendDefaults, CopyFromHostRegisteredCopiesWithoutPinning) {
  auto be = make_cpu_backend();
  Tensor src = Tensor::zeros(DType::F32, {4});
  src.ptr<float>()[2] = 1.5f;
  Tensor dst = be->empty(DType::F32, {4});
  const RegisteredUploadReport r = be->copy_from_host_registered(src.data(), src.nbytes(), {{src, dst}});
  EXPECT_FALSE(r.registered);
  EXPECT_NE(r.fallback.find("does not pin"), std::string::npos) << r.fallback;
  EXPECT_EQ(r.other_bytes, src.nbytes());
  EXPECT_EQ(dst.ptr<float>()[2], 1.5f);
}

}  // namespace
}  // namespace fluxswap
