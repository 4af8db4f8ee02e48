// The VAE decoder against the diffusers reference outputs, its pipeline helpers, and the CPU image ops it is built
// from (each against a plain loop written here). Golden tolerance: max|a-b|/max|b| <= 1e-4 (float32 vs float32).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>

#include "core/compare.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/vae_decoder.h"
#include "test_support.h"

namespace fluxswap {
namespace {

constexpr double kTolerance = 1e-4;

Tensor random_tensor(const Shape& shape, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Tensor t = Tensor::empty(DType::F32, shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = dist(rng);
  return t;
}

Tensor from_values(const Shape& shape, std::vector<float> values) {
  Tensor t = Tensor::empty(DType::F32, shape);
  std::copy(values.begin(), values.end(), t.ptr<float>());
  return t;
}

// ---------------------------------------------------------------------------------------------------------------
// CpuImageOps

// conv2d by its definition: seven loops, double accumulation.
Tensor naive_conv2d(const Tensor& x, const Tensor& w, const Tensor& bias, int pad) {
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = w.size(0), kh = w.size(2), kw = w.size(3), Ho = H + 2 * pad - kh + 1, Wo = W + 2 * pad - kw + 1;
  Tensor y = Tensor::empty(DType::F32, {B, Cout, Ho, Wo});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t co = 0; co < Cout; ++co)
      for (int64_t oy = 0; oy < Ho; ++oy)
        for (int64_t ox = 0; ox < Wo; ++ox) {
          double acc = bias.defined() ? bias.ptr<float>()[co] : 0.0;
          for (int64_t ci = 0; ci < Cin; ++ci)
            for (int64_t ky = 0; ky < kh; ++ky)
              for (int64_t kx = 0; kx < kw; ++kx) {
                const int64_t iy = oy + ky - pad, ix = ox + kx - pad;
                if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                acc += double(x.ptr<float>()[((b * Cin + ci) * H + iy) * W + ix]) *
                       w.ptr<float>()[((co * Cin + ci) * kh + ky) * kw + kx];
              }
          y.ptr<float>()[((b * Cout + co) * Ho + oy) * Wo + ox] = float(acc);
        }
  return y;
}

struct ConvCase {
  int64_t B, Cin, Cout, H, W, kh, kw;
  int pad;
  bool bias;
};

class CpuImageOpsConv : public ::testing::TestWithParam<ConvCase> {};

TEST_P(CpuImageOpsConv, MatchesNaiveLoops) {
  const ConvCase c = GetParam();
  auto backend = make_cpu_backend();
  Tensor x = random_tensor({c.B, c.Cin, c.H, c.W}, 1), w = random_tensor({c.Cout, c.Cin, c.kh, c.kw}, 2);
  Tensor bias = c.bias ? random_tensor({c.Cout}, 3) : Tensor();
  Tensor expected = naive_conv2d(x, w, bias, c.pad);
  Tensor y = Tensor::empty(DType::F32, expected.shape());
  backend->conv2d(x, w, bias, c.pad, y);
  EXPECT_LE(max_rel_error(y, expected), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    CpuImageOps, CpuImageOpsConv,
    ::testing::Values(ConvCase{2, 3, 5, 7, 9, 3, 3, 1, true},     // 3x3, "same" padding, odd sizes
                      ConvCase{2, 3, 5, 7, 9, 3, 3, 0, true},     // 3x3, no padding
                      ConvCase{2, 6, 4, 5, 3, 1, 1, 0, true},     // 1x1 (the pointwise path)
                      ConvCase{1, 6, 4, 5, 3, 1, 1, 1, false},    // 1x1 with padding: a zero border
                      ConvCase{1, 2, 3, 6, 5, 2, 3, 1, true},     // a non-square kernel
                      ConvCase{1, 1, 1, 1, 1, 3, 3, 1, true},     // a single pixel
                      ConvCase{1, 8, 4, 300, 257, 3, 3, 1, true}  // big enough for im2col to work in row bands
                      ),
    [](const auto& info) { return "case" + std::to_string(info.index); });

TEST(CpuImageOps, Conv2dRejectsMismatchedShapes) {
  auto backend = make_cpu_backend();
  Tensor x = random_tensor({1, 3, 4, 4}, 1), w = random_tensor({2, 3, 3, 3}, 2);
  Tensor y = Tensor::empty(DType::F32, {1, 2, 3, 3});  // padding 1 gives 4x4
  EXPECT_THROW(backend->conv2d(x, w, Tensor(), 1, y), Error);
}

TEST(CpuImageOps, GroupNormByHand) {
  auto backend = make_cpu_backend();
  // One sample, 2 groups of 2 channels of 1x2 pixels. Group 0 holds 1, 2, 3, 4: mean 2.5, variance 1.25.
  Tensor x = from_values({1, 4, 1, 2}, {1, 2, 3, 4, 0, 0, 10, 10});
  Tensor w = from_values({4}, {1, 2, 1, 1}), b = from_values({4}, {0, 0, 0.5f, -1});
  Tensor y = Tensor::empty(DType::F32, {1, 4, 1, 2});
  backend->group_norm(x, w, b, 2, 0.0f, false, y);
  const float s = 1.0f / std::sqrt(1.25f);
  // Group 1 holds 0, 0, 10, 10: mean 5, variance 25, so each value is -1 or +1 before the affine.
  const std::vector<float> expected = {-1.5f * s, -0.5f * s, 2 * 0.5f * s, 2 * 1.5f * s, -0.5f, -0.5f, 0, 0};
  for (int i = 0; i < 8; ++i) EXPECT_NEAR(y.ptr<float>()[i], expected[i], 1e-6) << i;

  backend->group_norm(x, w, b, 2, 0.0f, true, y);  // then SiLU
  for (int i = 0; i < 8; ++i) {
    const float v = expected[i];
    EXPECT_NEAR(y.ptr<float>()[i], v / (1 + std::exp(-v)), 1e-6) << i;
  }
}

TEST(CpuImageOps, GroupNormMatchesLoopsWithEps) {
  auto backend = make_cpu_backend();
  const int64_t B = 2, C = 6, G = 3, H = 5, W = 3, cg = C / G;
  Tensor x = random_tensor({B, C, H, W}, 4), w = random_tensor({C}, 5), b = random_tensor({C}, 6);
  Tensor y = Tensor::empty(DType::F32, x.shape());
  const float eps = 0.1f;  // large enough to matter
  backend->group_norm(x, w, b, int(G), eps, false, y);
  double worst = 0;
  for (int64_t n = 0; n < B; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const float* xs = x.ptr<float>() + (n * C + g * cg) * H * W;
      double mean = 0, var = 0;
      for (int64_t i = 0; i < cg * H * W; ++i) mean += xs[i] / double(cg * H * W);
      for (int64_t i = 0; i < cg * H * W; ++i) var += (xs[i] - mean) * (xs[i] - mean) / double(cg * H * W);
      for (int64_t i = 0; i < cg * H * W; ++i) {
        const int64_t c = g * cg + i / (H * W);
        const double e = (xs[i] - mean) / std::sqrt(var + eps) * w.ptr<float>()[c] + b.ptr<float>()[c];
        worst = std::max(worst, std::fabs(e - y.ptr<float>()[(n * C + g * cg) * H * W + i]));
      }
    }
  EXPECT_LE(worst, 1e-5);
}

TEST(CpuImageOps, UpsampleNearest2x) {
  auto backend = make_cpu_backend();
  Tensor x = from_values({1, 2, 2, 3}, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12});
  Tensor y = Tensor::empty(DType::F32, {1, 2, 4, 6});
  backend->upsample_nearest2x(x, y);
  for (int64_t c = 0; c < 2; ++c)
    for (int64_t i = 0; i < 4; ++i)
      for (int64_t j = 0; j < 6; ++j)
        EXPECT_EQ(y.ptr<float>()[(c * 4 + i) * 6 + j], x.ptr<float>()[(c * 2 + i / 2) * 3 + j / 2]);
  EXPECT_THROW(backend->upsample_nearest2x(x, Tensor::empty(DType::F32, {1, 2, 4, 5})), Error);
}

TEST(CpuImageOps, TransposeLast2) {
  auto backend = make_cpu_backend();
  const int64_t B = 2, R = 37, C = 45;  // not multiples of the tile size
  Tensor x = random_tensor({B, R, C}, 7), y = Tensor::empty(DType::F32, {B, C, R});
  backend->transpose_last2(x, y);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c)
        ASSERT_EQ(y.ptr<float>()[(b * C + c) * R + r], x.ptr<float>()[(b * R + r) * C + c]);
  Tensor back = Tensor::empty(DType::F32, x.shape());
  backend->transpose_last2(y, back);
  EXPECT_EQ(max_rel_error(back, x), 0.0);
}

// ---------------------------------------------------------------------------------------------------------------
// VaeDecoder

class VaeDecoderGolden : public ::testing::TestWithParam<std::string> {};

// The fixtures' vae_decode_in is what vae.decode receives: already divided by the scaling factor and shifted.
TEST_P(VaeDecoderGolden, MatchesReferenceDecode) {
  FLUXSWAP_REQUIRE_FIXTURES();
  const std::string dir = test::fixtures_dir() + "/" + GetParam();
  auto backend = make_cpu_backend();
  VaeDecoder vae = open_vae_decoder(dir + "/pipeline", *backend);
  auto goldens = SafetensorsFile::open(dir + "/pipeline_goldens.safetensors");
  const Tensor in = goldens->tensor("vae_decode_in"), expected = goldens->tensor("vae_decode_out");
  EXPECT_LE(max_rel_error(vae.decode_host(in), expected), kTolerance);
  // Unscaling it once more must not match: the test would not tell the two conventions apart otherwise.
  EXPECT_GT(max_rel_error(vae.decode_host(unscale_latents(in, vae.config())), expected), 100 * kTolerance);
}

// The pipeline's last step: the sampler's packed latents -> unpack -> unscale -> decode -> image in 0..1.
TEST_P(VaeDecoderGolden, PipelineLatentsToImage) {
  FLUXSWAP_REQUIRE_FIXTURES();
  const std::string dir = test::fixtures_dir() + "/" + GetParam();
  auto backend = make_cpu_backend();
  VaeDecoder vae = open_vae_decoder(dir + "/pipeline", *backend);
  auto goldens = SafetensorsFile::open(dir + "/pipeline_goldens.safetensors");
  const Tensor expected = goldens->tensor("image");  // [1, 32, 32, 3]
  const int64_t h = expected.size(1) / vae.config().upscale(), w = expected.size(2) / vae.config().upscale();
  Tensor latents = unscale_latents(unpack_flux_latents(goldens->tensor("latents_out"), h, w), vae.config());
  Tensor image = vae.decode_host(latents);
  EXPECT_LE(max_rel_error(postprocess_unit(image), expected), kTolerance);

  // The uint8 image is the float one rounded; at most one level off where the float sits near a half.
  Tensor u8 = postprocess_u8(image);
  ASSERT_EQ(u8.shape(), expected.shape());
  int worst = 0;
  for (int64_t i = 0; i < u8.numel(); ++i)
    worst = std::max(worst, std::abs(int(u8.ptr<uint8_t>()[i]) - int(std::lround(expected.ptr<float>()[i] * 255))));
  EXPECT_LE(worst, 1);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, VaeDecoderGolden, ::testing::Values("tiny", "tiny_schnell"));

TEST(VaeDecoder, ConfigFromPipelineFolder) {
  FLUXSWAP_REQUIRE_FIXTURES();
  const VaeConfig c = VaeConfig::from_json_file(test::fixtures_dir() + "/tiny/pipeline/vae/config.json");
  EXPECT_EQ(c.block_out_channels, (std::vector<int64_t>{8, 16}));
  EXPECT_EQ(c.layers_per_block, 1);
  EXPECT_EQ(c.norm_num_groups, 4);
  EXPECT_EQ(c.latent_channels, 4);
  EXPECT_FLOAT_EQ(c.scaling_factor, 0.3611f);
  EXPECT_FLOAT_EQ(c.shift_factor, 0.1159f);
  EXPECT_FALSE(c.use_post_quant_conv);
  EXPECT_EQ(c.upscale(), 2);
  EXPECT_EQ(VaeConfig::flux1().upscale(), 8);
  // SD-style configs: no shift_factor, no use_post_quant_conv key (diffusers then builds the conv).
  const VaeConfig sd = VaeConfig::from_json_text(
      R"({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "shift_factor": null})", "sd.json");
  EXPECT_EQ(sd.shift_factor, 0.0f);
  EXPECT_TRUE(sd.use_post_quant_conv);
  EXPECT_THROW(VaeConfig::from_json_text(R"({"block_out_channels": [8, 12], "norm_num_groups": 8})", "x.json"),
               Error);
}

// Copies the tiny VAE into a temporary folder with its tensors and config edited.
using NamedTensors = std::vector<std::pair<std::string, Tensor>>;
std::string edited_vae(const test::TempDir& tmp, const std::function<void(NamedTensors&)>& edit_tensors,
                       const std::string& config_patch = "") {
  const std::string src = test::fixtures_dir() + "/tiny/pipeline/vae";
  auto file = SafetensorsFile::open(src + "/diffusion_pytorch_model.safetensors");
  NamedTensors tensors;
  for (const auto& key : file->keys()) tensors.emplace_back(key, file->tensor(key));
  edit_tensors(tensors);
  write_safetensors(tmp / "diffusion_pytorch_model.safetensors", tensors);
  std::ifstream in(src + "/config.json");
  std::string config((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!config_patch.empty()) config.replace(config.rfind('}'), 1, "," + config_patch + "}");
  std::ofstream(tmp / "config.json") << config;
  return tmp.path().string();
}

TEST(VaeDecoder, MissingOrMisshapenWeightIsNamed) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto backend = make_cpu_backend();
  const std::string key = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight";
  {
    test::TempDir tmp;
    const std::string dir = edited_vae(tmp, [&](auto& ts) {
      std::erase_if(ts, [&](const auto& kv) { return kv.first == key; });
    });
    try {
      open_vae_decoder(dir, *backend);
      FAIL() << "expected an Error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("diffusion_pytorch_model.safetensors"), std::string::npos) << e.what();
    }
  }
  {
    test::TempDir tmp;
    const std::string dir = edited_vae(tmp, [&](auto& ts) {
      for (auto& [k, t] : ts)
        if (k == key) t = Tensor::zeros(DType::F32, {8, 16, 3, 3});
    });
    try {
      open_vae_decoder(dir, *backend);
      FAIL() << "expected an Error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("[8, 16, 1, 1]"), std::string::npos) << e.what();
    }
  }
}

TEST(VaeDecoder, DecoderTensorOutsideTheConfigIsAnError) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto backend = make_cpu_backend();
  test::TempDir tmp;
  const std::string dir = edited_vae(tmp, [](auto&) {}, R"("mid_block_add_attention": false)");
  try {
    open_vae_decoder(dir, *backend);
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("decoder.mid_block.attentions.0."), std::string::npos) << e.what();
  }
}

