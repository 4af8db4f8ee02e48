// The memory planner (pipeline/memory_plan.h): FLUX.1-dev component sizes computed from the configs against the
// published parameter counts, plans for common GPU sizes, the choice rules on hand-made sizes, and budget parsing.
#include <gtest/gtest.h>

#include "core/error.h"
#include "pipeline/memory_plan.h"
#include "test_support.h"

namespace fluxswap {
namespace {

constexpr uint64_t GB = 1000000000ull;

using test::error_of;

// The numbers below were worked out with a 1 GB reserve (the default is a measurement and may change).
MemoryPlanRequest plan_request_1gb(uint64_t budget, WeightFormat transformer, WeightFormat t5,
                                   const FluxWorkload& work = {}) {
  MemoryPlanRequest r = flux1_plan_request(budget, transformer, t5, work);
  r.reserve_bytes = GB;
  return r;
}

TEST(MemoryPlanSizes, FluxComponentsMatchPublishedParameterCounts) {
  const FluxWorkload work;
  // FLUX.1-dev: 11,901,408,320 parameters = 19 double blocks of 339,831,296 (per stream: modulation 56,641,536,
  // qkv 28,320,768, proj 9,440,256, MLP 37,761,024 + 37,751,808, q/k norms 256) + 38 single blocks of 141,591,808
  // (modulation 28,320,768, linear1 66,081,792, linear2 47,188,992, norms 256) + 64,124,992 in the embedders and
  // final layer; bf16 = 2 bytes each.
  const TransformerSpec t = flux_transformer_spec(FluxConfig::flux1_dev(), WeightFormat::BF16, work);
  EXPECT_EQ(t.weight_bytes(), 2ull * 11901408320ull);
  ASSERT_EQ(t.block_bytes.size(), 57u);
  EXPECT_EQ(t.block_bytes[0], 2ull * 339831296ull);
  EXPECT_EQ(t.block_bytes[56], 2ull * 141591808ull);
  EXPECT_EQ(t.shared_bytes, 2ull * 64124992ull);
  // FP8: a byte per block-linear weight plus a float32 scale per output row; biases, norms and the shared part stay
  // bf16: 11.98 GB.
  const TransformerSpec f8 = flux_transformer_spec(FluxConfig::flux1_dev(), WeightFormat::FP8, work);
  EXPECT_EQ(format_gb(f8.weight_bytes()), "12 GB");
  EXPECT_LT(f8.weight_bytes(), t.weight_bytes() / 2 + 200000000ull);

  // T5-XXL encoder: 4,762,310,656 parameters, of which the 2,048-value relative position table stays on the host.
  const ComponentSpec t5 = t5_encoder_spec(T5EncoderConfig::flux1(), WeightFormat::BF16, work);
  EXPECT_EQ(t5.weight_bytes, 2ull * (4762310656ull - 2048ull));
  // NF4: the 4,630,511,616 linear weights at 4.5 bits (codes + float32 absmax per 64), the 131,596,288-value
  // embedding and 2 x 24 + 1 norm scales of 4096 in bf16.
  const ComponentSpec t5q = t5_encoder_spec(T5EncoderConfig::flux1(), WeightFormat::NF4, work);
  const uint64_t linears = 4630511616ull, rest = 4762310656ull - 2048ull - linears;
  EXPECT_EQ(rest, 131596288ull + 49ull * 4096ull);
  EXPECT_EQ(t5q.weight_bytes, linears / 2 + linears / 64 * 4 + 24 * 4 * 64 + rest * 2);
  EXPECT_EQ(format_gb(t5q.weight_bytes), "2.9 GB");

  // CLIP-L text model: 123,060,480 parameters.
  EXPECT_EQ(clip_text_spec(ClipTextConfig::flux1(), work).weight_bytes, 2ull * 123060480ull);
  // FLUX.1's VAE decoder: 49,545,475 parameters = conv_in 74,240 + mid block 10,494,976 (two 512 resnets and the
  // attention) + up blocks 16,524,800 x 2 (512), 4,855,296 (256), 1,067,648 (128) + norm_out 256 + conv_out 3,459.
  const ComponentSpec vae = vae_decoder_spec(VaeConfig::flux1(), work);
  EXPECT_EQ(vae.weight_bytes, 2ull * 49545475ull);
  // Its largest activation at 1024x1024: 256 channels x 1024 x 1024 (block 2's upsampled output), three arenas.
  EXPECT_GE(vae.activation_bytes, 3ull * 256 * 1024 * 1024 * 2);
  EXPECT_LT(vae.activation_bytes, 3ull * 256 * 1024 * 1024 * 2 + 100000000ull);
}

TEST(MemoryPlanSizes, ActivationsGrowWithResolutionBatchAndLora) {
  FluxWorkload small{512, 512, 1, 512, 0}, big{1024, 1024, 2, 512, 64};
  const auto a = flux_transformer_spec(FluxConfig::flux1_dev(), WeightFormat::BF16, small);
  const auto b = flux_transformer_spec(FluxConfig::flux1_dev(), WeightFormat::BF16, big);
  EXPECT_GT(b.activation_bytes, 3 * a.activation_bytes);
  EXPECT_GT(b.shared_bytes, a.shared_bytes);  // the rank-64 LoRA slots
  // 1024x1024, batch 1: 4608 tokens x (9 x 3072 + 2 x 12288) bf16 values is 0.48 GB of the step's buffers.
  const auto c = flux_transformer_spec(FluxConfig::flux1_dev(), WeightFormat::BF16, FluxWorkload{});
  EXPECT_GT(c.activation_bytes, 4608ull * 52224 * 2);
  EXPECT_LT(c.activation_bytes, 4608ull * 52224 * 2 + 50000000ull);
}

TEST(MemoryPlan, EightyGigabytesKeepsEverythingResident) {
  const MemoryPlan p = plan_memory(plan_request_1gb(80 * GB, WeightFormat::BF16, WeightFormat::BF16));
  for (const auto& c : p.components) EXPECT_EQ(c.placement, Placement::Resident) << c.name;
  EXPECT_EQ(p.upload_bytes_per_image, 0u);
  EXPECT_EQ(p.pinned_host_bytes, 0u);
  // 23.8 + 9.5 + 0.25 + 0.1 GB of weights, the VAE decode's 1.7 GB of activations beside the transformer's 0.5 GB
  // of step buffers (kept between images), and the 1 GB reserve.
  EXPECT_EQ(format_gb(p.peak_bytes), "36.8 GB");
  EXPECT_EQ(p.peak_bytes, p.decode_peak);
  EXPECT_EQ(p.to_string(),
            "resident: transformer (bf16, 23.8 GB), t5 (bf16, 9.5 GB), clip (bf16, 0.2 GB), vae (bf16, 0.1 GB); "
            "peak 36.8 GB of 80 GB");
}

TEST(MemoryPlan, TwentyFourGigabytesWithFp8SendsBf16T5OnDemand) {
  const MemoryPlan p = plan_memory(plan_request_1gb(24 * GB, WeightFormat::FP8, WeightFormat::BF16));
  EXPECT_EQ(p.component("transformer").placement, Placement::Resident);
  EXPECT_EQ(p.component("t5").placement, Placement::OnDemand);
  EXPECT_EQ(p.component("clip").placement, Placement::Resident);
  EXPECT_EQ(p.component("vae").placement, Placement::Resident);
  EXPECT_EQ(p.upload_bytes_per_image, p.component("t5").weight_bytes);
  EXPECT_LE(p.peak_bytes, 24 * GB);
  EXPECT_EQ(p.peak_bytes, p.encode_peak);  // the transformer (with its step buffers) and T5 side by side
  EXPECT_EQ(p.to_string(),
            "resident: transformer (fp8, 12 GB), clip (bf16, 0.2 GB), vae (bf16, 0.1 GB); on demand: t5 (bf16, "
            "9.5 GB); peak 23.5 GB of 24 GB");
  // 23.1 GB is the least that keeps this transformer resident: everything else on demand.
  const MemoryPlanRequest r = plan_request_1gb(24 * GB, WeightFormat::FP8, WeightFormat::BF16);
  const uint64_t smallest = smallest_budget_with_resident_transformer(r);
  EXPECT_EQ(format_gb(smallest), "23.1 GB");
  MemoryPlanRequest at = r;
  at.budget_bytes = smallest;
  EXPECT_EQ(plan_memory(at).component("transformer").placement, Placement::Resident);
  EXPECT_EQ(plan_memory(at).component("clip").placement, Placement::OnDemand);
  at.budget_bytes = smallest - 1;
  EXPECT_NE(plan_memory(at).component("transformer").placement, Placement::Resident);
}

TEST(MemoryPlan, TwentyFourGigabytesWithFp8AndNf4KeepsEverythingResident) {
  // 12 + 2.9 + 0.2 + 0.1 GB of weights leave room for the 1.7 GB VAE decode beside the step buffers and the 1 GB
  // reserve.
  const MemoryPlan p = plan_memory(plan_request_1gb(24 * GB, WeightFormat::FP8, WeightFormat::NF4));
  for (const auto& c : p.components) EXPECT_EQ(c.placement, Placement::Resident) << c.name;
  EXPECT_EQ(p.to_string(),
            "resident: transformer (fp8, 12 GB), t5 (nf4, 2.9 GB), clip (bf16, 0.2 GB), vae (bf16, 0.1 GB); "
            "peak 18.4 GB of 24 GB");
}

TEST(MemoryPlan, SixteenGigabytesWithFp8AndNf4UploadsTheTransformerPerImageWhileItKeepsItsBuffers) {
  // The encode phase is the tight one: T5 (2.9 GB) runs beside the 12 GB transformer and its 0.5 GB of step buffers.
  // Streaming would have to move six single blocks every step (24 GB per image); uploading the transformer and T5
  // for every image moves 14.8 GB.
  const MemoryPlan p = plan_memory(plan_request_1gb(16 * GB, WeightFormat::FP8, WeightFormat::NF4));
  EXPECT_EQ(p.component("transformer").placement, Placement::OnDemand);
  EXPECT_EQ(p.component("t5").placement, Placement::OnDemand);
  EXPECT_EQ(format_gb(p.upload_bytes_per_image), "14.8 GB");
  EXPECT_EQ(p.peak_bytes, p.denoise_peak);
}

TEST(MemoryPlan, SixteenGigabytesWithFp8AndNf4SendsTheEncodersOnDemand) {
  // A pipeline that frees the transformer's step buffers after denoising. With the text encoders on demand, T5
  // (2.9 GB) still runs beside the 12 GB transformer. Streaming two single blocks (0.28 GB a step, 7.9 GB over 28
  // steps) plus the encoders' 3.1 GB per image is cheaper than uploading the whole transformer for every image.
  MemoryPlanRequest r = plan_request_1gb(16 * GB, WeightFormat::FP8, WeightFormat::NF4);
  r.transformer_buffers_kept = false;
  const MemoryPlan p = plan_memory(r);
  EXPECT_EQ(p.component("t5").placement, Placement::OnDemand);
  EXPECT_EQ(p.component("clip").placement, Placement::OnDemand);
  EXPECT_EQ(p.component("vae").placement, Placement::Resident);
  ASSERT_EQ(p.component("transformer").placement, Placement::Streamed);
  EXPECT_EQ(p.streaming.resident_blocks, 55);
  EXPECT_EQ(p.streaming.prefetch_depth, 2);
  EXPECT_LE(p.peak_bytes, 16 * GB);
  EXPECT_EQ(p.peak_bytes, p.encode_peak);
  EXPECT_LT(p.upload_bytes_per_image, p.component("transformer").weight_bytes);
  EXPECT_EQ(p.to_string(),
            "resident: vae (bf16, 0.1 GB); streamed: transformer (fp8, 12 GB; 55 of 57 blocks resident, prefetch 2, "
            "0.3 GB per step from pinned host memory); on demand: t5 (nf4, 2.9 GB), clip (bf16, 0.2 GB); peak 16 GB "
            "of 16 GB");
}

TEST(MemoryPlan, SixteenGigabytesStreamsABf16Transformer) {
  const MemoryPlan p = plan_memory(plan_request_1gb(16 * GB, WeightFormat::BF16, WeightFormat::NF4));
  const auto& s = p.streaming;
  ASSERT_EQ(p.component("transformer").placement, Placement::Streamed);
  EXPECT_GT(s.resident_blocks, 0);
  EXPECT_LT(s.resident_blocks, 57);
  EXPECT_GE(s.prefetch_depth, 1);
  EXPECT_LE(s.prefetch_depth, 2);
  EXPECT_LE(p.peak_bytes, 16 * GB);
  // The double blocks are the largest, so they are the first to stay.
  int double_resident = 0;
  for (int i = 0; i < 19; ++i) double_resident += s.block_resident[i];
  EXPECT_EQ(double_resident, std::min(19, s.resident_blocks));
  // The three double blocks that stream are spread out (3, 9, 15), not the last three, so each upload has resident
  // blocks before it to hide behind.
  for (int i = 0; i < 19; ++i) EXPECT_EQ(s.block_resident[size_t(i)], i != 3 && i != 9 && i != 15) << "block " << i;
  // One more resident block would not fit.
  MemoryPlanRequest r = plan_request_1gb(16 * GB, WeightFormat::BF16, WeightFormat::NF4);
  r.budget_bytes = p.peak_bytes + r.transformer.block_bytes[19] - 1;
  EXPECT_EQ(plan_memory(r).streaming.resident_blocks, s.resident_blocks);
  uint64_t on_demand = 0;
  for (const auto& c : p.components) on_demand += c.placement == Placement::OnDemand ? c.weight_bytes : 0;
  EXPECT_EQ(p.upload_bytes_per_image, s.bytes_per_step * 28 + on_demand);
  EXPECT_EQ(p.pinned_host_bytes, s.bytes_per_step + on_demand);
  EXPECT_NE(p.to_string().find("16 of 57 blocks resident, prefetch 2"), std::string::npos) << p.to_string();
}

TEST(MemoryPlan, TooSmallBudgetNamesTheMinimum) {
  const std::string msg =
      error_of([] { plan_memory(plan_request_1gb(4 * GB, WeightFormat::BF16, WeightFormat::BF16)); });
  EXPECT_NE(msg.find("a budget of 4 GB is too small"), std::string::npos) << msg;
  EXPECT_NE(msg.find("needs "), std::string::npos) << msg;
  EXPECT_NE(msg.find("0 of 57 blocks resident"), std::string::npos) << msg;
}

// ---- the choice rules on hand-made sizes ----

MemoryPlanRequest synthetic(uint64_t budget) {
  MemoryPlanRequest r;
  r.budget_bytes = budget;
  r.reserve_bytes = 1 * GB;
  r.transformer.shared_bytes = 1 * GB;
  r.transformer.block_bytes = {2 * GB, 2 * GB, 1 * GB, 1 * GB, 1 * GB, 1 * GB};  // 8 GB of blocks
  r.transformer.activation_bytes = 1 * GB;
  r.t5 = {"t5", WeightFormat::NF4, 3 * GB, 1 * GB};
  r.clip = {"clip", WeightFormat::BF16, 1 * GB / 4, 0};
  r.vae = {"vae", WeightFormat::BF16, 1 * GB / 4, 2 * GB};
  r.steps = 10;
  r.transformer_buffers_kept = false;  // the rules below, with phase-local buffers; KeptStepBuffers has the rest
  return r;
}

TEST(MemoryPlanRules, PhasesAndPeaks) {
  // All resident: 9 + 3 + 0.25 + 0.25 = 12.5 GB of weights + reserve 1; the phases add 1 (T5), 1 (steps), 2 (VAE).
  const MemoryPlan p = plan_memory(synthetic(100 * GB));
  EXPECT_EQ(p.resident_bytes, 12500000000ull);
  EXPECT_EQ(p.encode_peak, 14500000000ull);
  EXPECT_EQ(p.denoise_peak, 14500000000ull);
  EXPECT_EQ(p.decode_peak, 15500000000ull);
  EXPECT_EQ(p.peak_bytes, 15500000000ull);
  // Exactly at the peak still fits; a byte less does not.
  EXPECT_EQ(plan_memory(synthetic(15500000000ull)).upload_bytes_per_image, 0u);
  EXPECT_GT(plan_memory(synthetic(15500000000ull - 1)).upload_bytes_per_image, 0u);
}

TEST(MemoryPlanRules, KeptStepBuffersCountInEveryPhase) {
  MemoryPlanRequest r = synthetic(100 * GB);
  r.transformer_buffers_kept = true;
  const MemoryPlan p = plan_memory(r);
  EXPECT_EQ(p.encode_peak, 15500000000ull);  // + the transformer's 1 GB beside T5's
  EXPECT_EQ(p.denoise_peak, 14500000000ull);  // counted once
  EXPECT_EQ(p.decode_peak, 16500000000ull);
}

TEST(MemoryPlanRules, CheapestUploadWins) {
  // 15 GB: the VAE (0.25 GB) on demand does not lower the decode peak enough (its activations stay), CLIP on demand
  // saves too little; T5 on demand (3 GB per image) fits: encode = 9.5 + 1 + 3 + 1 = 14.5.
  const MemoryPlan p = plan_memory(synthetic(15 * GB));
  EXPECT_EQ(p.component("t5").placement, Placement::OnDemand);
  EXPECT_EQ(p.component("transformer").placement, Placement::Resident);
  EXPECT_EQ(p.upload_bytes_per_image, 3 * GB);
  // 12 GB: T5 on demand alone leaves encode at 14.5. Loading the transformer per image as well (9 + 3 GB per image)
  // fits: 0.5 resident + 1 reserve + 9 + 1 = 11.5 while denoising. Streaming could keep T5 resident only with
  // nothing resident and 8 GB per step (80 GB per image), or with T5 on demand keep {2, 2, 1} (3 GB x 10 steps +
  // 3): both dearer.
  const MemoryPlan q = plan_memory(synthetic(12 * GB));
  EXPECT_EQ(q.component("t5").placement, Placement::OnDemand);
  EXPECT_EQ(q.component("transformer").placement, Placement::OnDemand);
  EXPECT_EQ(q.upload_bytes_per_image, 12 * GB);
  EXPECT_EQ(q.peak_bytes, 11500000000ull);
}

TEST(MemoryPlanRules, StreamingKeepsTheLargestBlocksAndPicksTheDepth) {
  // Only the transformer: 1 GB shared + 8 GB of blocks, 1 GB of step buffers, 1 GB reserve. All resident (or loaded
  // per image) needs 11 GB; below that the blocks stream, and 3 GB besides them is always taken.
  MemoryPlanRequest r = synthetic(10 * GB);
  for (ComponentSpec* c : {&r.t5, &r.clip, &r.vae}) c->weight_bytes = c->activation_bytes = 0;
  // 10 GB leaves 7 for resident blocks and buffers: depth 2 keeps {2, 2} with three 1 GB buffers (7); {2, 2, 1}
  // would need 8.
  MemoryPlan p = plan_memory(r);
  ASSERT_EQ(p.component("transformer").placement, Placement::Streamed);
  EXPECT_EQ(p.streaming.prefetch_depth, 2);
  EXPECT_EQ(p.streaming.resident_blocks, 2);
  EXPECT_EQ(p.streaming.block_resident, (std::vector<bool>{true, true, false, false, false, false}));
  EXPECT_EQ(p.streaming.buffer_bytes, 3 * GB);
  EXPECT_EQ(p.streaming.bytes_per_step, 4 * GB);
  EXPECT_EQ(p.upload_bytes_per_image, 40 * GB);
  // Depth 1 only: one buffer less keeps one block more; of the four 1 GB blocks the three that stream are spread out
  // (each upload then hides behind the resident block before it).
  r.max_prefetch_depth = 1;
  p = plan_memory(r);
  EXPECT_EQ(p.streaming.prefetch_depth, 1);
  EXPECT_EQ(p.streaming.block_resident, (std::vector<bool>{true, true, false, true, false, false}));
  // 8.5 GB leaves 5.5: three buffers of 2 GB (a 2 GB block still streams) do not fit, two do, with nothing resident.
  r.max_prefetch_depth = 2;
  r.budget_bytes = 8500000000ull;
  p = plan_memory(r);
  EXPECT_EQ(p.streaming.prefetch_depth, 1);
  EXPECT_EQ(p.streaming.resident_blocks, 0);
  EXPECT_EQ(p.streaming.buffer_bytes, 4 * GB);
  EXPECT_EQ(p.streaming.bytes_per_step, 8 * GB);
  EXPECT_EQ(p.peak_bytes, 7 * GB);
}

TEST(MemoryPlanRules, RejectsDegenerateRequests) {
  EXPECT_NE(error_of([] { plan_memory(synthetic(0)); }).find("budget is 0"), std::string::npos);
  MemoryPlanRequest r = synthetic(100 * GB);
  r.steps = 0;
  EXPECT_NE(error_of([&] { plan_memory(r); }).find("steps"), std::string::npos);
}

// ---- budgets ----

TEST(MemoryBudget, ParsesUnits) {
  EXPECT_EQ(parse_memory_budget("24G"), 24 * GB);
  EXPECT_EQ(parse_memory_budget("24g"), 24 * GB);
  EXPECT_EQ(parse_memory_budget("16GB"), 16 * GB);
  EXPECT_EQ(parse_memory_budget("16000M"), 16 * GB);
  EXPECT_EQ(parse_memory_budget("16000 MB"), 16 * GB);
  EXPECT_EQ(parse_memory_budget("24GiB"), 24ull << 30);
  EXPECT_EQ(parse_memory_budget("24gib"), 24ull << 30);
  EXPECT_EQ(parse_memory_budget("512MiB"), 512ull << 20);
  EXPECT_EQ(parse_memory_budget("1.5T"), 1500 * GB);
  EXPECT_EQ(parse_memory_budget("23.5GB"), 23500000000ull);
  EXPECT_EQ(parse_memory_budget("8000000K"), 8 * GB);
}

TEST(MemoryBudget, RejectsEverythingElse) {
  for (const char* bad : {"", "24", "G", "24X", "24 GBs", "-24G", "24..5G", "1e9G", "0G", "24 G B", " 24G", "G24",
                          "24GiBi", "."}) {
    const std::string msg = error_of([&] { parse_memory_budget(bad); });
    EXPECT_NE(msg.find("memory budget '" + std::string(bad) + "'"), std::string::npos) << bad << ": " << msg;
  }
}

TEST(MemoryBudget, FormatsGigabytes) {
  EXPECT_EQ(format_gb(24 * GB), "24 GB");
  EXPECT_EQ(format_gb(11901408320ull), "11.9 GB");
  EXPECT_EQ(format_gb(49000000ull), "0 GB");
  EXPECT_EQ(format_gb(50000000ull), "0.1 GB");
}

}  // namespace
}  // namespace fluxswap
