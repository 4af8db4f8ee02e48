// Attention reading v in place from the qkv rows (the transformer's bf16 path) on the CPU reference: qk_norm_rope
// without v writes the same q and k and nothing else, and attention over v rows equals attention over v's heads,
// bit for bit, on several shapes with the qkv rows inside a wider buffer.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "backend/backend.h"
#include "core/compare.h"
#include "test_support.h"

namespace fluxswap {
namespace {

Tensor random_tensor(Shape shape, std::mt19937& rng) {
  Tensor t = Tensor::empty(DType::F32, shape);
  test::fill_normal(t, rng, 1.0f);
  return t;
}

Tensor filled(Shape shape, float value) {
  Tensor t = Tensor::empty(DType::F32, shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = value;
  return t;
}

struct Case {
  int64_t B, H, S, D;
};

TEST(AttentionVRows, EqualsAttentionOverVHeads) {
  auto be = make_cpu_backend();
  std::mt19937 rng(11);
  for (const Case& c : {Case{1, 2, 9, 16}, Case{2, 3, 40, 32}, Case{1, 4, 77, 128}}) {
    const int64_t HD = c.H * c.D, extra = 24;  // the MLP columns beside qkv, as in a single block's linear1 output
    const Tensor proj = random_tensor({c.B, c.S, 3 * HD + extra}, rng);
    const Tensor qkv = proj.narrow(2, 0, 3 * HD), v_rows = proj.narrow(2, 2 * HD, HD);
    const Tensor q_norm = random_tensor({c.D}, rng), k_norm = random_tensor({c.D}, rng);
    Tensor rope = Tensor::empty(DType::F32, {c.S, c.D / 2, 2});
    for (int64_t i = 0; i < c.S * c.D / 2; ++i) {
      rope.ptr<float>()[2 * i] = std::cos(0.1f * float(i));
      rope.ptr<float>()[2 * i + 1] = std::sin(0.1f * float(i));
    }
    const Shape heads{c.B, c.H, c.S, c.D};
    Tensor q = filled(heads, NAN), k = filled(heads, NAN), v = filled(heads, NAN);
    be->qk_norm_rope(qkv, q_norm, k_norm, rope, 0, q, k, v);
    Tensor q2 = filled(heads, NAN), k2 = filled(heads, NAN);
    be->qk_norm_rope(qkv, q_norm, k_norm, rope, 0, q2, k2, Tensor());
    const std::string where = "B " + std::to_string(c.B) + " H " + std::to_string(c.H) + " S " + std::to_string(c.S);
    EXPECT_TRUE(test::same_bits(q, q2)) << where;
    EXPECT_TRUE(test::same_bits(k, k2)) << where;

    Tensor out_heads = filled({c.B, c.S, HD}, NAN), out_rows = filled({c.B, c.S, HD}, NAN);
    be->attention(q, k, v, out_heads);
    be->attention(q, k, v_rows, out_rows);
    EXPECT_TRUE(test::same_bits(out_heads, out_rows)) << where;
    EXPECT_TRUE(std::isfinite(out_rows.ptr<float>()[out_rows.numel() - 1])) << where << ": fully written";
    // v's columns matter: the k columns in their place give another output.
    Tensor out_k = filled({c.B, c.S, HD}, NAN);
    be->attention(q, k, proj.narrow(2, HD, HD), out_k);
    EXPECT_GT(max_rel_error(out_k, out_rows), 1e-3) << where;
  }
}

TEST(AttentionVRows, MismatchedRowsAreAnError) {
  auto be = make_cpu_backend();
  const Tensor q = filled({1, 2, 8, 16}, 0.5f), k = filled({1, 2, 8, 16}, 0.5f);
  const Tensor wrong_width = filled({1, 8, 48}, 1.0f), wrong_tokens = filled({1, 7, 32}, 1.0f);
  Tensor out = Tensor::empty(DType::F32, {1, 8, 32});
  for (const Tensor* v : {&wrong_width, &wrong_tokens}) {
    const std::string msg = test::error_of([&] { be->attention(q, k, *v, out); });
    EXPECT_NE(msg.find("attention: v rows"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace fluxswap
