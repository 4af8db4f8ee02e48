// The FP8 linear's split form on the CPU reference backend: layer_norm_modulate_fp8 must be layer_norm_modulate
// followed by quantize_fp8_rows, and linear_fp8_quantized of those codes must be linear_fp8, both bit for bit (the
// transformer swaps one pair for the other). Strided views on every side, odd row counts, a zero row and a NaN row.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "backend/backend.h"
#include "quant/fp8.h"
#include "test_support.h"

namespace fluxswap {
namespace {

using test::fill_normal;
using test::same_bytes;

struct NormCase {
  int64_t B, N, C;
};

class Fp8FusedNorm : public ::testing::TestWithParam<NormCase> {};

TEST_P(Fp8FusedNorm, IsLayerNormModulateThenTheRowQuantiser) {
  const auto [B, N, C] = GetParam();
  auto be = make_cpu_backend();
  std::mt19937 rng(uint32_t(N * 7 + C));
  // x: a column slice of a wider buffer; shift and scale: chunks of a [B, 6C] modulation vector.
  Tensor x_full = Tensor::empty(DType::F32, {B, N, C + 24});
  fill_normal(x_full, rng, 2.0f, 0.3f);
  const Tensor x = x_full.narrow(2, 8, C);
  Tensor mod = Tensor::empty(DType::F32, {B, 6 * C});
  fill_normal(mod, rng, 0.5f);
  const Tensor shift = mod.narrow(1, 0, C), scale = mod.narrow(1, C, C);
  // Row 1 of the last batch constant with a zero shift: y is all zero there (the floor scale); row 2 holds a NaN.
  for (int64_t c = 0; c < C; ++c) {
    x.ptr<float>()[(B - 1) * x.stride(0) + x.stride(1) + c] = 1.5f;
    shift.ptr<float>()[(B - 1) * shift.stride(0) + c] = 0.0f;
  }
  x.ptr<float>()[2 * x.stride(1) + 3] = std::numeric_limits<float>::quiet_NaN();

  // q: rows padded to a multiple of 16 past C, poisoned, so writes past a row show.
  const int64_t ldq = (C + 16 + 15) / 16 * 16;
  Tensor q_full = Tensor::empty(DType::F8_E4M3, {B, N, ldq});
  std::memset(q_full.data(), 0xAB, q_full.nbytes());
  const Tensor q = q_full.narrow(2, 0, C);
  Tensor q_scale = Tensor::empty(DType::F32, {B * N});
  be->layer_norm_modulate_fp8(x, shift, scale, q, q_scale);

  Tensor y = Tensor::empty(DType::F32, {B, N, C});
  be->layer_norm_modulate(x, shift, scale, y);
  Tensor want_q = Tensor::empty(DType::F8_E4M3, {B * N, C}), want_s = Tensor::empty(DType::F32, {B * N});
  be->quantize_fp8_rows(y.view({B * N, C}), want_q, want_s);

  EXPECT_TRUE(same_bytes(q_scale, want_s)) << "row scales";
  int64_t bad = 0;
  for (int64_t r = 0; r < B * N; ++r)
    for (int64_t c = 0; c < ldq; ++c) {
      const uint8_t got = q_full.ptr<uint8_t>()[r * ldq + c];
      bad += c < C ? got != want_q.ptr<uint8_t>()[r * C + c] : got != 0xAB;
    }
  EXPECT_EQ(bad, 0) << "e4m3 codes differing from layer_norm_modulate + quantize_fp8_rows (or padding written)";
  const int64_t zero_row = (B - 1) * N + 1;
  EXPECT_EQ(q_scale.ptr<float>()[zero_row], quant::e4m3_row_scale(0.0f)) << "all-zero row: the floor scale";
  EXPECT_EQ(q_scale.ptr<float>()[2], quant::e4m3_row_scale(0.0f)) << "NaN row: no finite value sets the scale";
  EXPECT_EQ(q_full.ptr<uint8_t>()[2 * ldq + 5], quant::kE4m3NaN);
}

INSTANTIATE_TEST_SUITE_P(Shapes, Fp8FusedNorm,
                         ::testing::Values(NormCase{2, 37, 64}, NormCase{3, 5, 3072}, NormCase{1, 9, 48}));

TEST(Fp8FusedNorm, TwoDimensionalRows) {
  auto be = make_cpu_backend();
  std::mt19937 rng(5);
  Tensor x = Tensor::empty(DType::F32, {7, 32}), mod = Tensor::empty(DType::F32, {1, 64});
  fill_normal(x, rng, 1.0f);
  fill_normal(mod, rng, 0.3f);
  Tensor q = Tensor::empty(DType::F8_E4M3, {7, 32}), s = Tensor::empty(DType::F32, {7});
  be->layer_norm_modulate_fp8(x, mod.narrow(1, 0, 32), mod.narrow(1, 32, 32), q, s);
  Tensor y = Tensor::empty(DType::F32, {7, 32});
  be->layer_norm_modulate(x, mod.narrow(1, 0, 32), mod.narrow(1, 32, 32), y);
  Tensor want_q = Tensor::empty(DType::F8_E4M3, {7, 32}), want_s = Tensor::empty(DType::F32, {7});
  be->quantize_fp8_rows(y, want_q, want_s);
  EXPECT_TRUE(same_bytes(q, want_q));
  EXPECT_TRUE(same_bytes(s, want_s));
}

TEST(Fp8FusedNorm, RefusesOutputsAnFp8GemmCannotRead) {
  auto be = make_cpu_backend();
  Tensor x = Tensor::zeros(DType::F32, {1, 3, 40}), mod = Tensor::zeros(DType::F32, {1, 80});
  const Tensor sh = mod.narrow(1, 0, 40), sc = mod.narrow(1, 40, 40);
  Tensor s = Tensor::empty(DType::F32, {3});
  Tensor q40 = Tensor::empty(DType::F8_E4M3, {1, 3, 40});  // row stride 40: not a multiple of 16
  EXPECT_NE(test::error_of([&] { be->layer_norm_modulate_fp8(x, sh, sc, q40, s); }).find("multiples of 16"),
            std::string::npos);
  Tensor q48 = Tensor::empty(DType::F8_E4M3, {1, 3, 48});
  EXPECT_NE(test::error_of([&] { be->layer_norm_modulate_fp8(x, sh, sc, q48, s); }).find("does not match"),
            std::string::npos);
  Tensor s2 = Tensor::empty(DType::F32, {2});
  EXPECT_NE(test::error_of([&] { be->layer_norm_modulate_fp8(x, sh, sc, q48.narrow(2, 0, 40), s2); })
                .find("output scales"),
            std::string::npos);
}

struct LinearCase {
  int64_t B, N, K, nout;
  bool bias;
  Activation act;
};

class Fp8QuantizedLinear : public ::testing::TestWithParam<LinearCase> {};

// linear_fp8_quantized of quantize_fp8_rows(x) is linear_fp8(x), and layer_norm_modulate_fp8 then
// linear_fp8_quantized is layer_norm_modulate then linear_fp8: the transformer's substitution.
TEST_P(Fp8QuantizedLinear, MatchesLinearFp8) {
  const auto [B, N, K, nout, with_bias, act] = GetParam();
  auto be = make_cpu_backend();
  std::mt19937 rng(uint32_t(N + K + nout));
  Tensor x = Tensor::empty(DType::F32, {B, N, K}), w = Tensor::empty(DType::F32, {nout, K});
  fill_normal(x, rng, 1.5f);
  fill_normal(w, rng, 0.05f);
  Tensor bias;
  if (with_bias) {
    bias = Tensor::empty(DType::F32, {nout});
    fill_normal(bias, rng, 0.2f);
  }
  Tensor wq = Tensor::empty(DType::F8_E4M3, {nout, K}), ws = Tensor::empty(DType::F32, {nout});
  be->quantize_fp8_rows(w, wq, ws);

  // The output as a column slice of a wider buffer.
  Tensor y_full = Tensor::empty(DType::F32, {B, N, nout + 5}), y2_full = Tensor::empty(DType::F32, {B, N, nout + 5});
  const Tensor y = y_full.narrow(2, 0, nout), y2 = y2_full.narrow(2, 0, nout);
  be->linear_fp8(x, wq, ws, bias, y, act);
  Tensor xq = Tensor::empty(DType::F8_E4M3, {B * N, K}), xs = Tensor::empty(DType::F32, {B * N});
  be->quantize_fp8_rows(x.view({B * N, K}), xq, xs);
  be->linear_fp8_quantized(xq.view({B, N, K}), xs, wq, ws, bias, y2, act);
  EXPECT_TRUE(same_bytes(y.to_f32(), y2.to_f32())) << "linear_fp8_quantized vs linear_fp8";

  Tensor mod = Tensor::empty(DType::F32, {B, 2 * K});
  fill_normal(mod, rng, 0.4f);
  const Tensor sh = mod.narrow(1, 0, K), sc = mod.narrow(1, K, K);
  Tensor normed = Tensor::empty(DType::F32, {B, N, K});
  be->layer_norm_modulate(x, sh, sc, normed);
  be->linear_fp8(normed, wq, ws, bias, y, act);
  const int64_t ldq = (K + 15) / 16 * 16 + 16;
  Tensor q_full = Tensor::empty(DType::F8_E4M3, {B, N, ldq});
  be->layer_norm_modulate_fp8(x, sh, sc, q_full.narrow(2, 0, K), xs);
  be->linear_fp8_quantized(q_full.narrow(2, 0, K), xs, wq, ws, bias, y2, act);
  EXPECT_TRUE(same_bytes(y.to_f32(), y2.to_f32())) << "the fused pair vs layer_norm_modulate + linear_fp8";
}

INSTANTIATE_TEST_SUITE_P(Shapes, Fp8QuantizedLinear,
                         ::testing::Values(LinearCase{2, 37, 64, 48, true, Activation::GeluTanh},
                                           LinearCase{1, 5, 3072, 40, false, Activation::None},
                                           LinearCase{3, 11, 48, 24, true, Activation::None},
                                           LinearCase{2, 3, 32, 16, true, Activation::Silu}));

TEST(Fp8QuantizedLinear, TwoDimensionalRowsAndErrors) {
  auto be = make_cpu_backend();
  std::mt19937 rng(9);
  Tensor x = Tensor::empty(DType::F32, {3, 32}), w = Tensor::empty(DType::F32, {16, 32});
  fill_normal(x, rng, 1.0f);
  fill_normal(w, rng, 0.1f);
  Tensor wq = Tensor::empty(DType::F8_E4M3, {16, 32}), ws = Tensor::empty(DType::F32, {16});
  be->quantize_fp8_rows(w, wq, ws);
  Tensor xq = Tensor::empty(DType::F8_E4M3, {3, 32}), xs = Tensor::empty(DType::F32, {3});
  be->quantize_fp8_rows(x, xq, xs);
  Tensor y = Tensor::empty(DType::F32, {3, 16}), y2 = Tensor::empty(DType::F32, {3, 16});
  be->linear_fp8(x, wq, ws, Tensor(), y, Activation::None);
  be->linear_fp8_quantized(xq, xs, wq, ws, Tensor(), y2, Activation::None);
  EXPECT_TRUE(same_bytes(y, y2));
  Tensor xs_short = Tensor::empty(DType::F32, {2});
  EXPECT_NE(test::error_of([&] { be->linear_fp8_quantized(xq, xs_short, wq, ws, Tensor(), y2, Activation::None); })
                .find("input scales"),
            std::string::npos);
  EXPECT_NE(test::error_of([&] { be->linear_fp8_quantized(x, xs, wq, ws, Tensor(), y2, Activation::None); })
                .find("F8_E4M3"),
            std::string::npos);
}

}  // namespace
}  // namespace fluxswap
