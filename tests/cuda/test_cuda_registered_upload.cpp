// Uploads from memory pinned in place (FLUXSWAP_LORA_READ=register) on the GPU: Backend::copy_from_host_registered
// leaves on the device exactly the bytes a pread into pinned memory does, whatever the chunking; the device NaN/Inf
// scan (Backend::find_non_finite) finds the first bad element of each tensor as the host scan does; and a mapped
// LoRA adapter gives the bits of one read first, while a NaN in it names the file and the tensor and leaves the model
// as it was. Files go to /dev/shm where there is one (tmpfs: the page cache by construction, as in the benchmark).
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <random>

#include "../test_support.h"
#include "cuda_test_util.h"
#include "gpu_fixture_model.h"
#include "io/safetensors.h"
#include "lora/lora_controller.h"
#include "lora/random_lora.h"

namespace fluxswap::test {
namespace {

// A scratch folder in RAM-backed storage when the host has it, else the temp directory.
class ShmDir {
 public:
  ShmDir() {
    std::random_device rd;
    const std::filesystem::path root = std::filesystem::is_directory("/dev/shm")
                                           ? std::filesystem::path("/dev/shm")
                                           : std::filesystem::temp_directory_path();
    path_ = root / ("fluxswap-cuda-test-" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~ShmDir() { std::filesystem::remove_all(path_); }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  bool in_ram() const { return path_.string().starts_with("/dev/shm/"); }

 private:
  std::filesystem::path path_;
};

class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) { setenv(name, value, 1); }
  ~ScopedEnv() { unsetenv(name_); }

 private:
  const char* name_;
};

// The device bytes of a U8 tensor.
std::vector<uint8_t> bytes_of(Backend& gpu, const Tensor& dev) {
  std::vector<uint8_t> host(dev.nbytes());
  gpu.copy_to_host(dev, Tensor::borrow(host.data(), DType::U8, {int64_t(host.size())}));
  gpu.synchronize();
  return host;
}

// Whether the device says it can pin a read-only mapping (the report's support line).
bool claims_read_only_pinning(const RegisteredUploadReport& r) {
  return r.support.find("HostRegisterSupported 1") != std::string::npos &&
         r.support.find("HostRegisterReadOnlySupported 1") != std::string::npos;
}

TEST(CudaRegisteredUpload, LeavesTheBytesOfAPreadUpload) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  ShmDir dir;
  const std::string path = dir / "bytes.safetensors";
  const int64_t n = (int64_t(5) << 20) + 12345;  // a few MB, not a whole number of pages or chunks
  Tensor data = Tensor::empty(DType::U8, {n});
  std::mt19937_64 rng(7);
  for (int64_t i = 0; i < n; ++i) data.ptr<uint8_t>()[i] = uint8_t(rng());
  write_safetensors(path, {{"x", data}});

  // Today's path: read into pinned memory, one DMA.
  const auto read = SafetensorsFile::read(path, gpu->host_buffer_allocator());
  const Tensor by_pread = gpu->empty(DType::U8, {n});
  gpu->copy_from_host_batch({{read->tensor("x"), by_pread}});
  gpu->synchronize();
  const std::vector<uint8_t> expected = bytes_of(*gpu, by_pread);
  ASSERT_EQ(std::memcmp(expected.data(), data.data(), size_t(n)), 0);

