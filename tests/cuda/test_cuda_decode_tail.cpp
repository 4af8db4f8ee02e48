// The pipeline's decode tail on the GPU: unpack_unscale_latents and image_to_u8 against the CPU backend's reference
// on the same bf16 input values (random, odd sizes, two samples, special values), copy_to_host, and
// VaeDecoder::decode_to_rgb8 on the tiny fixtures' VAE.
//
// Tolerances: unpack_unscale_latents computes the reference's float32 value and rounds it to bf16, so each element
// is within 2^-8 of the reference, relatively (round to nearest is within 2^-9); image_to_u8 at most 1 level (the
// same float32 arithmetic, so it should agree exactly; the count of differing bytes is printed). decode_to_rgb8
// against the same GPU decode post-processed on the host: at most 1 level; against the CPU decoder: at most 12
// levels, 1.5 on average (bf16 weights and activations through every layer, as in test_cuda_pipeline).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>

#include "../test_support.h"
#include "cuda_test_util.h"
#include "io/safetensors.h"
#include "model/vae_decoder.h"

namespace fluxswap::test {
namespace {

constexpr float kScaling = 0.3611f, kShift = 0.1159f;  // FLUX.1's VAE

struct LevelStats {
  int max = 0;
  int64_t differing = 0;
  double mean = 0;
};

LevelStats level_difference(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.dtype(), DType::U8);
  EXPECT_EQ(b.dtype(), DType::U8);
  EXPECT_EQ(a.shape(), b.shape());
  LevelStats s;
  if (a.shape() != b.shape() || a.numel() == 0) return s;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const int d = std::abs(int(a.ptr<uint8_t>()[i]) - int(b.ptr<uint8_t>()[i]));
    s.max = std::max(s.max, d);
    s.differing += d != 0;
    s.mean += d;
  }
  s.mean /= double(a.numel());
  return s;
}

// A device tensor's bytes on the host, through the op under test.
Tensor download(Backend& gpu, const Tensor& t) {
  Tensor host = Tensor::empty(t.dtype(), t.shape());
  gpu.copy_to_host(t, host);
  gpu.synchronize();
  return host;
}

struct LatentCase {
  int64_t B, C, h, w;
};

TEST(CudaDecodeTail, UnpackUnscaleMatchesCpu) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  auto cpu = make_cpu_backend();
  const LatentCase cases[] = {
      {2, 16, 6, 10},     // FLUX's channels, two samples
      {1, 3, 2, 2},       // one token
      {2, 5, 14, 6},      // odd channel count
      {3, 1, 2, 30},      // one channel, one token row
      {2, 16, 128, 128},  // a 1024x1024 image's latents, two samples
      {1, 16, 90, 62},    // 720x496: token rows of odd length
  };
  uint64_t seed = 700;
  for (const LatentCase& c : cases) {
    const Shape out_shape{c.B, c.C, c.h, c.w};
    Pair packed = random_pair(*gpu, {c.B, (c.h / 2) * (c.w / 2), 4 * c.C}, ++seed, 1.5f, 0.2f);
    Pair out = nan_pair(*gpu, out_shape);
    gpu->unpack_unscale_latents(packed.gpu, kScaling, kShift, out.gpu);
    cpu->unpack_unscale_latents(packed.cpu, kScaling, kShift, out.cpu);
    const Tensor got = gpu->to_host_f32(out.gpu);
    int64_t bad = 0;
    double worst = 0;
    for (int64_t i = 0; i < got.numel(); ++i) {
      const float g = got.ptr<float>()[i], e = out.cpu.ptr<float>()[i];
      const double err = std::abs(double(g) - double(e));
      worst = std::max(worst, e != 0.0f ? err / std::abs(double(e)) : err);
      if (!(err <= std::ldexp(std::abs(double(e)), -8))) ++bad;  // NaN counts as bad
    }
    EXPECT_EQ(bad, 0) << shape_str(out_shape) << ": elements beyond bf16 rounding of the reference; worst relative "
                      << worst;
    // The reference is the pipeline's host path.
    EXPECT_EQ(max_rel_error(out.cpu, unscale_latents(unpack_flux_latents(packed.cpu, c.h, c.w), VaeConfig::flux1())),
              0.0);
  }
}

