// Adapters uploaded while their file is still being read into pinned memory (start_loading_lora_adapter), on the
// CUDA backend: the same bits as an adapter read first, through a recorded step; a NaN in the file's last chunk
// leaves the weights (merged) or slots (runtime) exactly as they were. bf16 files, so the DMA path is the one taken.
#include <chrono>
#include <cstring>
#include <thread>

#include "../test_support.h"
#include "cuda_test_util.h"
#include "gpu_fixture_model.h"
#include "io/safetensors.h"
#include "lora/lora_controller.h"
#include "lora/random_lora.h"
#include "model/flux_step_order.h"

namespace fluxswap::test {
namespace {

const char* mode_name(LoraMode m) { return m == LoraMode::Merged ? "merged" : "runtime"; }

SafetensorsReadOptions small_chunks() {
  SafetensorsReadOptions o;
  o.threads = 2;
  o.chunk_bytes = 4096;
  return o;
}

TEST(CudaLoraStreaming, AStreamedAdapterGivesTheBitsOfOneReadFirst) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  TempDir dir;
  for (LoraMode mode : {LoraMode::Merged, LoraMode::Runtime}) {
    GpuModel m(*gpu);
    const std::string a_path = dir / "a.safetensors", b_path = dir / "b.safetensors";
    write_random_lora(a_path, m.checkpoint.config, 4, 1);
    write_random_lora(b_path, m.checkpoint.config, 4, 2);
    const HostBufferAllocator host = gpu->host_buffer_allocator();
    const FluxConfig& c = m.checkpoint.config;
    LoraController lora(m.transformer, mode, 4);
    lora.set_upload_batch_bytes(1);  // a transfer per arrival: the most interleaved case
    lora.set_adapters({{std::make_shared<LoraAdapter>(load_lora_adapter(a_path, c, host)), 1.0f}});
    m.forward();
    auto step = gpu->record([&] { m.forward(); });
    const Tensor read_first = m.result();
    lora.set_adapters({{std::make_shared<LoraAdapter>(start_loading_lora_adapter(b_path, c, host, small_chunks())),
                        1.0f}});
    step->replay();
    EXPECT_GT(max_rel_error(m.result(), read_first), 1e-3) << mode_name(mode) << ": b changed nothing";
    const LoraApplyReport r = lora.set_adapters(
        {{std::make_shared<LoraAdapter>(start_loading_lora_adapter(a_path, c, host, small_chunks())), 1.0f}});
    EXPECT_GE(r.upload_batches, 1u);
    step->replay();
    EXPECT_TRUE(same_bits(m.result(), read_first)) << mode_name(mode);
  }
}

TEST(CudaLoraStreaming, ANaNInTheLastChunkLeavesTheModelUnchanged) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  TempDir dir;
  for (LoraMode mode : {LoraMode::Merged, LoraMode::Runtime}) {
    GpuModel m(*gpu);
    const FluxConfig& c = m.checkpoint.config;
    const std::string good = dir / "good.safetensors", bad = dir / "bad.safetensors";
    write_random_lora(good, c, 4, 3);
    {  // the same tensors, a NaN in the one stored last
      auto f = SafetensorsFile::open(good);
      std::vector<std::pair<std::string, Tensor>> ts;
      for (const auto& e : f->entries()) {
        Tensor t = Tensor::empty(e.dtype, e.shape);
        std::memcpy(t.data(), f->tensor(e.name).data(), t.nbytes());
        ts.emplace_back(e.name, t);
      }
      ts.back().second.ptr<uint16_t>()[ts.back().second.numel() - 1] = 0x7fc0;  // bf16 NaN
      write_safetensors(bad, ts, f->metadata());
    }
    const HostBufferAllocator host = gpu->host_buffer_allocator();
    LoraController lora(m.transformer, mode, 4);
    lora.set_upload_batch_bytes(1);
    lora.set_adapters({{std::make_shared<LoraAdapter>(load_lora_adapter(good, c, host)), 1.0f}});
    m.forward();
    const Tensor before = m.result();
    SafetensorsReadOptions o = small_chunks();
    // The NaN may surface while the adapter is still being parsed (a small file can be read and checked before
    // parsing ends) or when it is applied: either way, before the model is touched.
    const std::string msg = error_of([&] {
      const auto nan = std::make_shared<LoraAdapter>(start_loading_lora_adapter(bad, c, host, o));
      lora.set_adapters({{nan, 1.0f}});
    });
    EXPECT_NE(msg.find("NaN"), std::string::npos) << msg;
    m.forward();
    EXPECT_TRUE(same_bits(m.result(), before)) << mode_name(mode) << ": the model changed";
  }
}

