// Recording and replay (CUDA graphs), capture-time errors, per-op profiling and memory accounting.
#include <cstring>

#include "cuda_test_util.h"

namespace fluxswap::test {
namespace {

// A block-shaped sequence of every op. Each output is recomputed from inputs the sequence never modifies, so any
// number of runs gives the same values.
struct Block {
  static constexpr int64_t B = 2, S = 77, H = 2, D = 64, C = H * D, M = 256;
  Tensor x, mod, w_qkv, b_qkv, w_mlp, b_mlp, q_norm, k_norm, rope, t, w_t, b_t;  // inputs
  Tensor normed, proj, q, k, v, t_freq;                                           // intermediates
  Tensor attn_mlp, res, hidden;                                                   // outputs

  explicit Block(Backend& be) {
    uint64_t seed = 500;
    auto rnd = [&](Shape s, float std = 1.0f, float mean = 0.0f) {
      Tensor r = be.empty(DType::BF16, s);
      be.fill_normal(r, ++seed, mean, std);
      return r;
    };
    x = rnd({B, S, C});
    mod = rnd({B, 6 * C}, 0.5f);
    w_qkv = rnd({3 * C, C}, 0.1f);
    b_qkv = rnd({3 * C});
    w_mlp = rnd({M, C}, 0.1f);
    b_mlp = rnd({M});
    q_norm = rnd({D}, 0.1f, 1.0f);
    k_norm = rnd({D}, 0.1f, 1.0f);
    w_t = rnd({C, 256}, 0.06f);
    b_t = rnd({C});
    Tensor r = Tensor::empty(DType::F32, {S, D / 2, 2});
    for (int64_t i = 0; i < S * D / 2; ++i) {
      r.ptr<float>()[2 * i] = float(std::cos(0.1 * double(i)));
      r.ptr<float>()[2 * i + 1] = float(std::sin(0.1 * double(i)));
    }
    rope = be.empty(DType::F32, r.shape());
    be.copy_from_host(r, rope);
    Tensor th = Tensor::empty(DType::F32, {B});
    th.ptr<float>()[0] = 0.25f;
    th.ptr<float>()[1] = 0.9f;
    t = be.empty(DType::F32, {B});
    be.copy_from_host(th, t);
    normed = be.empty(DType::BF16, {B, S, C});
    proj = be.empty(DType::BF16, {B, S, 3 * C + M});
    q = be.empty(DType::BF16, {B, H, S, D});
    k = be.empty(DType::BF16, {B, H, S, D});
    v = be.empty(DType::BF16, {B, H, S, D});
    t_freq = be.empty(DType::BF16, {B, 256});
    attn_mlp = be.empty(DType::BF16, {B, S, C + M});
    res = be.empty(DType::BF16, {B, S, C});
    hidden = be.empty(DType::BF16, {B, C});
  }

  void run(Backend& be) const {
    be.layer_norm_modulate(x, mod.narrow(1, 0, C), mod.narrow(1, C, C), normed);
    Tensor qkv = proj.narrow(2, 0, 3 * C);
    be.linear(normed, w_qkv, b_qkv, qkv, Activation::None);
    be.linear(normed, w_mlp, b_mlp, attn_mlp.narrow(2, C, M), Activation::GeluTanh);
    be.qk_norm_rope(qkv, q_norm, k_norm, rope, 0, q, k, v);
    be.attention(q, k, v, attn_mlp.narrow(2, 0, C));
    be.silu(x, res);
    be.gated_residual(res, mod.narrow(1, 2 * C, C), attn_mlp.narrow(2, 0, C));
    be.add(res, x);
    be.timestep_embedding(t, 1000.0f, t_freq);
    be.linear(t_freq, w_t, b_t, hidden, Activation::Silu);
  }