// SD-style VAEs run a 1x1 post_quant_conv before the decoder: an identity one must not change the decode.
TEST(VaeDecoder, PostQuantConvIsApplied) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto backend = make_cpu_backend();
  auto goldens = SafetensorsFile::open(test::fixtures_dir() + "/tiny/pipeline_goldens.safetensors");
  const Tensor in = goldens->tensor("vae_decode_in"), expected = goldens->tensor("vae_decode_out");
  for (const float gain : {1.0f, 2.0f}) {
    test::TempDir tmp;
    const std::string dir = edited_vae(
        tmp,
        [&](auto& ts) {
          Tensor w = Tensor::zeros(DType::F32, {4, 4, 1, 1});
          for (int i = 0; i < 4; ++i) w.ptr<float>()[i * 5] = gain;
          ts.emplace_back("post_quant_conv.weight", w);
          ts.emplace_back("post_quant_conv.bias", Tensor::zeros(DType::F32, {4}));
        },
        R"("use_post_quant_conv": true)");
    VaeDecoder vae = open_vae_decoder(dir, *backend);
    const double err = max_rel_error(vae.decode_host(in), expected);
    if (gain == 1.0f)
      EXPECT_LE(err, kTolerance);
    else
      EXPECT_GT(err, 100 * kTolerance);
  }
}