// swap_under_next_step: the recorded step (with its per-block gates) launched before the adapter's file is read
// gives the bits of a step after a blocking swap, for an adapter arriving slowly (every chunk delayed) and for one
// kept on the device; a step without a swap passes its gates at once.
TEST(CudaLoraStreaming, ASwapUnderTheStepGivesTheBitsOfASwapBeforeIt) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  TempDir dir;
  GpuModel m(*gpu);
  const FluxConfig& c = m.checkpoint.config;
  const std::string a_path = dir / "a.safetensors", b_path = dir / "b.safetensors";
  write_random_lora(a_path, c, 4, 5);
  write_random_lora(b_path, c, 4, 6);
  const HostBufferAllocator host = gpu->host_buffer_allocator();
  LoraController lora(m.transformer, LoraMode::Runtime, 4);
  lora.set_upload_batch_bytes(1);
  lora.set_adapters({{std::make_shared<LoraAdapter>(load_lora_adapter(b_path, c, host)), 1.0f}});
  m.forward();
  auto step = gpu->record([&] { m.forward(); });
  step->replay();
  const Tensor b_before = m.result();
  lora.set_adapters({{std::make_shared<LoraAdapter>(load_lora_adapter(a_path, c, host)), 1.0f}});
  step->replay();
  const Tensor a_before = m.result();
  SafetensorsReadOptions slow = small_chunks();
  slow.before_chunk = [](uint64_t) { std::this_thread::sleep_for(std::chrono::microseconds(300)); };
  lora.swap_under_next_step({{std::make_shared<LoraAdapter>(start_loading_lora_adapter(b_path, c, host, slow)), 1.0f}},
                            [&] { step->replay(); });
  gpu->synchronize();
  EXPECT_TRUE(same_bits(m.result(), b_before)) << "b, arriving under the step";
  step->replay();  // no swap: every gate open
  EXPECT_TRUE(same_bits(m.result(), b_before));
  lora.swap_under_next_step({{std::make_shared<LoraAdapter>(start_loading_lora_adapter(a_path, c, host, slow)), 1.0f}},
                            [&] { step->replay(); });
  gpu->synchronize();
  EXPECT_TRUE(same_bits(m.result(), a_before)) << "a, arriving under the step";
}

// A NaN found after the step was launched: the call throws, the step does not hang (every gate opens), and the
// next step runs with the previous adapter, bit for bit.
TEST(CudaLoraStreaming, ALateNaNUnderTheStepRestoresThePreviousAdapter) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  TempDir dir;
  GpuModel m(*gpu);
  const FluxConfig& c = m.checkpoint.config;
  const std::string good = dir / "good.safetensors", bad = dir / "bad.safetensors";
  write_random_lora(good, c, 4, 7);
  write_random_lora(bad, c, 4, 8);
  {  // a NaN in the tensor the step reads last
    auto f = SafetensorsFile::open(bad);
    std::vector<std::pair<std::string, Tensor>> ts;
    std::string last;
    int64_t last_rank = -1;
    for (const auto& e : f->entries()) {
      Tensor t = Tensor::empty(e.dtype, e.shape);
      std::memcpy(t.data(), f->tensor(e.name).data(), t.nbytes());
      ts.emplace_back(e.name, t);
      if (flux_step_rank(e.name, c) > last_rank) last_rank = flux_step_rank(e.name, c), last = e.name;
    }
    for (auto& [name, t] : ts)
      if (name == last) t.ptr<uint16_t>()[t.numel() - 1] = 0x7fc0;
    write_safetensors(bad, ts, f->metadata());
  }
  const HostBufferAllocator host = gpu->host_buffer_allocator();
  LoraController lora(m.transformer, LoraMode::Runtime, 4);
  lora.set_upload_batch_bytes(1);
  lora.set_adapters({{std::make_shared<LoraAdapter>(load_lora_adapter(good, c, host)), 1.0f}});
  m.forward();
  auto step = gpu->record([&] { m.forward(); });
  step->replay();
  const Tensor before = m.result();
  SafetensorsReadOptions slow = small_chunks();
  slow.before_chunk = [](uint64_t) { std::this_thread::sleep_for(std::chrono::microseconds(300)); };
  const std::string msg = error_of([&] {
    lora.swap_under_next_step(
        {{std::make_shared<LoraAdapter>(start_loading_lora_adapter(bad, c, host, slow)), 1.0f}},
        [&] { step->replay(); });
  });
  EXPECT_NE(msg.find("NaN"), std::string::npos) << msg;
  gpu->synchronize();  // returns: the step did not hang
  step->replay();
  EXPECT_TRUE(same_bits(m.result(), before)) << "the previous adapter is back";
}

}  // namespace
}  // namespace fluxswap::test