  for (const auto& [chunk, threads] : {std::pair{size_t(1) << 20, 4u}, {size_t(4096), 1u}, {size_t(64) << 20, 4u}}) {
    const auto mapped = SafetensorsFile::open_shared(path, false);
    const auto [region, region_bytes] = mapped->data_region();
    const auto* src = static_cast<const char*>(region);
    // Pieces of odd sizes into a device buffer in a shuffled order of places, plus a source outside the region and a
    // converting copy, which must go the ordinary way.
    const Tensor dev = gpu->empty(DType::U8, {n});
    std::vector<std::pair<Tensor, Tensor>> copies;
    for (int64_t at = 0; at < n;) {
      const int64_t len = std::min<int64_t>(n - at, 1 + int64_t(rng() % 300000));
      copies.emplace_back(Tensor::borrow(const_cast<char*>(src) + at, DType::U8, {len}), dev.narrow(0, at, len));
      at += len;
    }
    std::shuffle(copies.begin(), copies.end(), rng);
    Tensor outside = Tensor::empty(DType::U8, {100});
    std::memset(outside.data(), 0xab, 100);
    const Tensor outside_dev = gpu->empty(DType::U8, {100});
    copies.emplace_back(outside, outside_dev);
    Tensor f32 = Tensor::empty(DType::F32, {3});
    f32.ptr<float>()[0] = 1.0f, f32.ptr<float>()[1] = -2.5f, f32.ptr<float>()[2] = 0.25f;
    const Tensor bf16_dev = gpu->empty(DType::BF16, {3});
    copies.emplace_back(f32, bf16_dev);

    RegisteredUploadOptions o;
    o.chunk_bytes = chunk, o.threads = threads;
    const RegisteredUploadReport r = gpu->copy_from_host_registered(region, region_bytes, copies, o);
    std::cout << "chunk " << chunk << ", " << threads << " thread(s): " << (r.registered ? "pinned in place" : "NOT pinned: " + r.fallback)
              << " (" << r.registered_chunks << "/" << r.chunks << " chunks; " << r.support << ")\n";
    EXPECT_EQ(bytes_of(*gpu, dev), expected) << "chunk " << chunk;
    EXPECT_EQ(bytes_of(*gpu, outside_dev), std::vector<uint8_t>(100, 0xab));
    const Tensor back = gpu->to_host_f32(bf16_dev);
    EXPECT_EQ(back.ptr<float>()[1], -2.5f);
    EXPECT_EQ(r.other_bytes + r.direct_bytes, size_t(n) + 100 + 12);
    if (r.registered) EXPECT_EQ(r.direct_bytes, size_t(n));
    if (dir.in_ram() && claims_read_only_pinning(r))
      EXPECT_TRUE(r.registered) << "the device claims read-only pinning, yet a tmpfs mapping was not pinned: "
                                << r.fallback;
  }
}

TEST(CudaRegisteredUpload, FindNonFiniteAgreesWithTheHostScan) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  std::mt19937_64 rng(11);
  std::vector<Tensor> host, dev;
  const DType types[] = {DType::BF16, DType::F16, DType::F32};
  for (int i = 0; i < 40; ++i) {
    const DType t = types[i % 3];
    // Sizes around a tile (16384 elements) and 16-byte words; some views start 3 elements in (unaligned).
    const int64_t n = i == 0 ? 1 : i < 10 ? int64_t(rng() % 40) + 1 : int64_t(rng() % 70000) + 1;
    const int64_t skip = i % 4 == 1 ? 3 : 0;
    Tensor h = Tensor::zeros(t, {n + skip});
    for (int64_t k = 0; k < n + skip; ++k) {  // finite values of every magnitude, no zeros only
      const float v = float(int64_t(rng() % 2001) - 1000) * 0.01f;
      convert_from_f32(&v, t, static_cast<char*>(h.data()) + k * int64_t(dtype_size(t)), 1);
    }
    if (i % 5 != 0) {  // a few bad values, the first at a random place; every fifth tensor stays clean
      for (int b = 0; b < 3; ++b) {
        const int64_t at = skip + int64_t(rng() % uint64_t(n));
        const float bad = b % 2 ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
        convert_from_f32(&bad, t, static_cast<char*>(h.data()) + at * int64_t(dtype_size(t)), 1);
      }
    }
    const Tensor d = gpu->empty(t, {n + skip});
    gpu->copy_from_host_batch({{h, d}});  // same dtype: bytes as they are
    host.push_back(h.narrow(0, skip, n));
    dev.push_back(d.narrow(0, skip, n));
  }
  const std::vector<int64_t> found = gpu->find_non_finite(dev);
  ASSERT_EQ(found.size(), dev.size());
  for (size_t i = 0; i < dev.size(); ++i)
    EXPECT_EQ(found[i], first_non_finite(host[i].dtype(), host[i].data(), size_t(host[i].numel())))
        << "tensor " << i << " (" << dtype_name(host[i].dtype()) << ", " << host[i].numel() << " elements)";
  EXPECT_TRUE(gpu->find_non_finite({}).empty());
  EXPECT_NE(error_of([&] { gpu->find_non_finite({gpu->empty(DType::I32, {4})}); }).find("expected BF16"),
            std::string::npos);
}

