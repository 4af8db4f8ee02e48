// Adapters whose file is still being read (start_loading_lora_adapter): parsed from the header at once, uploaded
// as their chunks land, and the same bits as a file read first. A NaN in the last chunk or a read error leaves the
// model exactly as it was. On the CPU reference backend, with heap memory standing in for pinned memory.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <mutex>
#include <thread>

#include "core/compare.h"
#include "core/error.h"
#include "fixture_transformer.h"
#include "lora/lora_controller.h"
#include "lora/streamed_upload.h"
#include "test_support.h"
#include "thread_gate.h"

namespace fluxswap {
namespace {

using Model = test::FixtureTransformer;

std::shared_ptr<void> heap(size_t bytes) { return std::shared_ptr<void>(std::malloc(bytes), std::free); }

using test::Gate;

std::string fixture_lora(const std::string& name) {
  return test::fixtures_dir() + "/tiny/lora_" + name + ".safetensors";
}

SafetensorsReadOptions small_chunks(unsigned threads = 2) {
  SafetensorsReadOptions o;
  o.threads = threads;
  o.chunk_bytes = 256;
  return o;
}

std::shared_ptr<const LoraAdapter> streamed(const Model& m, const std::string& path, const SafetensorsReadOptions& o) {
  return std::make_shared<LoraAdapter>(start_loading_lora_adapter(path, m.checkpoint.config, heap, o));
}

uint64_t last_chunk_of(const std::string& path, uint64_t chunk) {
  auto f = SafetensorsFile::open(path);
  return (f->entries().back().end + chunk - 1) / chunk - 1;
}

// A copy of a fixture LoRA, same tensors in the same order, with a NaN in the one stored last.
std::string with_nan_in_the_last_tensor(const test::TempDir& dir, const std::string& name) {
  auto f = SafetensorsFile::open(fixture_lora(name));
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& e : f->entries()) {  // in data-offset order: written back the same way
    Tensor copy = Tensor::empty(e.dtype, e.shape);
    std::memcpy(copy.data(), f->tensor(e.name).data(), copy.nbytes());
    ts.emplace_back(e.name, copy);
  }
  Tensor& last = ts.back().second;
  if (last.dtype() == DType::F32)
    last.ptr<float>()[last.numel() - 1] = std::numeric_limits<float>::quiet_NaN();
  else
    last.ptr<uint16_t>()[last.numel() - 1] = 0x7fc0;  // bf16 / f16 NaN
  const std::string path = dir / ("nan_" + name + ".safetensors");
  write_safetensors(path, ts, f->metadata());
  return path;
}

class LoraStreaming : public ::testing::TestWithParam<LoraMode> {};

TEST_P(LoraStreaming, AStreamedAdapterGivesTheBitsOfOneReadFirst) {
  FLUXSWAP_REQUIRE_FIXTURES();
  Model m("tiny");
  LoraController lora(*m.transformer, GetParam());
  lora.set_upload_batch_bytes(1);  // a batch per arrival, the most interleaved case
  size_t arriving = 0;
  // Paused: the read starts once the keys are mapped (a_peft's reordered norm_out rows wait for their bytes while
  // mapping, which starts it sooner), with no wait needed to start it.
  size_t arriving_paused = 0;
  for (bool paused : {false, true})
    for (const char* name : {"a_peft", "c_kohya", "d_xlabs"}) {  // norm_out rows reordered; alphas; plain
      SCOPED_TRACE(std::string(name) + (paused ? ", paused" : ""));
      lora.set_adapters({{m.lora(name), 1.0f}});
      const Tensor loaded = m.run();
      SafetensorsReadOptions o = small_chunks();
      o.paused = paused;
      o.before_chunk = [](uint64_t) { std::this_thread::sleep_for(std::chrono::microseconds(200)); };  // still reading
      const auto s = streamed(m, fixture_lora(name), o);
      (paused ? arriving_paused : arriving) += bool(s->arriving);  // parsed before the read was over
      if (paused && s->arriving) {
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (!s->arriving->complete() && std::chrono::steady_clock::now() < deadline)
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        EXPECT_TRUE(s->arriving->complete()) << "a paused read was never resumed";
      }
      const LoraApplyReport r = lora.set_adapters({{s, 1.0f}});
      EXPECT_GE(r.upload_batches, 1u);
      if (GetParam() == LoraMode::Merged && s->arriving && !paused) EXPECT_GE(r.merged_while_reading, 1u);
      EXPECT_EQ(max_rel_error(m.run(), loaded), 0.0);
    }
  EXPECT_GE(arriving, 1u);
  EXPECT_GE(arriving_paused, 2u);
}

TEST_P(LoraStreaming, ANaNInTheLastChunkLeavesTheModelUnchanged) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir dir;
  const std::string bad_path = with_nan_in_the_last_tensor(dir, "b_peft");
  Model m("tiny");
  LoraController lora(*m.transformer, GetParam());
  lora.set_upload_batch_bytes(1);
  lora.set_adapters({{m.lora("a_peft"), 1.0f}});
  const Tensor before = m.run();
  SafetensorsReadOptions o = small_chunks(1);
  const uint64_t last = last_chunk_of(bad_path, o.chunk_bytes);
  // The last chunk comes after parsing, and late, so the earlier tensors are sent while it is still being read.
  Gate parsed;
  o.before_chunk = [&](uint64_t c) {
    if (c != last) return;
    EXPECT_TRUE(parsed.pass());
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  };
  const auto bad = streamed(m, bad_path, o);  // parses: the header is fine
  ASSERT_TRUE(bad->arriving);
  parsed.open();
  const std::string msg = test::error_of([&] { lora.set_adapters({{bad, 1.0f}}); });
  EXPECT_HAS(msg, bad_path);
  EXPECT_HAS(msg, "NaN");
  EXPECT_HAS(msg, "expected finite values");
  EXPECT_EQ(max_rel_error(m.run(), before), 0.0) << "the model changed";
  EXPECT_EQ(test::error_of([&] { wait_until_loaded(*bad); }), msg);  // and again, every time
  EXPECT_EQ(test::error_of([&] { lora.set_adapters({{bad, 1.0f}}); }), msg);
  EXPECT_EQ(max_rel_error(m.run(), before), 0.0);
  // The controller is still sound: a good swap gives what a fresh model gives.
  lora.set_adapters({{streamed(m, fixture_lora("b_peft"), small_chunks()), 1.0f}});
  Model fresh("tiny");
  LoraController fresh_lora(*fresh.transformer, GetParam());
  fresh_lora.set_adapters({{fresh.lora("b_peft"), 1.0f}});
  EXPECT_EQ(max_rel_error(m.run(), fresh.run()), 0.0);
}

