// The CUDA backend's VAE ops (conv2d, group_norm, upsample_nearest2x, transpose_last2) against the float32 CPU
// reference on the same bf16 input values, with NaN-poisoned outputs; the tiny pipelines' VAE decode on the GPU
// against its golden; and timings at FLUX VAE sizes (printed, not asserted).
//
// Tolerances: max|gpu - cpu| / max|cpu| <= 1e-2 per op (bf16 output rounding plus float32 summation order); the
// data movers are exact. The decode: <= 2e-2 (bf16 weights and activations through every layer).
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <sstream>

#include "../test_support.h"
#include "cuda_test_util.h"
#include "io/safetensors.h"
#include "model/vae_decoder.h"

namespace fluxswap::test {
namespace {

constexpr double kTol = 1e-2;
constexpr double kGoldenTol = 2e-2;

// A CUDA backend whose convolution path is `conv_mode` (FLUXSWAP_CONV: auto, nchw, nhwc or direct). The backend
// reads the variable at its first image op, so one is issued while it is set.
std::unique_ptr<Backend> cuda_with_conv(const char* conv_mode, std::string* why) {
  auto gpu = try_cuda(why);
  if (!gpu) return nullptr;
  setenv("FLUXSWAP_CONV", conv_mode, 1);
  Tensor t = gpu->empty(DType::BF16, {1, 1, 1, 1}), w = gpu->empty(DType::BF16, {1});
  gpu->fill_normal(t, 1, 0.0f, 1.0f);
  gpu->fill_normal(w, 2, 0.0f, 1.0f);
  try {
    gpu->group_norm(t, w, w, 1, 1e-6f, false, t);
  } catch (...) {
    unsetenv("FLUXSWAP_CONV");
    throw;
  }
  unsetenv("FLUXSWAP_CONV");
  return gpu;
}

// ---------------------------------------------------------------------------------------------------------------
// conv2d

struct ConvCase {
  int64_t B, Cin, Cout, H, W, kh, kw;
  int pad;
  bool bias;
};

std::string describe(const ConvCase& c) {
  std::ostringstream s;
  s << "B " << c.B << ", " << c.Cin << " -> " << c.Cout << ", " << c.H << "x" << c.W << ", kernel " << c.kh << "x"
    << c.kw << ", padding " << c.pad << (c.bias ? ", bias" : ", no bias");
  return s.str();
}

constexpr ConvCase kConvCases[] = {
    {1, 4, 16, 16, 16, 3, 3, 1, true},     // the tiny VAE's conv_in
    {1, 8, 3, 32, 32, 3, 3, 1, true},      // its conv_out
    {2, 5, 7, 13, 11, 3, 3, 1, true},      // odd everything, two samples
    {1, 6, 10, 9, 7, 3, 3, 0, false},      // no padding, no bias
    {2, 16, 8, 12, 10, 1, 1, 0, true},     // a 1x1 shortcut
    {1, 6, 4, 5, 3, 1, 1, 1, true},        // 1x1 with padding: a zero border
    {1, 3, 5, 7, 6, 2, 3, 1, true},        // a non-square kernel
    {1, 1, 1, 1, 1, 3, 3, 1, true},        // a single pixel
    {1, 64, 32, 33, 47, 3, 3, 1, true},    // tensor-core channel counts, odd image
    {2, 32, 64, 24, 40, 1, 1, 0, true},    // 1x1, multiples of 8
    {1, 24, 40, 17, 19, 3, 3, 0, false},   // multiples of 8, no padding, no bias
    {1, 128, 128, 64, 64, 3, 3, 1, true},  // a VAE layer, smaller
};

class CudaImageConv : public ::testing::TestWithParam<const char*> {};

TEST_P(CudaImageConv, MatchesCpuReference) {
  std::string why;
  auto gpu = cuda_with_conv(GetParam(), &why);
  if (!gpu) GTEST_SKIP() << "no CUDA backend: " << why;
  auto cpu = make_cpu_backend();
  // cuDNN proper (no fallback) is asked only for the channel counts its tensor-core engines are built for.
  const bool cudnn_only = std::string(GetParam()) == "nchw" || std::string(GetParam()) == "nhwc";
  uint64_t seed = 100;
  for (const ConvCase& c : kConvCases) {
    if (cudnn_only && (c.Cin % 8 || c.Cout % 8)) continue;
    const int64_t Ho = c.H + 2 * c.pad - c.kh + 1, Wo = c.W + 2 * c.pad - c.kw + 1;
    Pair x = random_pair(*gpu, {c.B, c.Cin, c.H, c.W}, ++seed);
    Pair w = random_pair(*gpu, {c.Cout, c.Cin, c.kh, c.kw}, ++seed, 1.0f / std::sqrt(float(c.Cin * c.kh * c.kw)));
    Pair b = random_pair(*gpu, {c.Cout}, ++seed, 0.5f);
    Pair y = nan_pair(*gpu, {c.B, c.Cout, Ho, Wo});
    const Tensor bg = c.bias ? b.gpu : Tensor(), bc = c.bias ? b.cpu : Tensor();
    try {
      gpu->conv2d(x.gpu, w.gpu, bg, c.pad, y.gpu);
    } catch (const Error& e) {
      ADD_FAILURE() << describe(c) << ": " << e.what();
      continue;
    }
    cpu->conv2d(x.cpu, w.cpu, bc, c.pad, y.cpu);
    EXPECT_LE(max_rel_error(gpu->to_host_f32(y.gpu), y.cpu), kTol) << describe(c);
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, CudaImageConv, ::testing::Values("auto", "direct", "nchw", "nhwc"),
                         [](const auto& info) { return std::string(info.param); });

TEST(CudaImageOps, Conv2dRejectsMismatchedShapes) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  Tensor x = gpu->empty(DType::BF16, {1, 3, 4, 4}), w = gpu->empty(DType::BF16, {2, 3, 3, 3});
  EXPECT_THROW(gpu->conv2d(x, w, Tensor(), 1, gpu->empty(DType::BF16, {1, 2, 3, 3})), Error);  // pad 1 gives 4x4
  EXPECT_THROW(gpu->conv2d(x, w, gpu->empty(DType::BF16, {3}), 1, gpu->empty(DType::BF16, {1, 2, 4, 4})), Error);
  EXPECT_THROW(gpu->conv2d(x, w, Tensor(), 1, x.view({1, 3, 4, 4}).narrow(1, 0, 2)), Error);  // overlaps x
}

// ---------------------------------------------------------------------------------------------------------------
// group_norm

struct NormCase {
  int64_t B, C, H, W;
  int groups;
  bool silu, in_place;
  float mean;  // of the input: the statistics must not cancel
};

TEST(CudaImageOps, GroupNormMatchesCpuReference) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  auto cpu = make_cpu_backend();
  const NormCase cases[] = {
      {2, 32, 13, 11, 8, true, false, 0.0f},
      {1, 12, 5, 7, 4, false, false, 3.0f},     // 35 pixels: no 8-wide accesses
      {1, 64, 32, 32, 32, true, true, 0.0f},    // in place
      {2, 16, 1, 1, 4, false, false, 0.0f},     // 4 values a group
      {1, 32, 256, 256, 4, true, false, 5.0f},  // 524288 values a group: 32 partial chunks
      {1, 6, 151, 149, 2, false, true, 2.0f},   // an odd group size over several chunks, in place
      {3, 512, 16, 16, 32, true, false, 0.0f},  // the decoder's mid-block width
  };
  uint64_t seed = 200;
  for (const NormCase& c : cases) {
    const Shape shape{c.B, c.C, c.H, c.W};
    Pair x = random_pair(*gpu, shape, ++seed, 1.0f, c.mean);
    Pair w = random_pair(*gpu, {c.C}, ++seed, 0.5f, 1.0f), b = random_pair(*gpu, {c.C}, ++seed, 0.5f);
    Pair y = c.in_place ? x : nan_pair(*gpu, shape);
    Tensor expected = Tensor::empty(DType::F32, shape);
    cpu->group_norm(x.cpu, w.cpu, b.cpu, c.groups, 1e-6f, c.silu, expected);
    gpu->group_norm(x.gpu, w.gpu, b.gpu, c.groups, 1e-6f, c.silu, y.gpu);
    EXPECT_LE(max_rel_error(gpu->to_host_f32(y.gpu), expected), kTol)
        << shape_str(shape) << " groups " << c.groups << " silu " << c.silu << " in place " << c.in_place;
  }
  Tensor x = gpu->empty(DType::BF16, {1, 6, 2, 2}), v = gpu->empty(DType::BF16, {6});
  EXPECT_THROW(gpu->group_norm(x, v, v, 4, 1e-6f, false, x), Error);  // 6 channels in 4 groups
}

// ---------------------------------------------------------------------------------------------------------------
// Data movers: exact.

TEST(CudaImageOps, UpsampleNearest2x) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  auto cpu = make_cpu_backend();
  const Shape shapes[] = {{2, 3, 5, 7}, {1, 4, 8, 16}, {1, 2, 1, 1}, {1, 16, 32, 36}};
  uint64_t seed = 300;
  for (const Shape& s : shapes) {
    Pair x = random_pair(*gpu, s, ++seed);
    Pair y = nan_pair(*gpu, {s[0], s[1], 2 * s[2], 2 * s[3]});
    gpu->upsample_nearest2x(x.gpu, y.gpu);
    cpu->upsample_nearest2x(x.cpu, y.cpu);
    EXPECT_EQ(max_rel_error(gpu->to_host_f32(y.gpu), y.cpu), 0.0) << shape_str(s);
  }
  Tensor x = gpu->empty(DType::BF16, {1, 2, 3, 3});
  EXPECT_THROW(gpu->upsample_nearest2x(x, gpu->empty(DType::BF16, {1, 2, 6, 5})), Error);
}

