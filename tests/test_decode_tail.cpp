// The pipeline's decode tail as backend ops (unpack_unscale_latents, image_to_u8, copy_to_host) on the CPU backend,
// and VaeDecoder::decode_to_rgb8: each must give exactly the bits of the host helpers the pipeline used before
// (unpack_flux_latents, unscale_latents, decode_host, postprocess_u8), so the CPU goldens do not move.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <random>

#include "backend/backend.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/vae_decoder.h"
#include "test_support.h"

namespace fluxswap {
namespace {

using test::same_bytes;

Tensor random_tensor(const Shape& shape, uint32_t seed, float std = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, std);
  Tensor t = Tensor::empty(DType::F32, shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = dist(rng);
  return t;
}

// Bit for bit, so that signed zeros and NaN payloads count too.
TEST(DecodeTail, UnpackUnscaleIsTheHostHelpersBitForBit) {
  auto cpu = make_cpu_backend();
  const VaeConfig c = VaeConfig::flux1();
  struct Case {
    int64_t B, C, h, w;
  };
  for (const Case& k : {Case{2, 16, 6, 10}, Case{1, 3, 2, 2}, Case{2, 5, 14, 4}, Case{1, 16, 128, 128}}) {
    const Tensor packed = random_tensor({k.B, (k.h / 2) * (k.w / 2), 4 * k.C}, uint32_t(k.h * 31 + k.w), 1.5f);
    Tensor out = Tensor::empty(DType::F32, {k.B, k.C, k.h, k.w});
    cpu->unpack_unscale_latents(packed, c.scaling_factor, c.shift_factor, out);
    EXPECT_TRUE(same_bytes(out, unscale_latents(unpack_flux_latents(packed, k.h, k.w), c)))
        << shape_str(out.shape());
  }
}

TEST(DecodeTail, PlainUnpackKeepsSignedZeros) {
  Tensor packed = Tensor::zeros(DType::F32, {1, 1, 4});
  packed.ptr<float>()[1] = -0.0f;
  packed.ptr<float>()[2] = std::numeric_limits<float>::infinity();
  const Tensor out = unpack_flux_latents(packed, 2, 2);
  EXPECT_FALSE(std::signbit(out.ptr<float>()[0]));
  EXPECT_TRUE(std::signbit(out.ptr<float>()[1]));
  EXPECT_EQ(out.ptr<float>()[2], std::numeric_limits<float>::infinity());
}

TEST(DecodeTail, ImageToU8IsPostprocessBitForBit) {
  auto cpu = make_cpu_backend();
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (const Shape& s : {Shape{2, 3, 17, 31}, Shape{1, 3, 1, 1}, Shape{2, 4, 8, 9}, Shape{1, 1, 5, 3}}) {
    Tensor image = random_tensor(s, uint32_t(s[2] * 7 + s[3]), 0.8f);
    // Saturation, NaN, infinities and an exact half (65279/65536 -> 254.5, numpy's round gives 254).
    const float specials[] = {nan, inf, -inf, -1.0f, 1.0f, 3.0f, -3.0f, -0.0f, 65279.0f / 32768.0f - 1.0f};
    for (size_t i = 0; i < std::size(specials) && int64_t(i * 3) < image.numel(); ++i)
      image.ptr<float>()[i * 3] = specials[i];
    Tensor out = Tensor::empty(DType::U8, {s[0], s[2], s[3], s[1]});
    cpu->image_to_u8(image, out);
    EXPECT_TRUE(same_bytes(out, postprocess_u8(image))) << shape_str(s);
  }
}

TEST(DecodeTail, OpsRejectShapesThatDoNotFit) {
  auto cpu = make_cpu_backend();
  const Tensor packed = Tensor::zeros(DType::F32, {2, 6, 12});  // 6 tokens of 3 channels
  auto unpack_into = [&](const Shape& s) {
    cpu->unpack_unscale_latents(packed, 1.0f, 0.0f, Tensor::empty(DType::F32, s));
  };
  EXPECT_NO_THROW(unpack_into({2, 3, 6, 4}));
  EXPECT_NO_THROW(unpack_into({2, 3, 4, 6}));
  EXPECT_THROW(unpack_into({2, 3, 4, 4}), Error);  // 4 tokens
  EXPECT_THROW(unpack_into({2, 3, 3, 8}), Error);  // odd height
  EXPECT_THROW(unpack_into({2, 4, 6, 4}), Error);  // 4 channels
  EXPECT_THROW(unpack_into({1, 3, 6, 4}), Error);  // one sample
  const Tensor image = Tensor::zeros(DType::F32, {1, 3, 4, 5});
  EXPECT_NO_THROW(cpu->image_to_u8(image, Tensor::empty(DType::U8, {1, 4, 5, 3})));
  EXPECT_THROW(cpu->image_to_u8(image, Tensor::empty(DType::U8, {1, 3, 4, 5})), Error);  // not channels-last
  EXPECT_THROW(cpu->image_to_u8(image, Tensor::empty(DType::F32, {1, 4, 5, 3})), Error);
  const std::string why = test::error_of([&] { cpu->image_to_u8(image, Tensor::empty(DType::U8, {1, 4, 4, 3})); });
  EXPECT_NE(why.find("image_to_u8"), std::string::npos) << why;
}

TEST(DecodeTail, CopyToHostOnTheCpu) {
  auto cpu = make_cpu_backend();
  const Tensor src = random_tensor({3, 5}, 9);
  Tensor dst = Tensor::empty(DType::F32, {3, 5});
  cpu->copy_to_host(src, dst);
  cpu->synchronize();
  EXPECT_TRUE(same_bytes(src, dst));
  EXPECT_THROW(cpu->copy_to_host(src, Tensor::empty(DType::F32, {5, 3})), Error);
  EXPECT_THROW(cpu->copy_to_host(src, Tensor::empty(DType::BF16, {3, 5})), Error);
  EXPECT_THROW(cpu->copy_to_host(src.narrow(1, 0, 2), Tensor::empty(DType::F32, {3, 2})), Error);  // not contiguous
}

// The whole tail on the CPU backend against the path the pipeline took before, on the fixtures' final latents.
class DecodeTailGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(DecodeTailGolden, DecodeToRgb8IsTheHostPathBitForBit) {
  FLUXSWAP_REQUIRE_FIXTURES();
  const std::string dir = test::fixtures_dir() + "/" + GetParam();
  auto cpu = make_cpu_backend();
  VaeDecoder vae = open_vae_decoder(dir + "/pipeline", *cpu);
  auto goldens = SafetensorsFile::open(dir + "/pipeline_goldens.safetensors");
  const Tensor packed = goldens->tensor("latents_out").to_f32();
  const int64_t up = vae.config().upscale(), H = goldens->tensor("image").size(1), W = goldens->tensor("image").size(2);
  const int64_t h = H / up, w = W / up;
  const Tensor before =
      postprocess_u8(vae.decode_host(unscale_latents(unpack_flux_latents(packed, h, w), vae.config())));
  // Twice, with another shape between: the decoder's buffers are re-made, and the result must not change.
  const Tensor first = vae.decode_to_rgb8(packed, h, w);
  ASSERT_EQ(first.shape(), (Shape{1, H, W, vae.config().out_channels}));
  Tensor host = Tensor::empty(DType::U8, first.shape());
  cpu->copy_to_host(first, host);
  EXPECT_TRUE(same_bytes(host, before));
  vae.decode_to_rgb8(Tensor::zeros(DType::F32, {2, 4, packed.size(2)}), 4, 4);
  cpu->copy_to_host(vae.decode_to_rgb8(packed, h, w), host);
  EXPECT_TRUE(same_bytes(host, before));
  EXPECT_THROW(vae.decode_to_rgb8(packed.narrow(2, 0, 8), h, w), Error);  // not 4 x the latent channels
}

INSTANTIATE_TEST_SUITE_P(Fixtures, DecodeTailGolden, ::testing::Values("tiny", "tiny_schnell"));

}  // namespace
}  // namespace fluxswap