TEST(CudaRegisteredUpload, AMappedAdapterGivesTheBitsOfOneReadFirstAndANaNChangesNothing) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  ShmDir dir;
  for (LoraMode mode : {LoraMode::Merged, LoraMode::Runtime}) {
    GpuModel m(*gpu);
    const FluxConfig& c = m.checkpoint.config;
    const std::string a_path = dir / "a.safetensors", b_path = dir / "b.safetensors", bad = dir / "bad.safetensors";
    write_random_lora(a_path, c, 4, 1);  // bf16: the DMA path, not a converting copy
    write_random_lora(b_path, c, 4, 2);
    std::string bad_key;
    {  // a's tensors with a NaN in the middle one, element 3
      auto f = SafetensorsFile::open(a_path);
      std::vector<std::pair<std::string, Tensor>> ts;
      for (const auto& e : f->entries()) {
        Tensor t = Tensor::empty(e.dtype, e.shape);
        std::memcpy(t.data(), f->tensor(e.name).data(), t.nbytes());
        ts.emplace_back(e.name, t);
      }
      auto& [name, t] = ts[ts.size() / 2];
      ASSERT_EQ(t.dtype(), DType::BF16);
      t.ptr<uint16_t>()[3] = 0x7fc0;
      bad_key = name;
      write_safetensors(bad, ts, f->metadata());
    }
    const HostBufferAllocator host = gpu->host_buffer_allocator();
    LoraController lora(m.transformer, mode, 4);
    lora.set_adapters({{std::make_shared<LoraAdapter>(load_lora_adapter(a_path, c, host)), 1.0f}});
    m.forward();
    auto step = gpu->record([&] { m.forward(); });
    const Tensor read_first = m.result();

    ScopedEnv read("FLUXSWAP_LORA_READ", "register");
    auto mapped = [&](const std::string& p) {
      auto a = std::make_shared<LoraAdapter>(start_loading_lora_adapter(p, c, host));
      EXPECT_TRUE(a->mapped);
      return a;
    };
    lora.set_adapters({{mapped(b_path), 1.0f}});
    step->replay();
    const Tensor with_b = m.result();
    EXPECT_GT(max_rel_error(with_b, read_first), 1e-3) << "b changed nothing";
    const LoraApplyReport r = lora.set_adapters({{mapped(a_path), 1.0f}});
    EXPECT_EQ(r.mapped_uploads, 1u);
    std::cout << (r.mapped_upload.registered ? "pinned in place" : "NOT pinned: " + r.mapped_upload.fallback) << "\n";
    step->replay();
    EXPECT_EQ(max_rel_error(m.result(), read_first), 0.0);

    const std::string msg = error_of([&] { lora.set_adapters({{mapped(bad), 1.0f}}); });
    EXPECT_NE(msg.find(bad), std::string::npos) << msg;
    EXPECT_NE(msg.find("'" + bad_key + "' holds NaN at element 3"), std::string::npos) << msg;
    step->replay();
    EXPECT_EQ(max_rel_error(m.result(), read_first), 0.0) << "the model changed";
  }
}

}  // namespace
}  // namespace fluxswap::test
