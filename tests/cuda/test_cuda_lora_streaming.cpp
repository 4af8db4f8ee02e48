// Adapters uploaded while their file is still being read into pinned memory (start_loading_lora_adapter), on the
// CUDA backend: the same bits as an adapter read first, through a recorded step; a NaN in the file's last chunk
// leaves the weights (merged) or slots (runtime) exactly as they were. bf16 files, so the DMA path is the one taken.
#include <cstring>

#include "../test_support.h"
#include "cuda_test_util.h"
#include "gpu_fixture_model.h"
#include "io/safetensors.h"
#include "lora/lora_controller.h"
#include "lora/random_lora.h"

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

}  // namespace
}  // namespace fluxswap::test
