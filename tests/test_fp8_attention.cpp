// FP8 attention on the CPU reference backend: the op against exact float32 attention on random inputs, the e4m3
// scales kept inside the format, and the transformer with FP8 attention (alone and with FP8 linears) against the
// fixtures' reference outputs.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/compare.h"
#include "fixture_transformer.h"
#include "quant/fp8.h"
#include "test_support.h"

namespace fluxswap {
namespace {

Tensor random_tensor(Shape shape, std::mt19937& rng, float std) {
  std::normal_distribution<float> n(0.0f, std);
  Tensor t = Tensor::empty(DType::F32, shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = n(rng);
  return t;
}

struct AttentionCase {
  int64_t B, H, S, D;
};

class Fp8AttentionOp : public ::testing::TestWithParam<AttentionCase> {};

// qkv rows through qk_norm_rope_fp8 + attention_fp8 against qk_norm_rope + exact attention. e4m3 rounds each of q,
// k, v, the probabilities and the output to 3 mantissa bits (relative step 2^-3 at most, 2^-4 on average): measured
// cosine 0.9988-0.9991 and max error <= 6.6% of the output's largest magnitude on these shapes.
TEST_P(Fp8AttentionOp, CloseToExactAttention) {
  const auto [B, H, S, D] = GetParam();
  auto be = make_cpu_backend();
  std::mt19937 rng(uint32_t(B * 1000 + S * 10 + D));
  const Tensor qkv = random_tensor({B, S, 3 * H * D}, rng, 1.5f);
  const Tensor q_norm = random_tensor({D}, rng, 0.5f), k_norm = random_tensor({D}, rng, 0.5f);
  Tensor txt_ids = Tensor::zeros(DType::F32, {S, 3});
  for (int64_t s = 0; s < S; ++s) {
    txt_ids.ptr<float>()[s * 3 + 1] = float(s % 7);
    txt_ids.ptr<float>()[s * 3 + 2] = float(s / 7);
  }
  FluxConfig config;
  config.attention_head_dim = D;
  config.axes_dims_rope = {D / 2, D / 4, D / 4};
  const Tensor rope = flux_rope_table(config, txt_ids, Tensor::zeros(DType::F32, {0, 3}));

  const Shape heads{B, H, S, D};
  Tensor q = Tensor::empty(DType::F32, heads), k = Tensor::empty(DType::F32, heads), v = Tensor::empty(DType::F32, heads);
  Tensor exact = Tensor::empty(DType::F32, {B, S, H * D});
  be->qk_norm_rope(qkv, q_norm, k_norm, rope, 0, q, k, v);
  be->attention(q, k, v, exact);

  float wmax = 0.0f;
  for (const Tensor* w : {&q_norm, &k_norm})
    for (int64_t i = 0; i < D; ++i) wmax = std::max(wmax, std::fabs(w->ptr<float>()[i]));
  const float qk_scale = 448.0f / (std::sqrt(float(D)) * wmax);
  Tensor q8 = Tensor::empty(DType::F8_E4M3, heads), k8 = Tensor::empty(DType::F8_E4M3, heads);
  Tensor v2 = Tensor::empty(DType::F32, heads), amax = Tensor::zeros(DType::F32, {1});
  // Two calls over halves of the sequence, as the double blocks make them (text rows, then image rows).
  const int64_t half = S / 2;
  be->qk_norm_rope_fp8(qkv.narrow(1, 0, half), q_norm, k_norm, rope, 0, qk_scale, q8, k8, v2, amax);
  be->qk_norm_rope_fp8(qkv.narrow(1, half, S - half), q_norm, k_norm, rope, half, qk_scale, q8, k8, v2, amax);
  float vmax = 0.0f;
  for (int64_t i = 0; i < v.numel(); ++i) vmax = std::max(vmax, std::fabs(v.ptr<float>()[i]));
  EXPECT_EQ(amax.ptr<float>()[0], vmax) << "v_amax is the max |v| over both calls";
  EXPECT_EQ(max_rel_error(v2, v), 0.0) << "v is passed through unchanged";
  float q8max = 0.0f;
  for (int64_t i = 0; i < q8.numel(); ++i) {
    const uint8_t c = q8.ptr<uint8_t>()[i];
    ASSERT_NE(c & 0x7F, 0x7F) << "NaN code in q8";
    q8max = std::max(q8max, std::fabs(quant::e4m3_to_f32(c)));
  }
  EXPECT_LE(q8max, 448.0f);
  EXPECT_GT(q8max, 448.0f / 16) << "the static scale leaves q far below the format's range";

  Tensor fp8 = Tensor::empty(DType::F32, {B, S, H * D});
  be->attention_fp8(q8, k8, v2, qk_scale, amax, fp8);
  EXPECT_EQ(amax.ptr<float>()[0], 0.0f) << "attention_fp8 leaves v_amax at zero for the next layer";

  // The transformer's way: no v from the RoPE op, attention reading v from the qkv rows. Same values exactly.
  Tensor q8b = Tensor::empty(DType::F8_E4M3, heads), k8b = Tensor::empty(DType::F8_E4M3, heads);
  be->qk_norm_rope_fp8(qkv.narrow(1, 0, half), q_norm, k_norm, rope, 0, qk_scale, q8b, k8b, Tensor(), amax);
  be->qk_norm_rope_fp8(qkv.narrow(1, half, S - half), q_norm, k_norm, rope, half, qk_scale, q8b, k8b, Tensor(), amax);
  EXPECT_EQ(amax.ptr<float>()[0], vmax);
  Tensor from_rows = Tensor::empty(DType::F32, {B, S, H * D});
  be->attention_fp8(q8b, k8b, qkv.narrow(2, 2 * H * D, H * D), qk_scale, amax, from_rows);
  EXPECT_EQ(max_rel_error(from_rows, fp8), 0.0);
  const double cos = cosine_similarity(fp8, exact);
  double err = 0, mag = 0;
  for (int64_t i = 0; i < exact.numel(); ++i) {
    err = std::max(err, double(std::fabs(fp8.ptr<float>()[i] - exact.ptr<float>()[i])));
    mag = std::max(mag, double(std::fabs(exact.ptr<float>()[i])));
  }
  std::printf("B %lld H %lld S %lld D %lld: cosine %.6f, max error %.4f of max |out| %.4f\n", (long long)B,
              (long long)H, (long long)S, (long long)D, cos, err, mag);
  EXPECT_GE(cos, 0.995);
  EXPECT_LE(err, 0.1 * mag);
}

INSTANTIATE_TEST_SUITE_P(Shapes, Fp8AttentionOp,
                         ::testing::Values(AttentionCase{1, 2, 64, 16}, AttentionCase{2, 3, 77, 32},
                                           AttentionCase{1, 2, 129, 128}));

// The e4m3 form keeps the values attention_fp8 writes: its codes times the one row scale are exactly them.
TEST(Fp8AttentionOp, RowsFormHoldsTheSameValues) {
  const int64_t B = 2, H = 2, S = 40, D = 16;
  auto be = make_cpu_backend();
  std::mt19937 rng(5);
  Tensor q8 = Tensor::empty(DType::F8_E4M3, {B, H, S, D}), k8 = Tensor::empty(DType::F8_E4M3, {B, H, S, D});
  for (Tensor* t : {&q8, &k8}) {
    const Tensor f = random_tensor({B, H, S, D}, rng, 60.0f);
    for (int64_t i = 0; i < f.numel(); ++i) t->ptr<uint8_t>()[i] = quant::e4m3_from_f32(f.ptr<float>()[i]);
  }
  const Tensor v = random_tensor({B, H, S, D}, rng, 2.0f);
  float vmax = 0;
  for (int64_t i = 0; i < v.numel(); ++i) vmax = std::max(vmax, std::fabs(v.ptr<float>()[i]));
  Tensor amax = Tensor::zeros(DType::F32, {1});
  Tensor out = Tensor::empty(DType::F32, {B, S, H * D}), out8 = Tensor::empty(DType::F8_E4M3, {B, S, H * D});
  Tensor scale = Tensor::empty(DType::F32, {B * S});
  amax.ptr<float>()[0] = vmax;
  be->attention_fp8(q8, k8, v, 8.0f, amax, out);
  amax.ptr<float>()[0] = vmax;
  be->attention_fp8_rows(q8, k8, v, 8.0f, amax, out8, scale);
  EXPECT_EQ(amax.ptr<float>()[0], 0.0f) << "left at zero for the next layer";
  int64_t mismatches = 0;
  for (int64_t r = 0; r < B * S; ++r) {
    EXPECT_EQ(scale.ptr<float>()[r], scale.ptr<float>()[0]) << "one scale for every row";
    for (int64_t c = 0; c < H * D; ++c)
      mismatches += quant::e4m3_to_f32(out8.ptr<uint8_t>()[r * H * D + c]) * scale.ptr<float>()[r] !=
                    out.ptr<float>()[r * H * D + c];
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_GT(max_rel_error(Tensor::zeros(DType::F32, out.shape()), out), 0.0) << "an all-zero output tests nothing";
}

// quantize_fp8_rows_joined is the row quantiser of [a8 * a_scale | b]: codes and scales bit for bit, with b a
// strided view and several batches.
TEST(Fp8JoinedRows, EqualTheRowQuantiserOfTheJoinedValues) {
  auto be = make_cpu_backend();
  std::mt19937 rng(9);
  const int64_t Bn = 2, N = 5, rows = Bn * N, ca = 24, cb = 40;
  Tensor a8 = Tensor::empty(DType::F8_E4M3, {rows, ca}), a_scale = random_tensor({rows}, rng, 1.0f);
  const Tensor af = random_tensor({rows, ca}, rng, 100.0f);
  for (int64_t i = 0; i < af.numel(); ++i) a8.ptr<uint8_t>()[i] = quant::e4m3_from_f32(af.ptr<float>()[i]);
  for (int64_t r = 0; r < rows; ++r) a_scale.ptr<float>()[r] = std::fabs(a_scale.ptr<float>()[r]) + 0.01f;
  a_scale.ptr<float>()[3] = 1e-6f;  // a row where b dominates
  const Tensor wide = random_tensor({Bn, N, cb + 8}, rng, 3.0f);
  const Tensor b = wide.narrow(2, 4, cb);
  Tensor joined = Tensor::empty(DType::F32, {rows, ca + cb});
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < ca; ++c)
      joined.ptr<float>()[r * (ca + cb) + c] = quant::e4m3_to_f32(a8.ptr<uint8_t>()[r * ca + c]) * a_scale.ptr<float>()[r];
    for (int64_t c = 0; c < cb; ++c) joined.ptr<float>()[r * (ca + cb) + ca + c] = b.ptr<float>()[(r / N) * b.stride(0) + (r % N) * b.stride(1) + c];
  }
  Tensor q = Tensor::empty(DType::F8_E4M3, {rows, ca + cb}), qs = Tensor::empty(DType::F32, {rows});
  Tensor ref = Tensor::empty(DType::F8_E4M3, {rows, ca + cb}), refs = Tensor::empty(DType::F32, {rows});
  be->quantize_fp8_rows_joined(a8, a_scale, b, q, qs);
  be->quantize_fp8_rows(joined, ref, refs);
  EXPECT_EQ(std::memcmp(q.data(), ref.data(), size_t(q.nbytes())), 0);
  EXPECT_EQ(std::memcmp(qs.data(), refs.data(), size_t(qs.nbytes())), 0);
  using ::testing::HasSubstr;
  EXPECT_THAT(test::error_of([&] { be->quantize_fp8_rows_joined(a8, a_scale, b.narrow(1, 0, 4), q, qs); }),
              HasSubstr("rows"));
}

TEST(Fp8AttentionOp, BadArgumentsNameTheProblem) {
  auto be = make_cpu_backend();
  Tensor q8 = Tensor::empty(DType::F8_E4M3, {1, 1, 8, 16}), v = Tensor::zeros(DType::F32, {1, 1, 8, 16});
  Tensor out = Tensor::empty(DType::F32, {1, 8, 16}), amax = Tensor::zeros(DType::F32, {1});
  using ::testing::HasSubstr;
  EXPECT_THAT(test::error_of([&] { be->attention_fp8(q8, q8, v, 0.0f, amax, out); }), HasSubstr("qk_scale"));
  EXPECT_THAT(test::error_of([&] { be->attention_fp8(q8, q8, v, 1.0f, amax, Tensor::empty(DType::F32, {1, 8, 32})); }),
              HasSubstr("output"));
  EXPECT_THAT(test::error_of([&] { be->attention_fp8(v, q8, v, 1.0f, amax, out); }), HasSubstr("q8"));
}

// The fixtures' transformers with FP8 attention: e4m3 attention adds errors of the same kind as FP8 linears.
// Measured cosine 0.99991-0.99998 alone (max rel error <= 0.022), 0.99943-0.99985 with FP8 linears (<= 0.055).
class Fp8AttentionTransformer : public ::testing::TestWithParam<std::string> {};

TEST_P(Fp8AttentionTransformer, CloseToTheReference) {
  FLUXSWAP_REQUIRE_FIXTURES();
  test::FixtureTransformer m(GetParam());
  const Tensor exact = m.run();
  const Tensor ref = m.goldens->tensor("out.base");
  m.transformer->set_fp8_attention(true);
  const Tensor attn8 = m.run();
  m.transformer->set_fp8(true);
  const Tensor all8 = m.run();
  std::printf("%s: fp8 attention cosine %.6f (max rel %.4f); with fp8 linears %.6f (%.4f)\n", GetParam().c_str(),
              cosine_similarity(attn8, ref), max_rel_error(attn8, ref), cosine_similarity(all8, ref),
              max_rel_error(all8, ref));
  EXPECT_GT(max_rel_error(attn8, exact), 0.0) << "FP8 attention changed nothing: it did not run";
  EXPECT_GE(cosine_similarity(attn8, ref), 0.995);
  EXPECT_LE(max_rel_error(attn8, ref), 0.1);
  EXPECT_GE(cosine_similarity(all8, ref), 0.995);
  EXPECT_LE(max_rel_error(all8, ref), 0.12);
  m.transformer->set_fp8(false);
  m.transformer->set_fp8_attention(false);
  EXPECT_EQ(max_rel_error(m.run(), exact), 0.0) << "off again is the exact path";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Fp8AttentionTransformer, ::testing::Values("tiny", "small", "tiny_schnell"));

}  // namespace
}  // namespace fluxswap
