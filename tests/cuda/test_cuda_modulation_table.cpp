// FluxTransformer::modulation_table on the GPU (the pipeline's way of giving steps their modulations): every step of
// a recorded step that copies its row from the table matches the step computing its own modulations, in bf16 and
// in FP8 (where the table's FP8 rows go through cuBLASLt instead of the few-row GEMV), with a runtime LoRA on the
// modulation linears (fixture lora_a targets every norm*.linear).
// Tolerance: the table's [T * B]-row products may round a few bf16 modulation values differently from the [B]-row
// ones; max|a-b|/max|b| <= 2e-2 in bf16 (the golden tolerance), <= 7e-2 in FP8 (an activation code crossing a
// rounding boundary, as in test_cuda_fp8_transformer.cpp), printed.
#include "cuda_test_util.h"
#include "gpu_fixture_model.h"
#include "lora/lora_controller.h"

namespace fluxswap::test {
namespace {

constexpr int kSteps = 4;

void expect_tabled_steps_match(GpuModel& g, double tolerance, const char* what) {
  Backend& be = g.be;
  const int64_t B = g.in.timestep.size(0);
  Tensor t = Tensor::empty(DType::F32, {kSteps, B});
  for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = 1.0f - 0.25f * float(i / B);
  const Tensor timesteps = be.empty(DType::F32, t.shape());
  be.copy_from_host(t, timesteps);
  std::vector<Tensor> expected;
  for (int i = 0; i < kSteps; ++i) {
    be.copy(timesteps.select(0, i), g.in.timestep);
    g.forward();
    expected.push_back(g.result());
  }
  const Tensor table = g.transformer.modulation_table(timesteps, g.in.guidance, g.in.pooled_projections);
  FluxInputs x = g.in;
  x.modulations = be.empty(be.compute_dtype(), {B, g.transformer.modulation_width()});
  int row = 0;
  auto run = [&] {
    be.copy(table.select(0, row), x.modulations);
    g.transformer.forward(x, g.out);
  };
  for (row = kSteps - 1; row >= 0; --row) {
    run();
    const Tensor got = g.result();
    const double err = max_rel_error(got, expected[size_t(row)]);
    std::printf("[ table    ] %s step %d: tabled vs per-step max rel error %.3g\n", what, row, err);
    EXPECT_LE(err, tolerance) << what << ", step " << row;
  }
  // Recorded (the copy of row 2 and the step), replayed after a per-step timestep change it must not read.
  row = 2;
  auto graph = be.record(run);
  be.copy(timesteps.select(0, 0), g.in.timestep);
  graph->replay();
  EXPECT_LE(max_rel_error(g.result(), expected[2]), tolerance) << what << ", recorded";
}

TEST(CudaModulationTable, TabledStepsMatchPerStepModulationsInBf16AndFp8WithARuntimeLora) {
  FLUXSWAP_REQUIRE_FIXTURES();
  FLUXSWAP_CUDA_BACKEND(gpu);
  GpuModel g(*gpu);
  expect_tabled_steps_match(g, 2e-2, "bf16");
  {
    LoraController lora(g.transformer, LoraMode::Runtime);
    lora.set_adapters({{g.lora("a_peft"), 0.8f}});
    expect_tabled_steps_match(g, 2e-2, "bf16 runtime LoRA");
  }
  g.transformer.set_fp8(true);
  expect_tabled_steps_match(g, 7e-2, "fp8");
}

}  // namespace
}  // namespace fluxswap::test