TEST(CudaImageOps, TransposeLast2) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  auto cpu = make_cpu_backend();
  const Shape shapes[] = {{2, 37, 45}, {1, 64, 130}, {3, 512, 96}, {1, 1, 7}, {1, 200, 1}};
  uint64_t seed = 400;
  for (const Shape& s : shapes) {
    Pair x = random_pair(*gpu, s, ++seed);
    Pair y = nan_pair(*gpu, {s[0], s[2], s[1]}), back = nan_pair(*gpu, s);
    gpu->transpose_last2(x.gpu, y.gpu);
    cpu->transpose_last2(x.cpu, y.cpu);
    EXPECT_EQ(max_rel_error(gpu->to_host_f32(y.gpu), y.cpu), 0.0) << shape_str(s);
    gpu->transpose_last2(y.gpu, back.gpu);
    EXPECT_EQ(max_rel_error(gpu->to_host_f32(back.gpu), x.cpu), 0.0) << shape_str(s) << " round trip";
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Recording: the convolution's cuDNN plan and GroupNorm's scratch exist before the capture, so a recorded
// decoder step replays on new inputs.

TEST(CudaImageOps, ConvAndGroupNormReplayFromARecording) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  auto cpu = make_cpu_backend();
  const Shape shape{1, 32, 24, 20};
  Pair x = random_pair(*gpu, shape, 501), w = random_pair(*gpu, {32, 32, 3, 3}, 502, 1.0f / 17.0f);
  Pair b = random_pair(*gpu, {32}, 503, 0.5f), gw = random_pair(*gpu, {32}, 504, 0.5f, 1.0f);
  Tensor h = gpu->empty(DType::BF16, shape), y = gpu->empty(DType::BF16, shape);
  auto step = [&] {
    gpu->group_norm(x.gpu, gw.gpu, b.gpu, 8, 1e-6f, true, h);
    gpu->conv2d(h, w.gpu, b.gpu, 1, y);
  };
  step();  // plans and scratch are made outside the recording
  auto work = gpu->record(step);
  gpu->fill_normal(x.gpu, 505, 1.0f, 2.0f);
  work->replay();
  Tensor xh = gpu->to_host_f32(x.gpu), hh = Tensor::empty(DType::F32, shape), expected = Tensor::empty(DType::F32, shape);
  cpu->group_norm(xh, gw.cpu, b.cpu, 8, 1e-6f, true, hh);
  const Tensor h_gpu = gpu->to_host_f32(h);  // the conv's input as the GPU rounded it
  EXPECT_LE(max_rel_error(h_gpu, hh), kTol);
  cpu->conv2d(h_gpu, w.cpu, b.cpu, 1, expected);
  EXPECT_LE(max_rel_error(gpu->to_host_f32(y), expected), kTol);
}

