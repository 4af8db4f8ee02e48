// FLUXSWAP_LORA_READ=register: an adapter file mapped shared and uploaded from the mapping (pinned in place on the
// GPU; on the CPU reference backend, which cannot pin, the ordinary copy), its values checked after the upload by
// Backend::find_non_finite. The same bits as an adapter read first; a NaN or infinity anywhere names the file, the
// key and the element and leaves the model exactly as it was; alphas and reordered rows are checked while parsing.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "core/compare.h"
#include "core/error.h"
#include "fixture_transformer.h"
#include "lora/lora_controller.h"
#include "lora/streamed_upload.h"
#include "test_support.h"

namespace fluxswap {
namespace {

using Model = test::FixtureTransformer;

#define EXPECT_HAS(msg, part) \
  EXPECT_NE((msg).find(part), std::string::npos) << "missing \"" << (part) << "\" in: " << (msg)

// Sets an environment variable for one scope, then puts back what was there.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (had_)
      setenv(name_, old_.c_str(), 1);
    else
      unsetenv(name_);
  }

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

std::string fixture_lora(const std::string& name) {
  return test::fixtures_dir() + "/tiny/lora_" + name + ".safetensors";
}

std::shared_ptr<const LoraAdapter> from_file(const Model& m, const std::string& path) {
  return std::make_shared<LoraAdapter>(start_loading_lora_adapter(path, m.checkpoint.config, {}));
}

// A copy of a fixture LoRA, same tensors in the same order, with `bits` written over element `element` of tensor
// `which` (in file order; negative counts from the end).
std::string with_bad_value(const test::TempDir& dir, const std::string& name, int which, int64_t element,
                           bool infinity) {
  auto f = SafetensorsFile::open(fixture_lora(name));
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& e : f->entries()) {
    Tensor copy = Tensor::empty(e.dtype, e.shape);
    std::memcpy(copy.data(), f->tensor(e.name).data(), copy.nbytes());
    ts.emplace_back(e.name, copy);
  }
  Tensor& t = ts[size_t(which < 0 ? int(ts.size()) + which : which)].second;
  if (element < 0) element += t.numel();
  if (t.dtype() == DType::F32)
    t.ptr<float>()[element] =
        infinity ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
  else if (t.dtype() == DType::BF16)
    t.ptr<uint16_t>()[element] = infinity ? 0x7f80 : 0x7fc0;
  else
    t.ptr<uint16_t>()[element] = infinity ? 0x7c00 : 0x7e00;  // f16
  const std::string path = dir / ("bad_" + std::to_string(which) + "_" + name + ".safetensors");
  write_safetensors(path, ts, f->metadata());
  return path;
}

std::string key_of(const std::string& name, int which) {
  auto f = SafetensorsFile::open(fixture_lora(name));
  return f->entries()[size_t(which < 0 ? int(f->entries().size()) + which : which)].name;
}

class LoraMappedUpload : public ::testing::TestWithParam<LoraMode> {};

TEST_P(LoraMappedUpload, GivesTheBitsOfAnAdapterReadFirst) {
  FLUXSWAP_REQUIRE_FIXTURES();
  ScopedEnv read("FLUXSWAP_LORA_READ", "register");
  Model m("tiny");
  LoraController lora(*m.transformer, GetParam());
  for (const char* name : {"a_peft", "c_kohya", "d_xlabs"}) {  // norm_out rows reordered; alphas; plain
    lora.set_adapters({{m.lora(name), 1.0f}});
    const Tensor loaded = m.run();
    const auto mapped = from_file(m, fixture_lora(name));
    ASSERT_TRUE(mapped->mapped) << name;
    EXPECT_FALSE(mapped->arriving);
    const LoraApplyReport r = lora.set_adapters({{mapped, 1.0f}});
    EXPECT_EQ(r.mapped_uploads, 1u);
    // The CPU backend cannot pin: it says so, and everything went the ordinary way.
    EXPECT_FALSE(r.mapped_upload.registered);
    EXPECT_HAS(r.mapped_upload.fallback, "does not pin");
    EXPECT_GT(r.mapped_upload.other_bytes, 0u);
    EXPECT_EQ(max_rel_error(m.run(), loaded), 0.0) << name;
  }
}