TEST(CudaDecodeTail, UnpackUnscaleRejectsShapesThatDoNotFit) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  const Tensor packed = gpu->empty(DType::BF16, {2, 6, 12});  // 6 tokens of 3 channels
  auto unpack_into = [&](const Tensor& out) { gpu->unpack_unscale_latents(packed, 1.0f, 0.0f, out); };
  EXPECT_THROW(unpack_into(gpu->empty(DType::BF16, {2, 3, 4, 4})), Error);  // 4 tokens
  EXPECT_THROW(unpack_into(gpu->empty(DType::BF16, {2, 3, 3, 8})), Error);  // odd height
  EXPECT_THROW(unpack_into(gpu->empty(DType::BF16, {2, 4, 6, 4})), Error);  // 4 channels
  EXPECT_THROW(unpack_into(gpu->empty(DType::F32, {2, 3, 6, 4})), Error);
  EXPECT_THROW(unpack_into(packed.view({2, 3, 6, 4})), Error);  // in place
  EXPECT_NO_THROW(unpack_into(gpu->empty(DType::BF16, {2, 3, 6, 4})));
}

TEST(CudaDecodeTail, ImageToU8MatchesCpu) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  auto cpu = make_cpu_backend();
  const Shape shapes[] = {{2, 3, 17, 31}, {1, 3, 1, 1}, {2, 4, 8, 9}, {1, 1, 5, 3}, {2, 3, 128, 96},
                          {1, 3, 1024, 1024}};
  uint64_t seed = 800;
  for (const Shape& s : shapes) {
    // std 0.8 around 0: most values inside -1..1, some saturating on either side.
    Pair image = random_pair(*gpu, s, ++seed, 0.8f);
    const Shape out_shape{s[0], s[2], s[3], s[1]};
    Tensor out = gpu->empty(DType::U8, out_shape), expected = Tensor::empty(DType::U8, out_shape);
    gpu->image_to_u8(image.gpu, out);
    cpu->image_to_u8(image.cpu, expected);
    const LevelStats d = level_difference(download(*gpu, out), expected);
    EXPECT_LE(d.max, 1) << shape_str(s);
    std::printf("[ u8       ] %s: %lld of %lld bytes differ from the CPU reference\n", shape_str(s).c_str(),
                (long long)d.differing, (long long)expected.numel());
  }
}

TEST(CudaDecodeTail, ImageToU8SpecialValues) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  auto cpu = make_cpu_backend();
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  // NaN is black, infinities saturate, -1 / 0 / 1 are 0 / 128 (127.5, half to even) / 255.
  const float values[] = {nan, inf, -inf, -1.0f, 0.0f, 1.0f, 3.0f, -3.0f, -0.0f, 1e-30f, 0.5f, -0.5f,
                          0.99f, -0.99f, 0.25f, 2e30f, -2e30f, 0.75f};
  const Shape s{2, 3, 1, 3};
  Tensor host = Tensor::empty(DType::F32, s);
  std::memcpy(host.ptr<float>(), values, sizeof(values));
  Tensor image = gpu->empty(DType::BF16, s);
  gpu->copy_from_host(host, image);
  const Tensor as_bf16 = gpu->to_host_f32(image);  // the values the GPU sees
  Tensor out = gpu->empty(DType::U8, {2, 1, 3, 3}), expected = Tensor::empty(DType::U8, {2, 1, 3, 3});
  gpu->image_to_u8(image, out);
  cpu->image_to_u8(as_bf16, expected);
  const Tensor got = download(*gpu, out);
  EXPECT_LE(level_difference(got, expected).max, 1);
  // Sample 0, channels-last: pixel 0 is (NaN, -1, 3), pixel 1 (+inf, 0, -3).
  const int want[] = {0, 0, 255, 255, 128, 0};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(int(got.ptr<uint8_t>()[i]), want[i]) << "byte " << i;
}

TEST(CudaDecodeTail, ImageToU8RejectsShapesThatDoNotFit) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  const Tensor image = gpu->empty(DType::BF16, {1, 3, 4, 5});
  EXPECT_THROW(gpu->image_to_u8(image, gpu->empty(DType::U8, {1, 3, 4, 5})), Error);  // not channels-last
  EXPECT_THROW(gpu->image_to_u8(image, gpu->empty(DType::BF16, {1, 4, 5, 3})), Error);
  EXPECT_THROW(gpu->image_to_u8(image, Tensor::empty(DType::U8, {1, 4, 5, 3})), Error);  // a host output
  EXPECT_NO_THROW(gpu->image_to_u8(image, gpu->empty(DType::U8, {1, 4, 5, 3})));
}

