// LoRA applied to the CPU reference transformer, in merged and runtime modes, against the diffusers + PEFT
// reference outputs (max|a-b|/max|b| <= 1e-4), plus the swap and unload guarantees.
#include <gtest/gtest.h>

#include "core/compare.h"
#include "core/error.h"
#include "lora/lora_controller.h"
#include "fixture_transformer.h"
#include "test_support.h"

namespace fluxswap {
namespace {

constexpr double kTolerance = 1e-4;

using Model = test::FixtureTransformer;

struct Case {
  std::string golden;
  std::vector<std::pair<std::string, float>> loras;
};

const std::vector<Case> kCases = {
    {"lora_a_scale1", {{"a_peft", 1.0f}}},
    {"lora_a_scale0.6", {{"a_peft", 0.6f}}},
    {"lora_a0.7_b-0.5", {{"a_peft", 0.7f}, {"b_peft", -0.5f}}},
    {"lora_b_scale1", {{"b_peft", 1.0f}}},
    {"lora_c_kohya_scale1", {{"c_kohya", 1.0f}}},
    {"lora_c_comfy_scale1", {{"c_comfy", 1.0f}}},
    {"lora_d_xlabs_scale1", {{"d_xlabs", 1.0f}}},
};

class LoraGolden : public ::testing::TestWithParam<std::tuple<std::string, LoraMode>> {};

// Every case in sequence on one model: each set_adapters() is also a swap from the previous case.
TEST_P(LoraGolden, EveryCaseMatchesTheReference) {
  FLUXSWAP_REQUIRE_FIXTURES();
  auto [name, mode] = GetParam();
  Model m(name);
  LoraController lora(*m.transformer, mode);
  for (const Case& c : kCases) {
    std::vector<ActiveLora> active;
    for (const auto& [file, weight] : c.loras) active.push_back({m.lora(file), weight});
    LoraApplyReport report = lora.set_adapters(active);
    EXPECT_GT(report.modules, 0u) << c.golden;
    const double err = max_rel_error(m.run(), m.goldens->tensor("out." + c.golden));
    EXPECT_LE(err, kTolerance) << name << " " << c.golden;
  }
  lora.clear();
  EXPECT_EQ(max_rel_error(m.run(), m.goldens->tensor("out.base")) <= kTolerance, true);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, LoraGolden,
                         ::testing::Combine(::testing::Values("tiny", "small", "tiny_schnell"),
                                            ::testing::Values(LoraMode::Merged, LoraMode::Runtime)),
                         [](const auto& info) {
                           return std::get<0>(info.param) +
                                  (std::get<1>(info.param) == LoraMode::Merged ? "_merged" : "_runtime");
                         });

TEST(LoraSwap, SwapBackIsBitIdenticalToAFreshLoadAndUnloadRestoresTheBase) {
  FLUXSWAP_REQUIRE_FIXTURES();
  for (LoraMode mode : {LoraMode::Merged, LoraMode::Runtime}) {
    Model m("tiny");
    const Tensor base = m.run();
    LoraController lora(*m.transformer, mode);
    auto a = m.lora("a_peft"), b = m.lora("b_peft");
    lora.set_adapters({{a, 1.0f}});
    const Tensor first_a = m.run();
    lora.set_adapters({{b, 1.0f}});
    lora.set_adapters({{a, 1.0f}});
    const Tensor again_a = m.run();
    EXPECT_EQ(max_rel_error(first_a, again_a), 0.0);
    EXPECT_GT(max_rel_error(first_a, base), 1e-3);  // the LoRA really changed something
    lora.clear();
    EXPECT_EQ(max_rel_error(m.run(), base), 0.0) << "unload must restore the base exactly";

    // A fresh model with only a loaded gives the same bits.
    Model fresh("tiny");
    LoraController fresh_lora(*fresh.transformer, mode);
    fresh_lora.set_adapters({{fresh.lora("a_peft"), 1.0f}});
    EXPECT_EQ(max_rel_error(fresh.run(), first_a), 0.0);
  }
}

TEST(LoraSwap, AdapterOrderDoesNotMatter) {
  FLUXSWAP_REQUIRE_FIXTURES();
  Model m("tiny");
  LoraController lora(*m.transformer, LoraMode::Merged);
  auto a = m.lora("a_peft"), b = m.lora("b_peft");
  lora.set_adapters({{a, 0.7f}, {b, -0.5f}});
  const Tensor ab = m.run();
  lora.set_adapters({{b, -0.5f}, {a, 0.7f}});
  EXPECT_LE(max_rel_error(m.run(), ab), 1e-6);
}

TEST(LoraSwap, RankOverTheSlotIsRefusedAndLeavesTheModelUnchanged) {
  FLUXSWAP_REQUIRE_FIXTURES();
  Model m("tiny");
  LoraController lora(*m.transformer, LoraMode::Runtime, /*max_rank=*/4);
  auto a = m.lora("a_peft"), b = m.lora("b_peft");  // rank 4 fits; rank 8 does not
  lora.set_adapters({{a, 1.0f}});
  const Tensor with_a = m.run();
  try {
    lora.set_adapters({{b, 1.0f}});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("over the slot"), std::string::npos) << e.what();
  }
  EXPECT_EQ(max_rel_error(m.run(), with_a), 0.0);
}

TEST(LoraSwap, ModulesWithoutSlotsAreRefusedClearly) {
  FLUXSWAP_REQUIRE_FIXTURES();
  Model m("tiny");
  LoraController lora(*m.transformer, LoraMode::Runtime, 8, {"double_blocks.0.img_attn.qkv"});
  try {
    lora.set_adapters({{m.lora("a_peft"), 1.0f}});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("has no runtime slot"), std::string::npos) << e.what();
  }
  EXPECT_LE(max_rel_error(m.run(), m.goldens->tensor("out.base")), kTolerance);
}

}  // namespace
}  // namespace fluxswap

namespace fluxswap {
namespace {

// kohya's LoRA covers all of qkv as one update, PEFT's b covers q, k and v separately: partly overlapping row
// ranges on one module take the merged mode's general path, which must agree with the runtime slots.
TEST(LoraSwap, PartlyOverlappingTargetsMergeLikeRuntimeSlots) {
  FLUXSWAP_REQUIRE_FIXTURES();
  Model merged("tiny"), runtime("tiny");
  LoraController m(*merged.transformer, LoraMode::Merged), r(*runtime.transformer, LoraMode::Runtime);
  m.set_adapters({{merged.lora("c_kohya"), 0.8f}, {merged.lora("b_peft"), -0.6f}});
  r.set_adapters({{runtime.lora("c_kohya"), 0.8f}, {runtime.lora("b_peft"), -0.6f}});
  const Tensor a = merged.run(), b = runtime.run();
  EXPECT_LE(max_rel_error(a, b), 1e-5);
  EXPECT_GT(max_rel_error(a, merged.goldens->tensor("out.lora_c_kohya_scale1")), 1e-3);
}

}  // namespace
}  // namespace fluxswap
