// FluxTransformer::modulation_table: every step's modulation vectors computed in one pass give the same step outputs
// as computing them inside each step — with no LoRA, a runtime LoRA and a merged LoRA on the modulation linears (the
// fixtures' lora_a targets every norm*.linear), with and without a guidance embedder.
#include <gtest/gtest.h>

#include "core/compare.h"
#include "core/error.h"
#include "fixture_transformer.h"
#include "lora/lora_controller.h"
#include "test_support.h"

namespace fluxswap {
namespace {

// The table's rows come out of [T * B]-row products, a step's out of [B]-row ones: BLAS may sum in another order.
constexpr double kMaxRelError = 1e-5;
constexpr int kSteps = 3;

struct TabledSteps {
  test::FixtureTransformer m;
  FluxInputs in;
  Tensor out, timesteps;  // timesteps: [kSteps, B]

  explicit TabledSteps(const std::string& name) : m(name) {
    Backend& be = *m.backend;
    auto up = [&](const Tensor& host) {
      Tensor d = be.empty(host.dtype() == DType::F32 ? host.dtype() : be.compute_dtype(), host.shape());
      be.copy_from_host(host.to_f32(), d);
      return d;
    };
    const FluxHostInputs& h = m.inputs;
    in.hidden_states = up(h.hidden_states);
    in.encoder_hidden_states = up(h.encoder_hidden_states);
    in.pooled_projections = up(h.pooled_projections);
    in.timestep = up(h.timestep);
    if (h.guidance.data()) in.guidance = up(h.guidance);
    in.rope = up(flux_rope_table(m.checkpoint.config, h.txt_ids, h.img_ids));
    const int64_t B = h.hidden_states.size(0);
    out = be.empty(be.compute_dtype(), {B, h.hidden_states.size(1), m.checkpoint.config.out_channels()});
    Tensor t = Tensor::empty(DType::F32, {kSteps, B});
    for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = 1.0f - 0.3f * float(i / B) - 0.01f * float(i % B);
    timesteps = up(t);
  }
  Tensor per_step(int i) {
    FluxInputs x = in;
    m.backend->copy(timesteps.select(0, i), x.timestep);
    m.transformer->forward(x, out);
    return m.backend->to_host_f32(out);
  }
  Tensor tabled(int i, const Tensor& table) {
    FluxInputs x = in;
    x.timestep = Tensor();  // must not be read
    x.modulations = m.backend->empty(m.backend->compute_dtype(), {table.size(1), table.size(2)});
    m.backend->copy(table.select(0, i), x.modulations);
    m.transformer->forward(x, out);
    return m.backend->to_host_f32(out);
  }
  // Every step per step first, then from the table in reverse order: the last per-step modulations still in the
  // transformer's own buffer belong to another step.
  void expect_every_step_matches(const char* what) {
    const Tensor table = m.transformer->modulation_table(timesteps, in.guidance, in.pooled_projections);
    ASSERT_EQ(table.shape(), (Shape{kSteps, timesteps.size(1), m.transformer->modulation_width()}));
    std::vector<Tensor> expected;
    for (int i = 0; i < kSteps; ++i) expected.push_back(per_step(i));
    for (int i = kSteps - 1; i >= 0; --i)
      EXPECT_LE(max_rel_error(tabled(i, table), expected[size_t(i)]), kMaxRelError) << what << ", step " << i;
  }
};

class ModulationTable : public ::testing::TestWithParam<std::string> {};

TEST_P(ModulationTable, EveryStepMatchesModulationsComputedInTheStep) {
  FLUXSWAP_REQUIRE_FIXTURES();
  TabledSteps s(GetParam());
  s.expect_every_step_matches("no LoRA");
  // Different timesteps give different rows (a table of one repeated row would pass the comparison above for
  // step 0 only).
  const Tensor t = s.m.backend->to_host_f32(
      s.m.transformer->modulation_table(s.timesteps, s.in.guidance, s.in.pooled_projections));
  const int64_t row = t.numel() / kSteps;
  EXPECT_GT(max_rel_error(t.view({kSteps, row}).select(0, 0), t.view({kSteps, row}).select(0, 2)), 1e-3);
}

TEST_P(ModulationTable, ALoraOnTheModulationLinearsIsInTheTableInBothModes) {
  FLUXSWAP_REQUIRE_FIXTURES();
  for (LoraMode mode : {LoraMode::Runtime, LoraMode::Merged}) {
    TabledSteps s(GetParam());
    const Tensor base = s.m.backend->to_host_f32(
        s.m.transformer->modulation_table(s.timesteps, s.in.guidance, s.in.pooled_projections));
    LoraController lora(*s.m.transformer, mode, 8);
    lora.set_adapters({{s.m.lora("a_peft"), 0.8f}});
    const Tensor with = s.m.backend->to_host_f32(
        s.m.transformer->modulation_table(s.timesteps, s.in.guidance, s.in.pooled_projections));
    EXPECT_GT(max_rel_error(with, base), 1e-3) << "the adapter's modulation pairs did not reach the table";
    s.expect_every_step_matches(mode == LoraMode::Runtime ? "runtime LoRA" : "merged LoRA");
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ModulationTable, ::testing::Values("tiny", "tiny_schnell"));

TEST(ModulationTableErrors, AStepRowOfTheWrongWidthIsRefusedByName) {
  FLUXSWAP_REQUIRE_FIXTURES();
  TabledSteps s("tiny");
  FluxInputs bad = s.in;
  bad.modulations = s.m.backend->empty(s.m.backend->compute_dtype(), {1, s.m.transformer->modulation_width() - 1});
  try {
    s.m.transformer->forward(bad, s.out);
    FAIL() << "a wrong-width modulations row was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("modulations has shape"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace fluxswap
