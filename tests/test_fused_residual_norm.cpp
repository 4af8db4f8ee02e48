// The semantics of the fused ops on the CPU reference backend:
//  - gated_residual_layer_norm_modulate(_fp8) is gated_residual followed by layer_norm_modulate(_fp8), bit for bit:
//    x updated in place, normed (or the e4m3 codes and scales) from the updated x. Views as the transformer has
//    them: x rows inside a taller [B, S, C] stream buffer, normed rows with R spare columns, gate, shift and scale
//    chunks of a [B, 6C] modulation vector.
//  - linear_fp8_batch is linear_fp8 per item, bit for bit: outputs as column chunks of a [B, 6n] vector, with and
//    without bias, odd widths; an empty list does nothing.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "backend/backend.h"
#include "test_support.h"

namespace fluxswap {
namespace {

using test::fill_normal;
using test::same_bytes;

Tensor copy_of(const Tensor& t) {
  Tensor c = Tensor::empty(t.dtype(), t.shape());
  std::memcpy(c.data(), t.data(), t.nbytes());
  return c;
}

struct FusedCase {
  int64_t B, N, C;
};

class FusedResidualNorm : public ::testing::TestWithParam<FusedCase> {
 protected:
  // Two identical copies of the stream buffer (one per path), the branch and the modulation.
  void SetUp() override {
    const auto [B, N, C] = GetParam();
    std::mt19937 rng(uint32_t(B * 1000 + N * 7 + C));
    stream_a_ = Tensor::empty(DType::F32, {B, N + 3, C});
    fill_normal(stream_a_, rng, 1.0f, 0.2f);
    stream_b_ = copy_of(stream_a_);
    branch_ = Tensor::empty(DType::F32, {B, N, C});
    fill_normal(branch_, rng, 1.5f);
    mod_ = Tensor::empty(DType::F32, {B, 6 * C});
    fill_normal(mod_, rng, 0.5f);
  }
  Tensor x(const Tensor& stream) const { return stream.narrow(1, 2, GetParam().N); }
  Tensor chunk(int i) const { return mod_.narrow(1, i * GetParam().C, GetParam().C); }
  Tensor stream_a_, stream_b_, branch_, mod_;
};

TEST_P(FusedResidualNorm, Bf16FormIsTheTwoOps) {
  const auto [B, N, C] = GetParam();
  auto be = make_cpu_backend();
  const int64_t R = 5;
  Tensor normed_a = Tensor::zeros(DType::F32, {B, N, C + R}), normed_b = Tensor::zeros(DType::F32, {B, N, C + R});
  be->gated_residual_layer_norm_modulate(x(stream_a_), chunk(2), branch_, chunk(3), chunk(4),
                                         normed_a.narrow(2, 0, C));
  be->gated_residual(x(stream_b_), chunk(2), branch_);
  be->layer_norm_modulate(x(stream_b_), chunk(3), chunk(4), normed_b.narrow(2, 0, C));
  EXPECT_TRUE(same_bytes(stream_a_, stream_b_)) << "the updated residual stream";
  EXPECT_TRUE(same_bytes(normed_a, normed_b)) << "the normed rows (and their spare columns untouched)";
}

TEST_P(FusedResidualNorm, Fp8FormIsTheTwoOps) {
  const auto [B, N, C] = GetParam();
  auto be = make_cpu_backend();
  const int64_t ldq = (C + 15) / 16 * 16;
  Tensor q_a = Tensor::zeros(DType::F8_E4M3, {B, N, ldq}), q_b = Tensor::zeros(DType::F8_E4M3, {B, N, ldq});
  Tensor s_a = Tensor::empty(DType::F32, {B * N}), s_b = Tensor::empty(DType::F32, {B * N});
  be->gated_residual_layer_norm_modulate_fp8(x(stream_a_), chunk(2), branch_, chunk(3), chunk(4),
                                             q_a.narrow(2, 0, C), s_a);
  be->gated_residual(x(stream_b_), chunk(2), branch_);
  be->layer_norm_modulate_fp8(x(stream_b_), chunk(3), chunk(4), q_b.narrow(2, 0, C), s_b);
  EXPECT_TRUE(same_bytes(stream_a_, stream_b_)) << "the updated residual stream";
  EXPECT_TRUE(same_bytes(q_a, q_b)) << "e4m3 codes";
  EXPECT_TRUE(same_bytes(s_a, s_b)) << "row scales";
}

INSTANTIATE_TEST_SUITE_P(Shapes, FusedResidualNorm,
                         ::testing::Values(FusedCase{1, 37, 64}, FusedCase{2, 37, 64}, FusedCase{2, 5, 3072},
                                           FusedCase{1, 3, 40}));

TEST(FusedResidualNormErrors, MismatchedShapesAreRefused) {
  auto be = make_cpu_backend();
  Tensor x = Tensor::zeros(DType::F32, {1, 3, 32}), y = Tensor::zeros(DType::F32, {1, 4, 32});
  Tensor mod = Tensor::zeros(DType::F32, {1, 96}), normed = Tensor::zeros(DType::F32, {1, 3, 32});
  EXPECT_THROW(be->gated_residual_layer_norm_modulate(x, mod.narrow(1, 0, 32), y, mod.narrow(1, 32, 32),
                                                      mod.narrow(1, 64, 32), normed),
               Error);
}

TEST(LinearFp8Batch, IsLinearFp8PerItem) {
  auto be = make_cpu_backend();
  std::mt19937 rng(17);
  for (const int64_t B : {int64_t(1), int64_t(2)}) {
    const int64_t K = 96;
    Tensor x = Tensor::empty(DType::F32, {B, K});
    fill_normal(x, rng, 2.0f);
    const int64_t nouts[] = {48, 33, 1, 160};
    // The outputs: column chunks of one [B, sum] buffer per path (row stride wider than any item).
    int64_t total = 0;
    for (int64_t n : nouts) total += n;
    Tensor y_batch = Tensor::zeros(DType::F32, {B, total}), y_each = Tensor::zeros(DType::F32, {B, total});
    std::vector<Backend::Fp8LinearItem> items;
    std::vector<Tensor> keep;
    int64_t col = 0;
    for (size_t i = 0; i < std::size(nouts); ++i) {
      const int64_t n = nouts[i];
      Tensor w = Tensor::empty(DType::F32, {n, K});
      fill_normal(w, rng, 0.05f);
      Tensor wq = Tensor::empty(DType::F8_E4M3, {n, K}), ws = Tensor::empty(DType::F32, {n});
      be->quantize_fp8_rows(w, wq, ws);
      Tensor bias;
      if (i % 2 == 0) {
        bias = Tensor::empty(DType::F32, {n});
        fill_normal(bias, rng, 0.3f);
      }
      items.push_back({wq, ws, bias, y_batch.narrow(1, col, n)});
      be->linear_fp8(x, wq, ws, bias, y_each.narrow(1, col, n), Activation::None);
      col += n;
    }
    be->linear_fp8_batch(x, items);
    EXPECT_TRUE(same_bytes(y_batch, y_each)) << "B " << B;
  }
  EXPECT_NO_THROW(be->linear_fp8_batch(Tensor::zeros(DType::F32, {1, 16}), {}));
}

}  // namespace
}  // namespace fluxswap