  std::vector<Tensor> outputs() const { return {attn_mlp, res, hidden}; }
};

std::vector<Tensor> read(Backend& be, const std::vector<Tensor>& ts) {
  std::vector<Tensor> out;
  for (const Tensor& t : ts) out.push_back(be.to_host_f32(t));
  return out;
}

void poison(Backend& be, const std::vector<Tensor>& ts) {
  for (const Tensor& t : ts) be.fill_normal(t, 77, 0.0f, 100.0f);
}

void expect_bitwise_equal(const std::vector<Tensor>& a, const std::vector<Tensor>& b, const std::string& when) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].shape(), b[i].shape());
    EXPECT_EQ(std::memcmp(a[i].data(), b[i].data(), a[i].nbytes()), 0) << when << ": output " << i << " differs";
  }
}

class CudaGraph : public ::testing::TestWithParam<const char*> {};

TEST_P(CudaGraph, ReplaysMatchEagerBitForBit) {
  FLUXSWAP_CUDA_BACKEND(gpu, GetParam());
  Block blk(*gpu);
  blk.run(*gpu);  // eager: also creates every plan the recording needs
  const auto eager = read(*gpu, blk.outputs());
  poison(*gpu, blk.outputs());
  auto work = gpu->record([&] { blk.run(*gpu); });
  expect_bitwise_equal(read(*gpu, blk.outputs()), eager, "after record");
  for (int i = 0; i < 2; ++i) {
    poison(*gpu, blk.outputs());
    work->replay();
    expect_bitwise_equal(read(*gpu, blk.outputs()), eager, "replay " + std::to_string(i));
  }
}

INSTANTIATE_TEST_SUITE_P(Attention, CudaGraph, ::testing::Values("naive", "cudnn"));

TEST(CudaRecording, RefusesAllocationAndNewPlansWhileCapturing) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  EXPECT_THROW(gpu->record([&] { gpu->empty(DType::BF16, {16}); }), Error);
  Tensor x = gpu->empty(DType::BF16, {1, 5, 24}), w = gpu->empty(DType::BF16, {40, 24}),
         y = gpu->empty(DType::BF16, {1, 5, 40});
  gpu->fill_normal(x, 1, 0.0f, 1.0f);
  gpu->fill_normal(w, 2, 0.0f, 1.0f);
  try {
    gpu->record([&] { gpu->linear(x, w, Tensor(), y, Activation::None); });
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("record"), std::string::npos) << e.what();
  }
  // The backend stays usable.
  gpu->linear(x, w, Tensor(), y, Activation::None);
  auto work = gpu->record([&] { gpu->linear(x, w, Tensor(), y, Activation::None); });
  work->replay();
  gpu->synchronize();
}

TEST(CudaProfiling, TimesEveryOpByName) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  Block blk(*gpu);
  blk.run(*gpu);
  EXPECT_TRUE(gpu->profile_ms().empty());
  gpu->set_profiling(true);
  blk.run(*gpu);
  blk.run(*gpu);
  const auto ms = gpu->profile_ms();
  // GEMMs are keyed by shape ("linear MxNxK"), every other op by its name.
  for (const std::string op : {"linear", "attention", "layer_norm_modulate", "qk_norm_rope", "gated_residual", "silu",
                               "add", "timestep_embedding"}) {
    double total = 0;
    for (const auto& [key, v] : ms)
      if (key == op || key.rfind(op + " ", 0) == 0) total += v;
    EXPECT_GT(total, 0.0) << op;
  }
  gpu->set_profiling(false);
  blk.run(*gpu);
  EXPECT_EQ(gpu->profile_ms(), ms);
}

TEST(CudaMemory, CountsLiveAndPeakBytes) {
  FLUXSWAP_CUDA_BACKEND(gpu);
  const size_t base = gpu->memory_in_use();
  {
    Tensor t = gpu->empty(DType::BF16, {32 << 20});
    EXPECT_GE(gpu->memory_in_use(), base + (size_t(64) << 20));
    EXPECT_GE(gpu->peak_memory(), gpu->memory_in_use());
  }
  EXPECT_EQ(gpu->memory_in_use(), base);
  EXPECT_GE(gpu->peak_memory(), base + (size_t(64) << 20));
}

}  // namespace
}  // namespace fluxswap::test
