// Uploads from memory pinned in place on the GPU (the `bench --lora-read-sweep` rows that time cudaHostRegister):
// Backend::copy_from_host_registered leaves on the device exactly the bytes a pread into pinned memory does, whatever
// the chunking. Files go to /dev/shm where there is one (tmpfs: the page cache by construction, as in the benchmark).
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <random>

#include "cuda_test_util.h"
#include "io/safetensors.h"

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

}  // namespace
}  // namespace fluxswap::test