TEST_P(LoraStreaming, AReadErrorLeavesTheModelUnchanged) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::TempDir dir;
  const std::string path = dir / "cut.safetensors";
  std::filesystem::copy_file(fixture_lora("b_peft"), path);
  Model m("tiny");
  LoraController lora(*m.transformer, GetParam());
  lora.set_adapters({{m.lora("a_peft"), 1.0f}});
  const Tensor before = m.run();
  Gate cut;
  SafetensorsReadOptions o = small_chunks(1);
  int taken = 0;  // the third chunk taken, whichever it is (the reader goes in the step's order)
  o.before_chunk = [&](uint64_t) {
    if (++taken == 3) EXPECT_TRUE(cut.pass());
  };
  const auto a = streamed(m, path, o);
  std::filesystem::resize_file(path, std::filesystem::file_size(path) / 2);  // the file shrinks mid-read
  cut.open();
  const std::string msg = test::error_of([&] { lora.set_adapters({{a, 1.0f}}); });
  EXPECT_HAS(msg, path);
  EXPECT_HAS(msg, "unexpected end of file");
  EXPECT_EQ(max_rel_error(m.run(), before), 0.0);
}

// On a backend without step gates (the CPU) the swap runs before the step, whole: the step then sees the new
// adapter, bit for bit as after set_adapters.
TEST_P(LoraStreaming, ASwapUnderTheStepWithoutGatesSwapsFirst) {
  FLUXSWAP_REQUIRE_FIXTURES();
  Model m("tiny");
  LoraController lora(*m.transformer, GetParam());
  lora.set_adapters({{m.lora("b_peft"), 1.0f}});
  const Tensor b = m.run();
  lora.set_adapters({{m.lora("a_peft"), 1.0f}});
  Tensor seen;
  const LoraApplyReport r = lora.swap_under_next_step({{streamed(m, fixture_lora("b_peft"), small_chunks()), 1.0f}},
                                                      [&] { seen = m.run(); });
  EXPECT_GT(r.pairs, 0u);
  ASSERT_TRUE(seen.defined());
  EXPECT_EQ(max_rel_error(seen, b), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Modes, LoraStreaming, ::testing::Values(LoraMode::Merged, LoraMode::Runtime),
                         [](const auto& info) { return info.param == LoraMode::Merged ? "merged" : "runtime"; });

// Parsing needs only the header and the alphas: it returns while no data chunk has been read (kohya alphas are
// read on the spot), and the values are checked once the file is in.
TEST(LoraStreamingParse, ReturnsBeforeAnyDataChunkIsRead) {
  FLUXSWAP_REQUIRE_FIXTURES();
  Model m("tiny");
  Gate parsed;
  SafetensorsReadOptions o = small_chunks();
  o.before_chunk = [&](uint64_t) { EXPECT_TRUE(parsed.pass()) << "parsing waited for the data"; };
  const auto s = streamed(m, fixture_lora("c_kohya"), o);
  EXPECT_FALSE(s->arriving->complete());
  EXPECT_FALSE(s->unchecked.empty());
  const auto loaded = m.lora("c_kohya");
  ASSERT_EQ(s->pairs.size(), loaded->pairs.size());
  for (size_t i = 0; i < s->pairs.size(); ++i) EXPECT_EQ(s->pairs[i].scale, loaded->pairs[i].scale);
  parsed.open();
  wait_until_loaded(*s);
  EXPECT_TRUE(s->arriving->complete());
  // Without memory to read into, the file is mapped and checked at once, as load_lora_adapter does.
  EXPECT_FALSE(std::make_shared<LoraAdapter>(start_loading_lora_adapter(fixture_lora("c_kohya"), m.checkpoint.config,
                                                                        {}))->arriving);
}

// The chunk -> tensor readiness of the upload: the last chunk is held until the first batch has gone, so batches
// can only be sent as their tensors land; each tensor goes once, in file order, never before it is in.
TEST(LoraStreamingUpload, SendsEachTensorOnceAsItLands) {
  FLUXSWAP_REQUIRE_FIXTURES();
  const std::string path = fixture_lora("b_peft");
  SafetensorsReadOptions o = small_chunks(1);
  const uint64_t last = last_chunk_of(path, o.chunk_bytes);
  Gate first_batch_sent;
  o.before_chunk = [&](uint64_t c) {
    if (c == last) EXPECT_TRUE(first_batch_sent.pass()) << "nothing was sent before the last chunk";
  };
  auto f = SafetensorsFile::read_in_background(path, heap, o);
  HostToDevice copies;
  for (const auto& e : f->entries()) copies.emplace_back(f->tensor(e.name), Tensor());  // file order = address order
  std::vector<const void*> sent;
  size_t batches = 0;
  const StreamedUploadStats stats = upload_as_it_arrives(f.get(), copies, 1, [&](const HostToDevice& batch) {
    for (const auto& [src, dst] : batch) {
      EXPECT_TRUE(f->arrived(src.data(), src.nbytes())) << "sent before it was read";
      sent.push_back(src.data());
    }
    ++batches;
    first_batch_sent.open();
  });
  EXPECT_EQ(stats.batches, batches);
  EXPECT_GE(batches, 2u);
  ASSERT_EQ(sent.size(), copies.size());
  for (size_t i = 0; i < copies.size(); ++i) EXPECT_EQ(sent[i], copies[i].first.data());
  // Without a file (or with a complete one) everything goes in one batch.
  size_t plain = 0;
  upload_as_it_arrives(nullptr, copies, 1, [&](const HostToDevice& b) { plain += b.size(); });
  EXPECT_EQ(plain, copies.size());
}

}  // namespace
}  // namespace fluxswap