TEST_P(LoraMappedUpload, ANonFiniteValueNamesTheTensorAndLeavesTheModelUnchanged) {
  FLUXSWAP_REQUIRE_FIXTURES();
  ScopedEnv read("FLUXSWAP_LORA_READ", "register");
  test::TempDir dir;
  Model m("tiny");
  LoraController lora(*m.transformer, GetParam());
  lora.set_adapters({{m.lora("a_peft"), 1.0f}});
  const Tensor before = m.run();
  for (const auto& [which, element, infinity] : {std::tuple{-1, int64_t(-1), false}, {3, int64_t(5), true}}) {
    const std::string path = with_bad_value(dir, "b_peft", which, element, infinity);
    const auto bad = from_file(m, path);  // parses: nothing on the host looked at the values
    ASSERT_TRUE(bad->mapped);
    const std::string msg = test::error_of([&] { lora.set_adapters({{bad, 1.0f}}); });
    EXPECT_HAS(msg, path);
    EXPECT_HAS(msg, "'" + key_of("b_peft", which) + "'");
    EXPECT_HAS(msg, infinity ? "an infinity" : "NaN");
    if (element >= 0) EXPECT_HAS(msg, "at element " + std::to_string(element));
    EXPECT_HAS(msg, "expected finite values");
    EXPECT_EQ(max_rel_error(m.run(), before), 0.0) << "the model changed";
  }
  // The controller is still sound: a good mapped adapter gives what a fresh model gives.
  lora.set_adapters({{from_file(m, fixture_lora("b_peft")), 1.0f}});
  Model fresh("tiny");
  LoraController fresh_lora(*fresh.transformer, GetParam());
  fresh_lora.set_adapters({{fresh.lora("b_peft"), 1.0f}});
  EXPECT_EQ(max_rel_error(m.run(), fresh.run()), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Modes, LoraMappedUpload, ::testing::Values(LoraMode::Merged, LoraMode::Runtime),
                         [](const auto& info) { return info.param == LoraMode::Merged ? "merged" : "runtime"; });

// What the device never sees as it is in the file is checked while parsing: a NaN alpha, or one in rows the host
// reorders (norm_out's up), is an error from map_lora_adapter itself, naming the key and the element in the file.
TEST(LoraMappedParse, ChecksReorderedRowsOnTheHost) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir dir;
  Model m("tiny");
  const int which = 3;
  ASSERT_EQ(key_of("a_peft", which), "transformer.norm_out.linear.lora_B.weight");
  const std::string path = with_bad_value(dir, "a_peft", which, 7, true);
  const std::string msg = test::error_of([&] { map_lora_adapter(path, m.checkpoint.config); });
  EXPECT_HAS(msg, path);
  EXPECT_HAS(msg, "'transformer.norm_out.linear.lora_B.weight' holds an infinity at element 7");
}

TEST(LoraMappedParse, ChecksAlphasOnTheHost) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir dir;
  Model m("tiny");
  auto f = SafetensorsFile::open(fixture_lora("c_kohya"));
  int alpha = -1;
  for (size_t i = 0; i < f->entries().size(); ++i)
    if (f->entries()[i].name.ends_with(".alpha") && dtype_is_float(f->entries()[i].dtype)) alpha = int(i);
  ASSERT_GE(alpha, 0) << "the kohya fixture has float alphas";
  const std::string path = with_bad_value(dir, "c_kohya", alpha, 0, false);
  const std::string msg = test::error_of([&] { map_lora_adapter(path, m.checkpoint.config); });
  EXPECT_HAS(msg, path);
  EXPECT_HAS(msg, "'" + f->entries()[size_t(alpha)].name + "'");
  EXPECT_HAS(msg, "NaN");
}