TEST(CudaDecodeTail, CopyToHost) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  Pair x = random_pair(*gpu, {3, 37, 5}, 901);
  // bf16 bytes as they are: widened on the host they are to_host_f32's values.
  const Tensor raw = download(*gpu, x.gpu);
  ASSERT_EQ(raw.dtype(), DType::BF16);
  EXPECT_EQ(max_rel_error(raw.to_f32(), x.cpu), 0.0);
  // Into pinned memory (asynchronous until synchronize()).
  const HostBufferAllocator pinned = gpu->host_buffer_allocator();
  ASSERT_TRUE(pinned);
  std::shared_ptr<void> owner = pinned(x.gpu.nbytes());
  Tensor dst = Tensor::borrow(owner.get(), DType::BF16, x.gpu.shape(), Device::CPU, owner);
  gpu->copy_to_host(x.gpu, dst);
  gpu->synchronize();
  EXPECT_EQ(std::memcmp(dst.data(), raw.data(), raw.nbytes()), 0);
  EXPECT_THROW(gpu->copy_to_host(x.gpu, Tensor::empty(DType::F32, {3, 37, 5})), Error);   // dtype
  EXPECT_THROW(gpu->copy_to_host(x.gpu, Tensor::empty(DType::BF16, {3, 5, 37})), Error);  // shape
  EXPECT_THROW(gpu->copy_to_host(x.gpu.narrow(1, 1, 3), Tensor::empty(DType::BF16, {3, 3, 5})), Error);
  EXPECT_THROW(gpu->copy_to_host(x.cpu, Tensor::empty(DType::F32, {3, 37, 5})), Error);  // a host source
}

// The whole tail on the tiny fixtures' VAE: the GPU's decode_to_rgb8 against the same GPU decode post-processed on
// the host (isolates the new ops and the plumbing), and against the CPU decoder's decode_to_rgb8.
class CudaDecodeTailGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaDecodeTailGolden, DecodeToRgb8) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  auto cpu = make_cpu_backend();
  const std::string dir = fixtures_dir() + "/" + GetParam();
  VaeDecoder on_gpu = open_vae_decoder(dir + "/pipeline", *gpu), on_cpu = open_vae_decoder(dir + "/pipeline", *cpu);
  auto goldens = SafetensorsFile::open(dir + "/pipeline_goldens.safetensors");
  const Tensor latents = goldens->tensor("latents_out").to_f32();  // [1, tokens, 4C]
  const VaeConfig& c = on_gpu.config();
  const int64_t H = goldens->tensor("image").size(1), W = goldens->tensor("image").size(2);
  const int64_t h = H / c.upscale(), w = W / c.upscale();
  // Two samples, the second a different image: each must land in its own slot.
  Tensor two = Tensor::empty(DType::F32, {2, latents.size(1), latents.size(2)});
  for (int64_t i = 0; i < latents.numel(); ++i) {
    two.ptr<float>()[i] = latents.ptr<float>()[i];
    two.ptr<float>()[latents.numel() + i] = -0.5f * latents.ptr<float>()[i];
  }
  Tensor packed = gpu->empty(DType::BF16, two.shape());
  gpu->copy_from_host(two, packed);
  const Tensor packed_values = gpu->to_host_f32(packed);  // what both decoders start from

  const Tensor rgb8 = download(*gpu, on_gpu.decode_to_rgb8(packed, h, w));
  ASSERT_EQ(rgb8.shape(), (Shape{2, H, W, c.out_channels}));

  Tensor lat = gpu->empty(DType::BF16, {2, c.latent_channels, h, w});
  Tensor img = gpu->empty(DType::BF16, {2, c.out_channels, H, W});
  gpu->unpack_unscale_latents(packed, c.scaling_factor, c.shift_factor, lat);
  on_gpu.decode(lat, img);
  const LevelStats same_decode = level_difference(rgb8, postprocess_u8(gpu->to_host_f32(img)));
  EXPECT_LE(same_decode.max, 1);

  const Tensor reference = on_cpu.decode_to_rgb8(packed_values, h, w);  // the CPU backend's tensors are host ones
  const LevelStats vs_cpu = level_difference(rgb8, reference);
  EXPECT_LE(vs_cpu.max, 12);
  EXPECT_LE(vs_cpu.mean, 1.5);
  std::printf("[ golden   ] %s decode_to_rgb8, B 2: against the GPU decode post-processed on the host max %d "
              "levels (%lld bytes differ); against the CPU decoder max %d, mean %.3f levels\n",
              GetParam().c_str(), same_decode.max, (long long)same_decode.differing, vs_cpu.max, vs_cpu.mean);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaDecodeTailGolden, ::testing::Values("tiny", "tiny_schnell"));

}  // namespace
}  // namespace fluxswap::test