TEST(VaeDecoder, BatchAndShapeChanges) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto backend = make_cpu_backend();
  VaeDecoder vae = open_vae_decoder(test::fixtures_dir() + "/tiny/pipeline/vae", *backend);
  auto goldens = SafetensorsFile::open(test::fixtures_dir() + "/tiny/pipeline_goldens.safetensors");
  const Tensor in = goldens->tensor("vae_decode_in").to_f32(), expected = goldens->tensor("vae_decode_out");
  vae.decode_host(random_tensor({1, 4, 6, 10}, 8));  // another shape first: buffers must be re-made
  // Two samples: the golden one and a different one; each must decode as if alone.
  Tensor other = random_tensor(in.shape(), 9);
  Tensor both = Tensor::empty(DType::F32, {2, 4, in.size(2), in.size(3)});
  std::copy(in.ptr<float>(), in.ptr<float>() + in.numel(), both.ptr<float>());
  std::copy(other.ptr<float>(), other.ptr<float>() + other.numel(), both.ptr<float>() + in.numel());
  Tensor out = vae.decode_host(both);
  EXPECT_LE(max_rel_error(out.narrow(0, 0, 1).to_f32(), expected), kTolerance);
  EXPECT_LE(max_rel_error(out.narrow(0, 1, 1).to_f32(), vae.decode_host(other)), 1e-6);
  EXPECT_THROW(vae.decode_host(random_tensor({1, 3, 4, 4}, 10)), Error);  // wrong latent channel count
}

