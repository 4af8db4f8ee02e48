#include "cli/e2e_bench.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <vector>

#include "cli/bench_timing.h"
#include "core/error.h"
#include "io/scratch_dir.h"
#include "lora/lora_controller.h"
#include "lora/random_lora.h"
#include "model/flux_random_fp8_weights.h"
#include "model/flux_random_weights.h"
#include "model/random_component_weights.h"
#include "pipeline/flux_pipeline.h"
#include "text/tokenizer_factory.h"

namespace fluxswap {

namespace {

using Clock = BenchClock;

std::string tokenizer_folder(const std::string& given) {
  if (!given.empty()) return given;
  if (const char* d = std::getenv("FLUXSWAP_FIXTURES")) return std::string(d) + "/tiny/pipeline";
  return "../shared/fixtures/tiny/pipeline";
}

double gib(uint64_t bytes) { return double(bytes) / double(1ull << 30); }

const char* const kPrompt = "a photograph of an astronaut riding a horse on the moon, detailed, golden hour";

// T5's embeddings of the benchmark prompt (host float32).
Tensor t5_embeddings(T5Encoder& t5, TextTokenizer& tokenizer, Backend& be) {
  const TokenEncoding e = tokenizer.encode(kPrompt, 512);
  Tensor ids = Tensor::empty(DType::I32, {1, int64_t(e.ids.size())});
  std::copy(e.ids.begin(), e.ids.end(), ids.ptr<int32_t>());
  const Tensor ids_dev = be.empty(DType::I32, ids.shape());
  be.copy_from_host(ids, ids_dev);
  const Tensor out = be.empty(be.compute_dtype(), {1, ids.size(1), t5.config().d_model});
  t5.encode(ids_dev, out);
  return be.to_host_f32(out);
}

double cosine(const Tensor& a, const Tensor& b) {
  double dot = 0, na = 0, nb = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = a.ptr<float>()[i], y = b.ptr<float>()[i];
    dot += x * y, na += x * x, nb += y * y;
  }
  return dot / std::sqrt(na * nb);
}

struct Generations {
  double first_s = 0;  // the warm-up: GEMM and attention plans, buffers
  std::vector<double> total, encode, denoise, decode;
  GenerateResult last;
};

Generations time_generations(FluxPipeline& pipe, GenerateParams p, int runs) {
  Generations g;
  auto t0 = Clock::now();
  pipe.generate(p);
  g.first_s = seconds_since(t0);
  for (int i = 0; i < runs; ++i) {
    p.seed = uint64_t(i + 1);
    t0 = Clock::now();
    g.last = pipe.generate(p);
    g.total.push_back(seconds_since(t0));
    g.encode.push_back(g.last.encode_s), g.denoise.push_back(g.last.denoise_s), g.decode.push_back(g.last.decode_s);
  }
  return g;
}

nlohmann::json phase_memory_json(const GenerateResult& r) {
  nlohmann::json j;
  for (const auto& [name, m] : {std::pair{"encode", &r.encode_memory}, {"denoise", &r.denoise_memory},
                                {"decode", &r.decode_memory}})
    j[name] = {{"pool_gib", gib(m->pool)}, {"device_gib", gib(m->device)}};
  return j;
}

// The phase that used the most of the device at its end, as "encode 21.3 GiB (pool 20.6)".
std::string largest_phase(const GenerateResult& r) {
  const std::pair<const char*, const PhaseMemory*> phases[] = {
      {"encode", &r.encode_memory}, {"denoise", &r.denoise_memory}, {"decode", &r.decode_memory}};
  const auto* top = &phases[0];
  for (const auto& ph : phases)
    if (ph.second->device > top->second->device) top = &ph;
  char s[96];
  std::snprintf(s, sizeof s, "%s %.2f GiB (pool %.2f GiB)", top->first, gib(top->second->device),
                gib(top->second->pool));
  return s;
}

}  // namespace