// ---------------------------------------------------------------------------------------------------------------
// The tiny pipelines' VAE decode on the GPU.

// The mid-block attention calls attention_ex, which the CUDA backend may not have yet.
bool attention_missing(const Error& e) {
  return std::string(e.what()).find("attention_ex: not implemented yet") != std::string::npos;
}

class CudaImageGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaImageGolden, VaeDecodeMatchesReference) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  const std::string dir = fixtures_dir() + "/" + GetParam();
  VaeDecoder vae = open_vae_decoder(dir + "/pipeline", *gpu);
  auto goldens = SafetensorsFile::open(dir + "/pipeline_goldens.safetensors");
  Tensor out;
  try {
    out = vae.decode_host(goldens->tensor("vae_decode_in"));
  } catch (const Error& e) {
    if (attention_missing(e)) GTEST_SKIP() << "the CUDA backend's attention_ex is not implemented yet: " << e.what();
    throw;
  }
  const double err = max_rel_error(out, goldens->tensor("vae_decode_out"));
  EXPECT_LE(err, kGoldenTol);
  std::printf("[ golden   ] %s VAE decode: max rel error %.3g\n", GetParam().c_str(), err);
}

// The same decoder with its mid-block attention taken out runs on this file's ops alone: GPU against CPU.
TEST_P(CudaImageGolden, VaeDecodeWithoutAttentionMatchesCpu) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  const std::string src = fixtures_dir() + "/" + GetParam() + "/pipeline/vae";
  TempDir tmp;
  auto file = SafetensorsFile::open(src + "/diffusion_pytorch_model.safetensors");
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& key : file->keys())
    if (key.find(".attentions.") == std::string::npos) tensors.emplace_back(key, file->tensor(key));
  write_safetensors(tmp / "diffusion_pytorch_model.safetensors", tensors);
  std::ifstream in(src + "/config.json");
  std::string config((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  config.replace(config.rfind('}'), 1, R"(, "mid_block_add_attention": false})");  // the last key wins
  std::ofstream(tmp / "config.json") << config;

  auto cpu = make_cpu_backend();
  VaeDecoder on_gpu = open_vae_decoder(tmp.path().string(), *gpu), on_cpu = open_vae_decoder(tmp.path().string(), *cpu);
  auto goldens = SafetensorsFile::open(fixtures_dir() + "/" + GetParam() + "/pipeline_goldens.safetensors");
  const Tensor latents = goldens->tensor("vae_decode_in");
  const double err = max_rel_error(on_gpu.decode_host(latents), on_cpu.decode_host(latents));
  EXPECT_LE(err, kGoldenTol);
  std::printf("[ golden   ] %s VAE decode without attention, GPU vs CPU: max rel error %.3g\n", GetParam().c_str(),
              err);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaImageGolden, ::testing::Values("tiny", "tiny_schnell"));

// ---------------------------------------------------------------------------------------------------------------
// Timings at the FLUX VAE's sizes (B = 1), each convolution path in turn; the backend's own per-op event timings,
// averaged after a warm-up.

double mean_op_ms(Backend& be, const char* op, int reps, const std::function<void()>& run) {
  for (int i = 0; i < 2; ++i) run();
  be.set_profiling(true);
  for (int i = 0; i < reps; ++i) run();
  const double ms = be.profile_ms().at(op) / reps;
  be.set_profiling(false);
  return ms;
}

TEST(CudaImageTiming, VaeSizes) {
  struct Size {
    int64_t C, S;
  };
  const Size sizes[] = {{512, 128}, {256, 512}, {128, 1024}};
  for (const char* mode : {"nchw", "nhwc", "direct"}) {
    std::string why;
    auto gpu = cuda_with_conv(mode, &why);
    if (!gpu) GTEST_SKIP() << "no CUDA backend: " << why;
    for (const Size& s : sizes) {
      Tensor x = gpu->empty(DType::BF16, {1, s.C, s.S, s.S}), y = gpu->empty(DType::BF16, {1, s.C, s.S, s.S});
      Tensor w = gpu->empty(DType::BF16, {s.C, s.C, 3, 3}), b = gpu->empty(DType::BF16, {s.C});
      gpu->fill_normal(x, 1, 0.0f, 1.0f);
      gpu->fill_normal(w, 2, 0.0f, 0.02f);
      gpu->fill_normal(b, 3, 0.0f, 0.1f);
      const double flops = 2.0 * double(s.C) * double(s.C) * 9.0 * double(s.S * s.S);
      try {
        const double ms = mean_op_ms(*gpu, "conv2d", std::string(mode) == "direct" ? 2 : 10,
                                     [&] { gpu->conv2d(x, w, b, 1, y); });
        std::printf("[ timing   ] conv2d %-6s 3x3 %lld -> %lld at %lldx%lld: %.3f ms, %.1f TFLOP/s (%s)\n", mode,
                    (long long)s.C, (long long)s.C, (long long)s.S, (long long)s.S, ms, flops / ms * 1e-9,
                    gpu->name().c_str());
      } catch (const Error& e) {
        std::printf("[ timing   ] conv2d %-6s 3x3 %lld at %lldx%lld: refused (%s)\n", mode, (long long)s.C,
                    (long long)s.S, (long long)s.S, e.what());
      }
    }
  }

  FLUXSWAP_CUDA_BACKEND(gpu);
  const int64_t C = 128, S = 1024;
  Tensor x = gpu->empty(DType::BF16, {1, C, S, S}), y = gpu->empty(DType::BF16, {1, C, S, S});
  Tensor v = gpu->empty(DType::BF16, {C});
  gpu->fill_normal(x, 4, 0.5f, 1.0f);
  gpu->fill_normal(v, 5, 1.0f, 0.1f);
  const double bytes = double(C * S * S) * 2.0;  // one pass over the tensor
  const double gn = mean_op_ms(*gpu, "group_norm", 10, [&] { gpu->group_norm(x, v, v, 32, 1e-6f, true, y); });
  const double tr = mean_op_ms(*gpu, "transpose_last2", 10,
                               [&] { gpu->transpose_last2(x.view({1, C, S * S}), y.view({1, S * S, C})); });
  Tensor small = x.view({C * S * S}).narrow(0, 0, C * S * S / 4).view({1, C, S / 2, S / 2});
  const double up = mean_op_ms(*gpu, "upsample_nearest2x", 10, [&] { gpu->upsample_nearest2x(small, y); });
  std::printf("[ timing   ] group_norm+silu [1, %lld, %lld, %lld] 32 groups: %.3f ms, %.0f GB/s of one read + one "
              "write (%.0f GB/s of the two reads + one write it makes)\n",
              (long long)C, (long long)S, (long long)S, gn, 2 * bytes / gn * 1e-6, 3 * bytes / gn * 1e-6);
  std::printf("[ timing   ] transpose_last2 [1, %lld, %lld]: %.3f ms, %.0f GB/s; upsample_nearest2x to [1, %lld, "
              "%lld, %lld]: %.3f ms, %.0f GB/s\n",
              (long long)C, (long long)(S * S), tr, 2 * bytes / tr * 1e-6, (long long)C, (long long)S, (long long)S,
              up, 1.25 * bytes / up * 1e-6);
}

}  // namespace
}  // namespace fluxswap::test