TEST(VaeDecoder, PackUnpackRoundTripAndLayout) {
  const int64_t B = 2, C = 3, h = 6, w = 4;
  Tensor latents = random_tensor({B, C, h, w}, 11);
  Tensor packed = pack_flux_latents(latents);
  ASSERT_EQ(packed.shape(), (Shape{B, (h / 2) * (w / 2), 4 * C}));
  EXPECT_EQ(max_rel_error(unpack_flux_latents(packed, h, w), latents), 0.0);
  // Latent pixel (b=1, c=2, y=3, x=2) is token (3/2)*(w/2) + 2/2 = 3, channel 2*4 + (3%2)*2 + 2%2 = 10.
  EXPECT_EQ(packed.ptr<float>()[(1 * 6 + 3) * 12 + 10], latents.ptr<float>()[((1 * C + 2) * h + 3) * w + 2]);
  EXPECT_THROW(unpack_flux_latents(packed, 4, 4), Error);  // 4 tokens, but 6 were packed
  EXPECT_THROW(unpack_flux_latents(packed, 5, 4), Error);  // odd height
}

TEST(VaeDecoder, UnscaleLatents) {
  VaeConfig c = VaeConfig::flux1();
  Tensor out = unscale_latents(from_values({1, 1, 1, 2}, {0.0f, 0.3611f}), c);
  EXPECT_FLOAT_EQ(out.ptr<float>()[0], 0.1159f);
  EXPECT_FLOAT_EQ(out.ptr<float>()[1], 1.1159f);
}