nlohmann::json bench_end_to_end(Backend& be, const EndToEndOptions& o) {
  if (o.runs < 1) throw Error("--e2e: runs must be at least 1");
  const std::string tok = tokenizer_folder(o.tokenizers);
  if (!std::filesystem::is_directory(tok + "/tokenizer") || !std::filesystem::is_directory(tok + "/tokenizer_2"))
    throw Error("--e2e needs tokenizer/ and tokenizer_2/ in " + tok + " (give a pipeline folder with --tokenizers)");
  const uint64_t budget = o.vram.empty() ? 0 : parse_memory_budget(o.vram);
  if (o.t5 != "bf16" && o.t5 != "nf4") throw Error("--t5 must be bf16 or nf4, got '" + o.t5 + "'");
  const bool t5_nf4 = o.t5 == "nf4";
  const bool fp8_only = budget && o.fp8;
  // An FP8-only transformer has no bf16 base to merge into: its LoRAs run as slots (as `generate` does).
  const std::string lora_mode = fp8_only ? "runtime" : o.lora_mode;
  const FluxConfig fc = FluxConfig::flux1_dev();
  const ClipTextConfig cc = ClipTextConfig::flux1();
  const T5EncoderConfig tc = T5EncoderConfig::flux1();
  const VaeConfig vc = VaeConfig::flux1();
  FluxWorkload work;
  work.width = work.height = o.size;
  work.lora_rank = o.lora_rank > 0 && lora_mode == "runtime" ? o.lora_rank : 0;

  // Under a budget the cap comes before anything is built, and components planned on demand leave the device as
  // soon as they are made, so building is held to the budget as loading a checkpoint is (FluxPipeline::from_pretrained).
  std::optional<MemoryPlan> building;
  if (budget) {
    be.set_memory_limit(budget);
    const MemoryPlanRequest r =
        flux1_plan_request(budget, fp8_only ? WeightFormat::FP8 : WeightFormat::BF16,
                           t5_nf4 ? WeightFormat::NF4 : WeightFormat::BF16, work, fc);
    building = plan_memory(r);
  }
  auto leaves = [&](const char* name) {
    return building && building->component(name).placement == Placement::OnDemand;
  };
  auto t0 = Clock::now();
  auto clip = std::make_unique<ClipTextModel>(cc, random_clip_text_weights(cc, be, 7), be);
  if (leaves("clip")) clip->offload();
  auto t5 = std::make_unique<T5Encoder>(tc, random_t5_encoder_weights(tc, be, 7), be);
  double t5_cosine = 0, t5_quantize_s = 0;
  if (t5_nf4) {
    // The same random T5 before and after NF4: how much of its output the 4-bit weights keep.
    auto tokenizer = load_tokenizer(tok + "/tokenizer_2");
    const Tensor full = t5_embeddings(*t5, *tokenizer, be);
    const auto tq = Clock::now();
    t5->quantize_nf4();
    t5_quantize_s = seconds_since(tq);
    t5_cosine = cosine(t5_embeddings(*t5, *tokenizer, be), full);
    t5->release_buffers();
    std::printf("t5       NF4 (quantised in %.1f s, %.2f GB): cosine %.5f of its 512 embeddings against bf16\n",
                t5_quantize_s, double(t5->weight_bytes()) / 1e9, t5_cosine);
  }
  if (leaves("t5")) t5->offload();
  // Random weights are drawn on the device: a transformer the budget cannot hold is built whole with the cap lifted,
  // then its streamed blocks leave at once (loading a checkpoint reads them into host memory instead).
  const bool streamed = building && building->component("transformer").placement == Placement::Streamed;
  if (streamed) be.set_memory_limit(0);
  auto transformer = std::make_unique<FluxTransformer>(
      fc, fp8_only ? random_flux_weights_fp8(fc, be, 1) : random_flux_weights(fc, be, 1), be);
  if (streamed) {
    transformer->stream_blocks(building->streaming.block_resident, building->streaming.prefetch_depth);
    be.set_memory_limit(budget);
  }
  auto vae = std::make_unique<VaeDecoder>(vc, random_vae_decoder_weights(vc, be, 7), be);
  if (leaves("vae")) vae->offload();
  auto pipe = FluxPipeline::from_components(be, load_tokenizer(tok + "/tokenizer"), load_tokenizer(tok + "/tokenizer_2"),
                                            std::move(clip), std::move(t5), std::move(transformer), std::move(vae),
                                            FlowMatchSchedulerConfig::flux1_dev(), "random FLUX.1-dev pipeline");
  if (o.fp8 && !fp8_only) pipe->transformer().set_fp8(true);
  if (o.fp8_attention) pipe->transformer().set_fp8_attention(true);
  be.synchronize();
  const double build_s = seconds_since(t0);

  std::unique_ptr<LoraController> lora;
  ScratchFiles scratch;  // the adapter file goes when the benchmark does, also on an error
  if (o.lora_rank > 0) {
    const ScratchDirChoice dir = choose_scratch_dir(o.lora_dir, random_lora_data_bytes(fc, o.lora_rank) + (1 << 20));
    const std::string file =
        scratch.add(dir.path + "/fluxswap-e2e-lora-r" + std::to_string(o.lora_rank) + ".safetensors");
    write_random_lora(file, fc, o.lora_rank, 100);
    lora = std::make_unique<LoraController>(pipe->transformer(), lora_mode_from_name(lora_mode), o.lora_rank);
    lora->set_adapters({{std::make_shared<LoraAdapter>(load_lora_adapter(file, fc, be.host_buffer_allocator())),
                         1.0f}});
  }
  // The final plan, from what the device now holds (LoRA included).
  const MemoryPlan* plan = budget ? pipe->set_memory_budget({budget, work}) : nullptr;
  if (plan) std::printf("memory plan  %s\n", plan->to_string().c_str());
  const uint64_t build_peak = be.peak_memory();
  be.reset_peak_memory();

  GenerateParams p;
  p.prompts = {kPrompt};
  p.width = p.height = o.size;
  p.steps = o.steps;
  const uint64_t before_generations = be.memory_in_use();
  const Generations g = time_generations(*pipe, p, o.runs);
  const uint64_t generation_peak = be.peak_memory();
  // What the plan could not measure: buffers the backend makes on first use (FP8 activations, attention scratch,
  // library workspaces) and keeps.
  const int64_t grown = int64_t(be.memory_in_use()) - int64_t(before_generations);
  // (A transformer uploaded per image is off the device on both sides of this: nothing to see.)
  if (plan && plan->component("transformer").placement != Placement::OnDemand)
    std::printf("  memory: %.3f GB held after the generations that were not before them (kept by the backend)\n",
                double(grown) / 1e9);
  // One more generation with device events around every op, to see where a generation goes beyond the steps.
  t0 = Clock::now();
  const nlohmann::json per_op = profile_ops(be, [&] { pipe->generate(p); }, "one generation", 14);
  const double profiled_s = seconds_since(t0);
  const std::string what = std::string(fp8_only ? "FP8-only" : o.fp8 ? "FP8" : "bf16") +
                           (t5_nf4 ? ", NF4 T5" : "") +
                           (o.fp8_attention ? " + FP8 attention" : "") +
                           (o.lora_rank ? ", rank-" + std::to_string(o.lora_rank) + " LoRA " + lora_mode : "") +
                           (budget ? ", --vram " + o.vram : "");
  std::printf("\nend to end (%s): %dx%d, %d steps, FLUX.1-dev-sized RANDOM weights (built in %.1f s), tokenizers "
              "from %s\n  warm-up generation %.2f s; median of %d: %.3f s per image (encode %.1f ms, denoise %.3f s = "
              "%.1f ms/step, decode %.1f ms)\n",
              what.c_str(), o.size, o.size, o.steps, build_s, tok.c_str(), g.first_s, o.runs, median_of(g.total),
              median_of(g.encode) * 1e3, median_of(g.denoise), median_of(g.denoise) * 1e3 / o.steps,
              median_of(g.decode) * 1e3);
  std::printf("  memory: pool peak %.2f GiB while building, %.2f GiB over the generations (the engine's allocator: "
              "every device allocation%s); largest phase on the device (cudaMemGetInfo at the phase's end, CUDA "
              "context and libraries included): %s\n",
              gib(build_peak), gib(generation_peak), budget ? ", capped at the budget" : "",
              largest_phase(g.last).c_str());
  nlohmann::json out = {{"mode", what},
                        {"size", o.size},
                        {"steps", o.steps},
                        {"runs", o.runs},
                        {"first_generation_s", g.first_s},
                        {"seconds_median", median_of(g.total)},
                        {"seconds_all", g.total},
                        {"encode_ms_median", median_of(g.encode) * 1e3},
                        {"denoise_s_median", median_of(g.denoise)},
                        {"decode_ms_median", median_of(g.decode) * 1e3},
                        {"peak_memory_gib", gib(std::max(build_peak, generation_peak))},
                        {"build_peak_memory_gib", gib(build_peak)},
                        {"generation_peak_memory_gib", gib(generation_peak)},
                        {"phase_memory", phase_memory_json(g.last)},
                        {"profiled_generation_s", profiled_s},
                        {"profiled_per_op_ms", per_op}};
  if (t5_nf4) out["t5_nf4"] = {{"cosine_vs_bf16", t5_cosine}, {"quantize_s", t5_quantize_s}};
  if (!budget) return out;

  // The same pipeline with everything resident and no cap: what the budget costs per image.
  out["budget"] = o.vram;
  out["budget_bytes"] = budget;
  out["plan"] = plan->to_string();
  out["grown_by_first_generation_bytes"] = grown;
  out["predicted_peaks_gib"] = {{"encode", gib(plan->encode_peak)},
                                {"denoise", gib(plan->denoise_peak)},
                                {"decode", gib(plan->decode_peak)}};
  const BlockStreamer& streaming = pipe->transformer().streaming();
  const uint64_t streamed_bytes = streaming.bytes_per_forward();
  const size_t streamed_blocks = streaming.streamed_blocks();
  const int depth = streaming.depth();
  pipe->set_memory_budget({});
  be.reset_peak_memory();
  const Generations u = time_generations(*pipe, p, o.runs);
  const double slower = median_of(g.total) / median_of(u.total) - 1.0;
  std::printf("  without the budget (everything resident): %.3f s per image (encode %.1f ms); under --vram %s: "
              "%+.1f%%; pool peak %.2f GiB, largest phase %s\n",
              median_of(u.total), median_of(u.encode) * 1e3, o.vram.c_str(), slower * 100, gib(be.peak_memory()),
              largest_phase(u.last).c_str());
  if (streamed_bytes) {
    // How much of the per-step transfer the compute hides: the copy alone, timed here at the same size from pinned
    // memory, against what streaming added to a step.
    const HostBufferAllocator pinned = be.host_buffer_allocator();
    const uint64_t probe = std::min<uint64_t>(streamed_bytes, 2000000000ull);
    std::shared_ptr<void> host = pinned(probe);
    const Tensor src = Tensor::borrow(host.get(), DType::U8, {int64_t(probe)}, Device::CPU, host);
    const Tensor dst = be.empty(DType::U8, {int64_t(probe)});
    be.copy_from_host_batch({{src, dst}});
    be.synchronize();
    const auto tc = Clock::now();
    be.copy_from_host_batch({{src, dst}});
    be.synchronize();
    const double gbps = double(probe) / seconds_since(tc) / 1e9;
    const double transfer_ms = double(streamed_bytes) / (gbps * 1e9) * 1e3;
    const double step_ms = median_of(g.denoise) * 1e3 / o.steps, resident_ms = median_of(u.denoise) * 1e3 / o.steps;
    const double hidden = std::clamp(1.0 - (step_ms - resident_ms) / transfer_ms, 0.0, 1.0);
    std::printf("  streaming: %zu blocks, %.2f GB per step (prefetch %d) = %.1f ms at %.1f GB/s host->device; step "
                "%.1f ms streamed vs %.1f ms resident: %.0f%% of the transfer hidden behind compute\n",
                streamed_blocks, double(streamed_bytes) / 1e9, depth, transfer_ms, gbps, step_ms, resident_ms,
                hidden * 100);
    out["streaming"] = {{"blocks", streamed_blocks},       {"bytes_per_step", streamed_bytes},
                        {"prefetch_depth", depth},         {"h2d_gb_per_s", gbps},
                        {"transfer_ms_per_step", transfer_ms}, {"step_ms", step_ms},
                        {"resident_step_ms", resident_ms}, {"hidden_fraction", hidden}};
  }
  out["unlimited"] = {{"seconds_median", median_of(u.total)},
                      {"seconds_all", u.total},
                      {"encode_ms_median", median_of(u.encode) * 1e3},
                      {"generation_peak_memory_gib", gib(be.peak_memory())},
                      {"phase_memory", phase_memory_json(u.last)}};
  return out;
}

}  // namespace fluxswap
