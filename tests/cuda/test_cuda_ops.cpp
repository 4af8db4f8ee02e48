// Each CUDA op against the float32 CPU reference on the same bf16 input values. Outputs start NaN-poisoned, so an
// element the op fails to write (or writes outside its view) fails the test. Every shape runs in the layouts the
// transformer uses (packed, column slice, padded batch) plus an unaligned one, at token counts 1, 7, 30, 77, 333.
//
// Tolerance: max|gpu - cpu| / max|cpu| <= 1e-2 for bf16 outputs (one bf16 rounding of the output is 4e-3 relative;
// inputs are identical, so the rest is float32 accumulation order and bf16 intermediates).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_test_util.h"

namespace fluxswap::test {
namespace {

constexpr double kTol = 1e-2;
constexpr int64_t kTokenCounts[] = {1, 7, 30, 77, 333};

class CudaOps : public GpuAndCpu {};

TEST_F(CudaOps, FillNormalIsDeterministicAndNormal) {
  Tensor a = gpu_->empty(DType::F32, {1 << 16}), b = gpu_->empty(DType::BF16, {1 << 16});
  gpu_->fill_normal(a, 42, 0.5f, 2.0f);
  gpu_->fill_normal(b, 42, 0.5f, 2.0f);
  Tensor ha = gpu_->to_host_f32(a), hb = gpu_->to_host_f32(b);
  Tensor ref = Tensor::empty(DType::F32, {1 << 16});
  cpu_->fill_normal(ref, 42, 0.5f, 2.0f);
  EXPECT_LE(max_rel_error(ha, ref), 1e-5);  // same counter-based generator; libm ulps apart at most
  EXPECT_LE(max_rel_error(hb, ref), 4e-3);  // bf16 rounding
  double mean = 0, var = 0;
  for (int64_t i = 0; i < ha.numel(); ++i) mean += ha.ptr<float>()[i];
  mean /= double(ha.numel());
  for (int64_t i = 0; i < ha.numel(); ++i) var += std::pow(ha.ptr<float>()[i] - mean, 2);
  var /= double(ha.numel());
  EXPECT_NEAR(mean, 0.5, 0.05);
  EXPECT_NEAR(std::sqrt(var), 2.0, 0.05);
}

TEST_F(CudaOps, CopiesRoundTripAndConvert) {
  Tensor h = Tensor::empty(DType::F32, {3, 5, 7});
  for (int64_t i = 0; i < h.numel(); ++i) h.ptr<float>()[i] = std::sin(float(i)) * 100.0f;
  Tensor f = gpu_->empty(DType::F32, h.shape()), b = gpu_->empty(DType::BF16, h.shape());
  gpu_->copy_from_host(h, f);
  gpu_->copy_from_host(h, b);
  EXPECT_EQ(max_rel_error(gpu_->to_host_f32(f), h), 0.0);
  EXPECT_LE(max_rel_error(gpu_->to_host_f32(b), h), 4e-3);
  // A strided view comes back gathered.
  EXPECT_EQ(max_rel_error(gpu_->to_host_f32(f.narrow(1, 1, 3).narrow(2, 2, 4)), h.narrow(1, 1, 3).narrow(2, 2, 4)),
            0.0);
  Tensor w = gpu_->upload_weight(h);
  EXPECT_EQ(w.dtype(), DType::BF16);
  EXPECT_LE(max_rel_error(gpu_->to_host_f32(w), h), 4e-3);
}

TEST_F(CudaOps, Linear) {
  const int64_t K = 64, Nout = 48;
  // The weight is a row slice of a wider one and the bias a slice of a longer one, as single blocks use them.
  Pair w_full = random_pair(*gpu_, {Nout + 16, K}, 11, 1.0f / std::sqrt(float(K)));
  Pair b_full = random_pair(*gpu_, {Nout + 16}, 12, 0.5f);
  Pair w = w_full.narrow(0, 8, Nout), bias = b_full.narrow(0, 8, Nout);
  uint64_t seed = 100;
  for (int64_t B : {1, 2})
    for (int64_t N : kTokenCounts)
      for (Layout layout : kLayouts)
        for (Activation act : {Activation::None, Activation::GeluTanh, Activation::Silu})
          for (bool with_bias : {true, false}) {
            RowsCase x = make_rows(*gpu_, B, N, K, layout, ++seed);
            RowsCase y = make_rows(*gpu_, B, N, Nout, layout, 0);
            const Tensor bg = with_bias ? bias.gpu : Tensor(), bc = with_bias ? bias.cpu : Tensor();
            gpu_->linear(x.view.gpu, w.gpu, bg, y.view.gpu, act);
            cpu_->linear(x.view.cpu, w.cpu, bc, y.view.cpu, act);
            EXPECT_LE(poisoned_output_error(*gpu_, y), kTol)
                << "B " << B << " N " << N << " " << layout_name(layout) << " act " << int(act) << " bias "
                << with_bias;
          }
}

TEST_F(CudaOps, LinearOnVectorsAndWideOutputs) {
  // The conditioning path: [B, 256] -> [B, 3072] with SiLU, and [B, 3072] -> a [B, 6 * 3072] modulation.
  Pair x = random_pair(*gpu_, {2, 256}, 21);
  Pair w1 = random_pair(*gpu_, {3072, 256}, 22, 1.0f / 16.0f), b1 = random_pair(*gpu_, {3072}, 23, 0.1f);
  Pair w2 = random_pair(*gpu_, {6 * 3072, 3072}, 24, 1.0f / std::sqrt(3072.0f));
  Pair b2 = random_pair(*gpu_, {6 * 3072}, 25);
  RowsCase h{nan_pair(*gpu_, {2, 3072}), {}};
  h.view = h.full;
  RowsCase mod{nan_pair(*gpu_, {2, 6 * 3072}), {}};
  mod.view = mod.full;
  gpu_->linear(x.gpu, w1.gpu, b1.gpu, h.view.gpu, Activation::Silu);
  cpu_->linear(x.cpu, w1.cpu, b1.cpu, h.view.cpu, Activation::Silu);
  EXPECT_LE(poisoned_output_error(*gpu_, h), kTol);
  // Feed each side its own result, so the second product sees identical bf16 inputs.
  Pair hin{h.view.gpu, gpu_->to_host_f32(h.view.gpu)};
  gpu_->linear(hin.gpu, w2.gpu, b2.gpu, mod.view.gpu, Activation::None);
  cpu_->linear(hin.cpu, w2.cpu, b2.cpu, mod.view.cpu, Activation::None);
  EXPECT_LE(poisoned_output_error(*gpu_, mod), kTol);
}

// The GELU epilogue must be the tanh approximation. Where the two forms differ most (pre-activations around -3,
// where GELU is tiny) they are ~10% apart, far beyond bf16 rounding: compare element by element there.
TEST_F(CudaOps, GeluEpilogueIsTanhApproximation) {
  const int64_t K = 64, Nout = 256, N = 512;
  Pair x = random_pair(*gpu_, {1, N, K}, 31);
  Pair w = random_pair(*gpu_, {Nout, K}, 32, 0.5f / std::sqrt(float(K)));
  Pair bias = random_pair(*gpu_, {Nout}, 33, 0.5f, -3.0f);
  Tensor y = gpu_->empty(DType::BF16, {1, N, Nout});
  gpu_->linear(x.gpu, w.gpu, bias.gpu, y, Activation::GeluTanh);
  Tensor got = gpu_->to_host_f32(y), pre = Tensor::empty(DType::F32, {1, N, Nout});
  cpu_->linear(x.cpu, w.cpu, bias.cpu, pre, Activation::None);
  double err_tanh = 0, err_erf = 0;
  int64_t n = 0;
  for (int64_t i = 0; i < pre.numel(); ++i) {
    const double v = pre.ptr<float>()[i];
    if (v > -2.5 || v < -3.5) continue;
    const double tanh_ref = 0.5 * v * (1 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
    const double erf_ref = 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
    err_tanh += std::fabs(got.ptr<float>()[i] - tanh_ref) / std::fabs(tanh_ref);
    err_erf += std::fabs(got.ptr<float>()[i] - erf_ref) / std::fabs(erf_ref);
    ++n;
  }
  ASSERT_GT(n, 1000);
  std::printf("[ gelu     ] epilogue vs tanh GELU: mean rel error %.2e; vs erf GELU: %.2e (%lld elements)\n",
              err_tanh / double(n), err_erf / double(n), (long long)n);
  EXPECT_LT(err_tanh / double(n), 0.02);
  EXPECT_GT(err_erf / double(n), 0.05);
}

TEST_F(CudaOps, SiluAddGatedResidual) {
  uint64_t seed = 1000;
  for (int64_t B : {1, 2})
    for (int64_t N : kTokenCounts)
      for (int64_t C : {96, 3072})
        for (Layout layout : kLayouts) {
          const std::string where = "B " + std::to_string(B) + " N " + std::to_string(N) + " C " + std::to_string(C) +
                                    " " + layout_name(layout);
          RowsCase x = make_rows(*gpu_, B, N, C, layout, ++seed);
          RowsCase y = make_rows(*gpu_, B, N, C, layout, 0);
          gpu_->silu(x.view.gpu, y.view.gpu);
          cpu_->silu(x.view.cpu, y.view.cpu);
          EXPECT_LE(poisoned_output_error(*gpu_, y), kTol) << "silu " << where;

          // In-place ops: start both sides from the same random values and compare the whole buffer, which also
          // shows any write outside the view.
          RowsCase acc = make_rows(*gpu_, B, N, C, layout, ++seed);
          gpu_->add(acc.view.gpu, x.view.gpu);
          cpu_->add(acc.view.cpu, x.view.cpu);
          EXPECT_LE(max_rel_error(gpu_->to_host_f32(acc.full.gpu), acc.full.cpu), kTol) << "add " << where;

          // The gate is one chunk of a [B, 6C] modulation vector.
          Pair gate = random_pair(*gpu_, {B, 6 * C}, ++seed).narrow(1, 2 * C, C);
          RowsCase res = make_rows(*gpu_, B, N, C, layout, ++seed);
          gpu_->gated_residual(res.view.gpu, gate.gpu, x.view.gpu);
          cpu_->gated_residual(res.view.cpu, gate.cpu, x.view.cpu);
          EXPECT_LE(max_rel_error(gpu_->to_host_f32(res.full.gpu), res.full.cpu), kTol) << "gated_residual " << where;
        }
}

TEST_F(CudaOps, LayerNormModulate) {
  uint64_t seed = 2000;
  for (int64_t B : {1, 2})
    for (int64_t N : kTokenCounts)
      for (int64_t C : {96, 3072})
        for (Layout layout : kLayouts) {
          // A large common offset: the statistics must not cancel.
          RowsCase x = make_rows(*gpu_, B, N, C, layout, ++seed, 20.0f);
          Pair mod = random_pair(*gpu_, {B, 6 * C}, ++seed, 0.5f);
          RowsCase y = make_rows(*gpu_, B, N, C, layout, 0);
          gpu_->layer_norm_modulate(x.view.gpu, mod.gpu.narrow(1, 0, C), mod.gpu.narrow(1, C, C), y.view.gpu);
          cpu_->layer_norm_modulate(x.view.cpu, mod.cpu.narrow(1, 0, C), mod.cpu.narrow(1, C, C), y.view.cpu);
          EXPECT_LE(poisoned_output_error(*gpu_, y), kTol)
              << "B " << B << " N " << N << " C " << C << " " << layout_name(layout);
        }
}

TEST_F(CudaOps, TimestepEmbedding) {
  Tensor t = Tensor::empty(DType::F32, {3});
  t.ptr<float>()[0] = 0.0f;
  t.ptr<float>()[1] = 0.371f;
  t.ptr<float>()[2] = 1.0f;
  Pair tp = f32_pair(*gpu_, t);
  RowsCase out{nan_pair(*gpu_, {3, 256}), {}};
  out.view = out.full;
  gpu_->timestep_embedding(tp.gpu, 1000.0f, out.view.gpu);
  cpu_->timestep_embedding(tp.cpu, 1000.0f, out.view.cpu);
  EXPECT_LE(poisoned_output_error(*gpu_, out), kTol);
}

// A [S, D/2, 2] table of (cos, sin) of arbitrary angles.
Tensor rope_table(int64_t S, int64_t D) {
  Tensor r = Tensor::empty(DType::F32, {S, D / 2, 2});
  for (int64_t i = 0; i < S * D / 2; ++i) {
    const double a = 0.37 * double(i % 997) + 0.01 * double(i / 997);
    r.ptr<float>()[2 * i] = float(std::cos(a));
    r.ptr<float>()[2 * i + 1] = float(std::sin(a));
  }
  return r;
}

// Text tokens then image tokens, each read from its slice of a [B, S, 3HD + M] projection buffer (as double blocks
// do), written into q, k, v at their sequence offsets. q, k, v start poisoned and must be fully written.
TEST_F(CudaOps, QkNormRope) {
  const int64_t M = 40;
  uint64_t seed = 3000;
  for (int64_t H : {3, 8})  // 8: the 128-wide kernel's four heads a warp
    for (int64_t D : {16, 128})
      for (int64_t B : {1, 2})
        for (int64_t Ni : kTokenCounts) {
          const int64_t Nt = 7, S = Nt + Ni;
          Pair proj = random_pair(*gpu_, {B, S, 3 * H * D + M}, ++seed);
          Pair qn = random_pair(*gpu_, {D}, ++seed, 0.2f, 1.0f), kn = random_pair(*gpu_, {D}, ++seed, 0.2f, 1.0f);
          Pair rope = f32_pair(*gpu_, rope_table(S, D));
          Pair q = nan_pair(*gpu_, {B, H, S, D}), k = nan_pair(*gpu_, {B, H, S, D}), v = nan_pair(*gpu_, {B, H, S, D});
          for (auto [start, n] : {std::pair{int64_t(0), Nt}, std::pair{Nt, Ni}}) {
            Pair qkv = proj.narrow(1, start, n).narrow(2, 0, 3 * H * D);
            gpu_->qk_norm_rope(qkv.gpu, qn.gpu, kn.gpu, rope.gpu, start, q.gpu, k.gpu, v.gpu);
            cpu_->qk_norm_rope(qkv.cpu, qn.cpu, kn.cpu, rope.cpu, start, q.cpu, k.cpu, v.cpu);
          }
          for (const Pair* p : {&q, &k, &v})
            EXPECT_LE(max_rel_error(gpu_->to_host_f32(p->gpu), p->cpu), kTol)
                << "H " << H << " D " << D << " B " << B << " Ni " << Ni << " tensor "
                << (p == &q ? "q" : p == &k ? "k" : "v");
          // Without v (attention reads it from the qkv rows): the same q and k.
          Pair q2 = nan_pair(*gpu_, {B, H, S, D}), k2 = nan_pair(*gpu_, {B, H, S, D});
          for (auto [start, n] : {std::pair{int64_t(0), Nt}, std::pair{Nt, Ni}})
            gpu_->qk_norm_rope(proj.gpu.narrow(1, start, n).narrow(2, 0, 3 * H * D), qn.gpu, kn.gpu, rope.gpu, start,
                               q2.gpu, k2.gpu, Tensor());
          EXPECT_EQ(max_rel_error(gpu_->to_host_f32(q2.gpu), gpu_->to_host_f32(q.gpu)), 0.0) << "H " << H << " D " << D;
          EXPECT_EQ(max_rel_error(gpu_->to_host_f32(k2.gpu), gpu_->to_host_f32(k.gpu)), 0.0) << "H " << H << " D " << D;
        }
}

// Attention in both implementations. The output is the first columns of a [B, S, H*D + M] buffer (as the
// transformer writes it next to the MLP activations).
void check_attention(Backend& gpu, Backend& cpu, const char* mode, bool odd_head_dims) {
  struct Case {
    int64_t B, H, S, D;
  };
  std::vector<Case> cases;
  for (int64_t S : {1, 7, 30, 77, 333})
    for (int64_t D : {16, 64, 128}) cases.push_back({S == 77 ? 2 : 1, 2, S, D});
  cases.push_back({2, 3, 200, 72});
  if (odd_head_dims) cases.push_back({1, 2, 100, 19});  // cuDNN needs D % 8 == 0
  cases.push_back({1, 2, 4608, 128});
  uint64_t seed = 4000;
  for (const Case& c : cases) {
    const int64_t M = 24;
    Pair q = random_pair(gpu, {c.B, c.H, c.S, c.D}, ++seed), k = random_pair(gpu, {c.B, c.H, c.S, c.D}, ++seed),
         v = random_pair(gpu, {c.B, c.H, c.S, c.D}, ++seed);
    RowsCase out{nan_pair(gpu, {c.B, c.S, c.H * c.D + M}), {}};
    out.view = out.full.narrow(2, 0, c.H * c.D);
    const std::string where = std::string(mode) + " B " + std::to_string(c.B) + " H " + std::to_string(c.H) + " S " +
                              std::to_string(c.S) + " D " + std::to_string(c.D);
    try {
      gpu.attention(q.gpu, k.gpu, v.gpu, out.view.gpu);
    } catch (const Error& e) {
      ADD_FAILURE() << where << ": " << e.what();
      continue;
    }
    cpu.attention(q.cpu, k.cpu, v.cpu, out.view.cpu);
    EXPECT_LE(poisoned_output_error(gpu, out), kTol) << where;
    // v read in place from qkv rows [B, S, 3HD + extra]: rows of whole 16-byte units (the transformer's), and for the
    // built-in kernel also rows that are not (its one-value-at-a-time loads).
    for (int64_t extra : {int64_t(24), int64_t(3)}) {
      if (extra % 8 && !odd_head_dims) continue;
      const int64_t HD = c.H * c.D;
      Pair proj = random_pair(gpu, {c.B, c.S, 3 * HD + extra}, ++seed);
      Pair v_rows = proj.narrow(2, 2 * HD, HD);
      RowsCase out_rows{nan_pair(gpu, {c.B, c.S, HD + M}), {}};
      out_rows.view = out_rows.full.narrow(2, 0, HD);
      try {
        gpu.attention(q.gpu, k.gpu, v_rows.gpu, out_rows.view.gpu);
      } catch (const Error& e) {
        ADD_FAILURE() << where << " v rows + " << extra << ": " << e.what();
        continue;
      }
      cpu.attention(q.cpu, k.cpu, v_rows.cpu, out_rows.view.cpu);
      EXPECT_LE(poisoned_output_error(gpu, out_rows), kTol) << where << " v rows + " << extra;
    }
  }
}

TEST_F(CudaOps, AttentionBuiltinKernel) {
  std::string why;
  auto naive = try_cuda(&why, "naive");
  ASSERT_TRUE(naive) << why;
  check_attention(*naive, *cpu_, "naive", true);
}

TEST_F(CudaOps, AttentionCudnn) {
  std::string why;
  auto cudnn = try_cuda(&why, "cudnn");
  ASSERT_TRUE(cudnn) << why;
  check_attention(*cudnn, *cpu_, "cudnn", false);
}

// The default mode uses cuDNN where it can and the built-in kernel where cuDNN refuses the shape (D % 8 != 0).
TEST_F(CudaOps, AttentionDefaultModeFallsBack) {
  for (int64_t D : {19, 128}) {
    Pair q = random_pair(*gpu_, {1, 2, 50, D}, 71), k = random_pair(*gpu_, {1, 2, 50, D}, 72),
         v = random_pair(*gpu_, {1, 2, 50, D}, 73);
    RowsCase out{nan_pair(*gpu_, {1, 50, 2 * D}), {}};
    out.view = out.full;
    gpu_->attention(q.gpu, k.gpu, v.gpu, out.view.gpu);
    cpu_->attention(q.cpu, k.cpu, v.cpu, out.view.cpu);
    EXPECT_LE(poisoned_output_error(*gpu_, out), kTol) << "D " << D;
  }
}

TEST_F(CudaOps, ErrorsNameTheOp) {
  Tensor x = gpu_->empty(DType::BF16, {1, 4, 8}), w = gpu_->empty(DType::BF16, {8, 9});
  try {
    gpu_->linear(x, w, Tensor(), x, Activation::None);
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("linear"), std::string::npos) << e.what();
  }
  Tensor host = Tensor::empty(DType::BF16, {1, 4, 8});
  EXPECT_THROW(gpu_->silu(host, x), Error);
}

}  // namespace
}  // namespace fluxswap::test