TEST(VaeDecoder, PostprocessRoundsLikeNumpy) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Channels-first in, channels-last out: pixel (0, 0) is (-1, 0, 1), pixel (0, 1) is (-3, 2, NaN).
  Tensor image = from_values({1, 3, 1, 2}, {-1.0f, -3.0f, 0.0f, 2.0f, 1.0f, nan});
  Tensor u8 = postprocess_u8(image);
  ASSERT_EQ(u8.shape(), (Shape{1, 1, 2, 3}));
  ASSERT_EQ(u8.dtype(), DType::U8);
  const std::vector<int> expected = {0, 128 /* 127.5 */, 255, 0, 255, 0};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(int(u8.ptr<uint8_t>()[i]), expected[i]) << i;
  // 0.01 -> 0.505 * 255 = 128.775 -> 129; -0.01 -> 0.495 * 255 = 126.225 -> 126; 65279/65536 gives exactly
  // 254.5 in float32, which numpy rounds to the even 254 (rounding half up would give 255).
  Tensor near = postprocess_u8(from_values({1, 1, 1, 3}, {0.01f, -0.01f, 65279.0f / 65536.0f}));
  EXPECT_EQ(int(near.ptr<uint8_t>()[0]), 129);
  EXPECT_EQ(int(near.ptr<uint8_t>()[1]), 126);
  EXPECT_EQ(int(near.ptr<uint8_t>()[2]), 254);
}

}  // namespace
}  // namespace fluxswap
