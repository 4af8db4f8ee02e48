// FP8 attention on the GPU (qk_norm_rope_fp8 + cuDNN's e4m3 flash attention) against the CPU reference of the same
// quantisation (tests/test_fp8_attention.cpp checks that one against exact attention): the ops on random inputs,
// eager and replayed from a recording, and the fixture transformers with FP8 attention alone and with FP8 linears.
// Tolerance: the GPU rounds bf16 inputs and quantises probabilities against a running row maximum (the CPU against
// the true one), so e4m3 codes differ at rounding boundaries: max|a-b| <= 8% of max|b|, cosine >= 0.998 for the op;
// the transformers as the FP8 linear test, 5e-2 and 0.999 (measured values are printed).
#include "../fixture_transformer.h"
#include "cuda_test_util.h"
#include "gpu_fixture_model.h"

namespace fluxswap::test {
namespace {

struct Case {
  int64_t B, H, S, D;
};

class CudaFp8AttentionOp : public ::testing::TestWithParam<Case> {};

TEST_P(CudaFp8AttentionOp, MatchesTheCpuReferenceEagerAndReplayed) {
  const auto [B, H, S, D] = GetParam();
  FLUXSWAP_CUDA_BACKEND(gpu);
  auto cpu = make_cpu_backend();
  const Pair qkv = random_pair(*gpu, {B, S, 3 * H * D}, 11, 1.5f);
  const Pair q_norm = random_pair(*gpu, {D}, 12, 0.5f, 1.0f), k_norm = random_pair(*gpu, {D}, 13, 0.5f, 1.0f);
  Tensor rope_host = Tensor::empty(DType::F32, {S, D / 2, 2});
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = 0; j < D / 2; ++j) {
      const double a = double(s) / std::pow(100.0, double(j) / double(D / 2));
      rope_host.ptr<float>()[(s * (D / 2) + j) * 2] = float(std::cos(a));
      rope_host.ptr<float>()[(s * (D / 2) + j) * 2 + 1] = float(std::sin(a));
    }
  const Pair rope = f32_pair(*gpu, rope_host);
  float wmax = 0.0f;
  for (const Pair* w : {&q_norm, &k_norm})
    for (int64_t i = 0; i < D; ++i) wmax = std::max(wmax, std::fabs(w->cpu.ptr<float>()[i]));
  const float qk_scale = 448.0f / (std::sqrt(float(D)) * wmax * 1.001f);

  const Shape heads{B, H, S, D};
  struct Side {
    Tensor q8, k8, v, amax, out;
  };
  auto make_side = [&](Backend& be, DType dt) {
    Side s{be.empty(DType::F8_E4M3, heads), be.empty(DType::F8_E4M3, heads), be.empty(dt, heads),
           be.empty(DType::F32, {1}), be.empty(dt, {B, S, H * D})};
    be.zero(s.amax);
    return s;
  };
  Side g = make_side(*gpu, DType::BF16), c = make_side(*cpu, DType::F32);
  const int64_t half = S / 3;  // two calls, as a double block makes them
  auto run = [&](Backend& be, Side& s, const Tensor& x, const Tensor& qn, const Tensor& kn, const Tensor& r) {
    be.qk_norm_rope_fp8(x.narrow(1, 0, half), qn, kn, r, 0, qk_scale, s.q8, s.k8, s.v, s.amax);
    be.qk_norm_rope_fp8(x.narrow(1, half, S - half), qn, kn, r, half, qk_scale, s.q8, s.k8, s.v, s.amax);
    be.attention_fp8(s.q8, s.k8, s.v, qk_scale, s.amax, s.out);
  };
  run(*cpu, c, qkv.cpu, q_norm.cpu, k_norm.cpu, rope.cpu);
  run(*gpu, g, qkv.gpu, q_norm.gpu, k_norm.gpu, rope.gpu);
  const Tensor eager = gpu->to_host_f32(g.out);
  double err = 0, mag = 0;
  for (int64_t i = 0; i < eager.numel(); ++i) {
    err = std::max(err, double(std::fabs(eager.ptr<float>()[i] - c.out.ptr<float>()[i])));
    mag = std::max(mag, double(std::fabs(c.out.ptr<float>()[i])));
  }
  const double cos = cosine_similarity(eager, c.out);
  std::printf("[ fp8 attn ] B %lld H %lld S %lld D %lld: GPU vs CPU max error %.4f of %.4f, cosine %.6f\n",
              (long long)B, (long long)H, (long long)S, (long long)D, err, mag, cos);
  EXPECT_LE(err, 0.08 * mag);
  EXPECT_GE(cos, 0.998);
  EXPECT_EQ(gpu->to_host_f32(g.amax).ptr<float>()[0], 0.0f) << "v_amax left at zero";

  // Replays of a recording give the eager result bit for bit (every scale is computed on the device).
  auto work = gpu->record([&] { run(*gpu, g, qkv.gpu, q_norm.gpu, k_norm.gpu, rope.gpu); });
  for (int i = 0; i < 2; ++i) {
    work->replay();
    EXPECT_EQ(max_rel_error(gpu->to_host_f32(g.out), eager), 0.0) << "replay " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaFp8AttentionOp,
                         ::testing::Values(Case{1, 2, 64, 16}, Case{2, 3, 77, 32}, Case{1, 2, 333, 128},
                                           Case{1, 4, 1024, 128}));

class CudaFp8AttentionTransformer : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaFp8AttentionTransformer, MatchesTheCpuReference) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  FixtureTransformer cpu(GetParam());
  GpuModel g(*gpu, GetParam());
  for (bool fp8_linears : {false, true}) {
    cpu.transformer->set_fp8_attention(true);
    g.transformer.set_fp8_attention(true);
    cpu.transformer->set_fp8(fp8_linears);
    g.transformer.set_fp8(fp8_linears);
    g.forward();
    const Tensor a = g.result(), b = cpu.run();
    const double err = max_rel_error(a, b), cos = cosine_similarity(a, b);
    std::printf("[ fp8 attn ] %s%s: GPU vs CPU max rel error %.3g, cosine %.6f\n", GetParam().c_str(),
                fp8_linears ? " + fp8 linears" : "", err, cos);
    EXPECT_LE(err, 5e-2);
    EXPECT_GE(cos, 0.999);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaFp8AttentionTransformer, ::testing::Values("tiny", "small"));

}  // namespace
}  // namespace fluxswap::test