TEST(LoraMappedParse, ShapesAreCheckedAsForAnyRead) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir dir;
  Model m("tiny");
  auto f = SafetensorsFile::open(fixture_lora("b_peft"));
  std::vector<std::pair<std::string, Tensor>> ts;
  std::string cut;
  for (const auto& e : f->entries()) {
    Tensor t = f->tensor(e.name);
    if (cut.empty() && e.name.ends_with("lora_A.weight")) {  // one input column short
      cut = e.name;
      Tensor narrow = Tensor::empty(e.dtype, {e.shape[0], e.shape[1] - 1});
      for (int64_t r = 0; r < e.shape[0]; ++r)
        std::memcpy(static_cast<char*>(narrow.data()) + r * (e.shape[1] - 1) * int64_t(dtype_size(e.dtype)),
                    static_cast<const char*>(t.data()) + r * e.shape[1] * int64_t(dtype_size(e.dtype)),
                    size_t(e.shape[1] - 1) * dtype_size(e.dtype));
      t = narrow;
    }
    ts.emplace_back(e.name, t);
  }
  const std::string path = dir / "narrow.safetensors";
  write_safetensors(path, ts, f->metadata());
  const std::string msg = test::error_of([&] { map_lora_adapter(path, m.checkpoint.config); });
  EXPECT_HAS(msg, path);
  EXPECT_HAS(msg, "'" + cut + "'");
  EXPECT_HAS(msg, "input columns");
}

TEST(LoraMappedParse, TheReadModeComesFromTheEnvironment) {
  {
    ScopedEnv read("FLUXSWAP_LORA_READ", "pread");
    EXPECT_EQ(lora_file_read_from_env(), LoraFileRead::Pread);
  }
  {
    ScopedEnv read("FLUXSWAP_LORA_READ", "register");
    EXPECT_EQ(lora_file_read_from_env(), LoraFileRead::Register);
  }
  ScopedEnv read("FLUXSWAP_LORA_READ", "mmap");
  const std::string msg = test::error_of([] { lora_file_read_from_env(); });
  EXPECT_HAS(msg, "FLUXSWAP_LORA_READ='mmap'");
  EXPECT_HAS(msg, "expected pread or register");
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

// The Backend defaults the CPU reference runs on: a host scan, and the ordinary copy in place of pinning.
TEST(BackendDefaults, FindNonFiniteNamesTheFirstBadElementOfEachTensor) {
  auto be = make_cpu_backend();
  Tensor clean = Tensor::zeros(DType::F32, {3, 5});
  Tensor nan = Tensor::zeros(DType::F32, {100});
  nan.ptr<float>()[70] = std::numeric_limits<float>::quiet_NaN();
  nan.ptr<float>()[90] = std::numeric_limits<float>::infinity();
  Tensor inf16 = Tensor::zeros(DType::BF16, {2, 8});
  inf16.ptr<uint16_t>()[9] = 0xff80;  // -inf
  const std::vector<int64_t> first = be->find_non_finite({clean, nan, inf16});
  EXPECT_EQ(first, (std::vector<int64_t>{-1, 70, 9}));
  EXPECT_HAS(test::error_of([&] { be->find_non_finite({Tensor::zeros(DType::I32, {4})}); }), "expected a float");

  Tensor src = Tensor::zeros(DType::F32, {4});
  src.ptr<float>()[2] = 1.5f;
  Tensor dst = be->empty(DType::F32, {4});
  const RegisteredUploadReport r = be->copy_from_host_registered(src.data(), src.nbytes(), {{src, dst}});
  EXPECT_FALSE(r.registered);
  EXPECT_FALSE(r.fallback.empty());
  EXPECT_EQ(r.other_bytes, src.nbytes());
  EXPECT_EQ(dst.ptr<float>()[2], 1.5f);
}

}  // namespace
}  // namespace fluxswap
