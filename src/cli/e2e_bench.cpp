#include "cli/e2e_bench.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <vector>

#include "cli/bench_timing.h"
#include "core/error.h"
#include "lora/lora_controller.h"
#include "lora/random_lora.h"
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

}  // namespace

nlohmann::json bench_end_to_end(Backend& be, const EndToEndOptions& o) {
  if (o.runs < 1) throw Error("--e2e: runs must be at least 1");
  const std::string tok = tokenizer_folder(o.tokenizers);
  if (!std::filesystem::is_directory(tok + "/tokenizer") || !std::filesystem::is_directory(tok + "/tokenizer_2"))
    throw Error("--e2e needs tokenizer/ and tokenizer_2/ in " + tok + " (give a pipeline folder with --tokenizers)");
  auto t0 = Clock::now();
  const FluxConfig fc = FluxConfig::flux1_dev();
  const ClipTextConfig cc = ClipTextConfig::flux1();
  const T5EncoderConfig tc = T5EncoderConfig::flux1();
  const VaeConfig vc = VaeConfig::flux1();
  auto pipe = FluxPipeline::from_components(
      be, load_tokenizer(tok + "/tokenizer"), load_tokenizer(tok + "/tokenizer_2"),
      std::make_unique<ClipTextModel>(cc, random_clip_text_weights(cc, be, 7), be),
      std::make_unique<T5Encoder>(tc, random_t5_encoder_weights(tc, be, 7), be),
      std::make_unique<FluxTransformer>(fc, random_flux_weights(fc, be, 1), be),
      std::make_unique<VaeDecoder>(vc, random_vae_decoder_weights(vc, be, 7), be), FlowMatchSchedulerConfig::flux1_dev(),
      "random FLUX.1-dev pipeline");
  if (o.fp8) pipe->transformer().set_fp8(true);
  if (o.fp8_attention) pipe->transformer().set_fp8_attention(true);
  be.synchronize();
  const double build_s = seconds_since(t0);

  std::unique_ptr<LoraController> lora;
  if (o.lora_rank > 0) {
    const std::string file = o.lora_dir + "/fluxswap-e2e-lora-r" + std::to_string(o.lora_rank) + ".safetensors";
    write_random_lora(file, fc, o.lora_rank, 100);
    lora = std::make_unique<LoraController>(pipe->transformer(), lora_mode_from_name(o.lora_mode), o.lora_rank);
    lora->set_adapters({{std::make_shared<LoraAdapter>(load_lora_adapter(file, fc, be.host_buffer_allocator())),
                         1.0f}});
  }

  GenerateParams p;
  p.prompts = {"a photograph of an astronaut riding a horse on the moon, detailed, golden hour"};
  p.width = p.height = o.size;
  p.steps = o.steps;
  t0 = Clock::now();
  pipe->generate(p);  // warm-up: GEMM plans, attention plans, buffers
  const double first_s = seconds_since(t0);
  std::vector<double> total, encode, denoise, decode;
  for (int i = 0; i < o.runs; ++i) {
    p.seed = uint64_t(i + 1);
    t0 = Clock::now();
    GenerateResult r = pipe->generate(p);
    total.push_back(seconds_since(t0));
    encode.push_back(r.encode_s), denoise.push_back(r.denoise_s), decode.push_back(r.decode_s);
  }
  // One more generation with device events around every op, to see where a generation goes beyond the steps.
  t0 = Clock::now();
  const nlohmann::json per_op = profile_ops(be, [&] { pipe->generate(p); }, "one generation", 14);
  const double profiled_s = seconds_since(t0);
  const std::string what = std::string(o.fp8 ? "FP8" : "bf16") + (o.fp8_attention ? " + FP8 attention" : "") +
                           (o.lora_rank ? ", rank-" + std::to_string(o.lora_rank) + " LoRA " + o.lora_mode : "");
  std::printf("\nend to end (%s): %dx%d, %d steps, FLUX.1-dev-sized RANDOM weights (built in %.1f s), tokenizers "
              "from %s\n  warm-up generation %.2f s; median of %d: %.3f s per image (encode %.1f ms, denoise %.3f s = "
              "%.1f ms/step, decode %.1f ms)\n",
              what.c_str(), o.size, o.size, o.steps, build_s, tok.c_str(), first_s, o.runs, median_of(total),
              median_of(encode) * 1e3, median_of(denoise), median_of(denoise) * 1e3 / o.steps,
              median_of(decode) * 1e3);
  return {{"mode", what},        {"size", o.size},
          {"steps", o.steps},    {"runs", o.runs},
          {"first_generation_s", first_s},
          {"seconds_median", median_of(total)}, {"seconds_all", total},
          {"encode_ms_median", median_of(encode) * 1e3},
          {"denoise_s_median", median_of(denoise)},
          {"decode_ms_median", median_of(decode) * 1e3},
          {"peak_memory_gib", double(be.peak_memory()) / (1ull << 30)},
          {"profiled_generation_s", profiled_s}, {"profiled_per_op_ms", per_op}};
}

}  // namespace fluxswap
