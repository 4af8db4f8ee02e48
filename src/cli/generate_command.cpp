// `fluxswap generate`: prompt(s) to PNG(s), with LoRAs, a progress line per step and a timing summary. Without
// --model it takes FLUX.1 from the Hugging Face cache when present, else the tiny fixture pipeline (random weights).
#include <algorithm>
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <unistd.h>

#include "cli/commands.h"
#include "core/error.h"
#include "lora/clip_lora.h"
#include "lora/lora_argument.h"
#include "lora/lora_controller.h"
#include "pipeline/flux_pipeline.h"

namespace fluxswap {

namespace {

namespace fsys = std::filesystem;

struct GenerateOptions {
  std::string model, out = "fluxswap.png", device = "auto", lora_mode = "merged", latents;
  std::vector<std::string> prompts, loras;
  GenerateParams params;
  int64_t lora_max_rank = 64;
  int batch = 1;  // images per prompt
  bool fp8 = false, fp8_attention = false;
  std::string vram;  // device memory budget ("24G"; empty: none)
  std::string t5 = "bf16";
};

std::string hf_hub_dir() {
  if (const char* c = std::getenv("HF_HUB_CACHE")) return c;
  if (const char* h = std::getenv("HF_HOME")) return std::string(h) + "/hub";
  if (const char* home = std::getenv("HOME")) return std::string(home) + "/.cache/huggingface/hub";
  return "";
}

// The model a bare `fluxswap generate` uses, and how to describe it.
std::pair<std::string, std::string> default_model() {
  for (const char* repo : {"models--black-forest-labs--FLUX.1-dev", "models--black-forest-labs--FLUX.1-schnell"}) {
    const fsys::path p = fsys::path(hf_hub_dir()) / repo;
    if (!hf_hub_dir().empty() && fsys::is_directory(p / "snapshots")) return {p.string(), "Hugging Face cache"};
  }
  for (const char* p : {"../shared/fixtures/tiny/pipeline", "../../shared/fixtures/tiny/pipeline"})
    if (fsys::exists(fsys::path(p) / "model_index.json"))
      return {p, "the tiny test pipeline (RANDOM weights: the image is noise-like by design)"};
  throw Error("no --model given, no FLUX.1 in the Hugging Face cache (" + hf_hub_dir() +
              "), and no tiny test pipeline in ../shared/fixtures: pass --model DIR");
}

std::string output_path(const std::string& out, size_t index, size_t count) {
  if (count == 1) return out;
  fsys::path p(out);
  return (p.parent_path() / (p.stem().string() + "-" + std::to_string(index) + p.extension().string())).string();
}

void run(GenerateOptions& o) {
  auto backend = make_backend(o.device);
  std::string model = o.model, origin = "--model";
  if (model.empty()) std::tie(model, origin) = default_model();
  std::printf("model    %s (%s)\n", model.c_str(), origin.c_str());
  const auto t0 = std::chrono::steady_clock::now();
  // Under --vram the budget holds from the first allocation: the load is planned (from the configs) before it starts.
  PipelineLoadOptions load;
  load.t5_nf4 = o.t5 == "nf4";
  MemoryBudget& budget = load.budget;
  if (!o.vram.empty()) {
    budget.bytes = parse_memory_budget(o.vram);
    budget.workload.width = o.params.width > 0 ? o.params.width : 1024;
    budget.workload.height = o.params.height > 0 ? o.params.height : 1024;
    budget.workload.batch = int64_t(o.prompts.size()) * o.batch;
    if (o.params.max_sequence_length > 0) budget.workload.text_tokens = o.params.max_sequence_length;
    budget.workload.lora_rank = o.loras.empty() ? 0 : o.lora_max_rank;
  }
  auto pipe = FluxPipeline::from_pretrained(model, *backend, load);
  std::printf("loaded   in %.2f s on %s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), backend->name().c_str());

  if (o.fp8 || o.fp8_attention) {
    pipe->transformer().set_precision(o.fp8 || pipe->transformer().fp8(), o.fp8_attention);
    std::printf("precision %s linears, %s attention\n", pipe->transformer().fp8() ? "FP8 (e4m3)" : "bf16",
                o.fp8_attention ? "FP8 (e4m3)" : "bf16");
  }

  std::unique_ptr<LoraController> lora;
  std::string lora_text;
  if (!o.loras.empty()) {
    if (pipe->transformer().weights().fp8_only && o.lora_mode == "merged") {
      // There is no bf16 base to merge into: the checkpoint's FP8 weights are the base, so LoRAs run as slots.
      std::printf("lora     the transformer checkpoint is FP8: LoRAs run in runtime mode\n");
      o.lora_mode = "runtime";
    }
    std::vector<ActiveLora> active;
    for (const auto& arg : o.loras) {
      LoraArgument a = parse_lora_argument(arg);
      auto adapter = std::make_shared<LoraAdapter>(
          load_lora_adapter(a.path, pipe->transformer().config(), backend->host_buffer_allocator()));
      if (adapter->pairs.empty() && adapter->clip_pairs.empty())
        throw Error(a.path + ": no LoRA tensors for the transformer or the CLIP text encoder (" +
                    std::to_string(adapter->ignored_keys.size()) + " T5 / DoRA-scale tensors, which are not " +
                    "supported): it would change nothing");
      if (!adapter->ignored_keys.empty())
        std::printf("warning  %s: %zu tensors not applied (e.g. '%s'): T5 text-encoder LoRAs and DoRA scales are "
                    "not supported\n",
                    a.path.c_str(), adapter->ignored_keys.size(), adapter->ignored_keys.front().c_str());
      active.push_back({adapter, a.weight});
      lora_text += (lora_text.empty() ? "" : ", ") + fsys::path(a.path).stem().string() + ":" + std::to_string(a.weight);
    }
    // A LoRA on CLIP alone leaves the transformer without slots or base copies.
    if (std::any_of(active.begin(), active.end(), [](const ActiveLora& a) { return !a.adapter->pairs.empty(); }))
      lora = std::make_unique<LoraController>(pipe->transformer(), lora_mode_from_name(o.lora_mode), o.lora_max_rank);
    LoraApplyReport r;
    const ClipLoraReport clip = set_loras_with_clip(pipe->clip(), active, [&] {
      if (lora) r = lora->set_adapters(active);
    });
    std::printf("lora     %zu LoRA tensors applied to %zu transformer layers (%s mode) in %.1f ms", r.tensors,
                r.modules, o.lora_mode.c_str(), r.seconds * 1e3);
    if (clip.pairs) std::printf("; %zu to %zu CLIP text-encoder linears", clip.tensors, clip.linears);
    std::printf("\n");
  }

  GenerateParams p = o.params;
  // Each prompt `batch` times in one batch: the noise differs per image (it is drawn over the whole batch).
  for (const auto& prompt : o.prompts) p.prompts.insert(p.prompts.end(), size_t(o.batch), prompt);

  if (!pipe->is_guidance_distilled()) p.guidance = 0;
  if (!o.latents.empty()) {
    auto f = SafetensorsFile::open(o.latents);
    const std::string key = f->contains("latents") ? "latents" : f->keys().empty() ? "" : f->keys().front();
    if (key.empty()) throw Error(o.latents + ": no tensor in it");
    p.latents = f->tensor(key).to_f32();
  }
  if (budget.bytes) {
    // The final plan, from the loaded sizes with the LoRAs in place and this generation's size.
    budget.workload = pipe->workload_for(p, lora && o.lora_mode == "runtime" ? o.lora_max_rank : 0);
    std::printf("memory   plan: %s\n", pipe->set_memory_budget(budget)->to_string().c_str());
  }
  const bool tty = isatty(fileno(stdout));
  p.on_step = [tty](int i, int n, double s) {
    const int width = 30, done = (i + 1) * width / n;
    std::printf("%sstep %3d/%-3d [%s%s] %7.1f ms%s", tty ? "\r" : "", i + 1, n, std::string(size_t(done), '#').c_str(),
                std::string(size_t(width - done), '.').c_str(), s * 1e3, tty && i + 1 < n ? "" : "\n");
    std::fflush(stdout);
  };
  GenerateResult r = pipe->generate(p);
  for (size_t b = 0; b < r.images.size(); ++b) {
    const std::string path = output_path(o.out, b, r.images.size());
    write_png(path, r.images[b],
              {{"parameters", generation_parameters_text(p.prompts[b], p, r, model_display_name(model), lora_text)}});
    std::printf("wrote    %s (%dx%d)\n", path.c_str(), r.images[b].width, r.images[b].height);
  }
  std::printf("time     text encoders %.2f s, %d steps %.2f s (%.1f ms/step), VAE decode %.2f s\n", r.encode_s, r.steps,
              r.denoise_s, r.denoise_s * 1e3 / r.steps, r.decode_s);
  if (backend->device() == Device::CUDA) {
    // The pool's peak covers loading and generating; the device figures (cudaMemGetInfo, with the CUDA context and
    // libraries) are taken at the end of each phase, its weights and buffers still held.
    const double gib = double(1ull << 30);
    const std::string of_budget = budget.bytes ? ", budget " + format_gb(budget.bytes) : "";
    std::printf("memory   pool peak %.2f GiB (%s)%s; device used at the end of encode %.2f GiB, denoise %.2f GiB, "
                "decode %.2f GiB\n",
                double(backend->peak_memory()) / gib, format_gb(backend->peak_memory()).c_str(), of_budget.c_str(),
                double(r.encode_memory.device) / gib, double(r.denoise_memory.device) / gib,
                double(r.decode_memory.device) / gib);
  }
}

}  // namespace

void register_generate_command(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* cmd = app.add_subcommand("generate", "Generate images from text prompts");
  cmd->add_option("--model", o->model, "diffusers FLUX.1 pipeline folder or Hugging Face cache entry");
  cmd->add_option("--prompt,-p", o->prompts, "prompt (repeat for a batch)")->required();
  cmd->add_option("-o,--out", o->out, "output PNG (batches get -0, -1, ... suffixes)");
  cmd->add_option("--batch", o->batch, "images per prompt, made in one batch")->check(CLI::PositiveNumber);
  cmd->add_option("--width", o->params.width, "pixels, multiple of 16 (default 1024; 128 for the tiny test model)");
  cmd->add_option("--height", o->params.height, "pixels, multiple of 16 (default 1024; 128 for the tiny test model)");
  cmd->add_option("--steps", o->params.steps, "denoising steps (default 28 dev, 4 schnell)");
  cmd->add_option("--guidance", o->params.guidance, "distilled guidance scale (dev models)");
  cmd->add_option("--seed", o->params.seed, "noise seed");
  cmd->add_option("--max-sequence-length", o->params.max_sequence_length, "T5 tokens (default 512 dev, 256 schnell)");
  cmd->add_option("--latents", o->latents, "safetensors file with exact packed initial noise (key 'latents')");
  cmd->add_option("--lora", o->loras, "LoRA file[:weight], repeatable");
  cmd->add_flag("--fp8", o->fp8, "FP8 (e4m3) transformer linears, activations quantised per token (sm_89+)");
  cmd->add_flag("--fp8-attention", o->fp8_attention, "FP8 (e4m3) attention through cuDNN (sm_90+)");
  cmd->add_option("--vram", o->vram,
                  "device memory budget, e.g. 24G or 16GiB: components that do not fit stay in host memory until "
                  "used; exceeding it is an error");
  cmd->add_option("--t5", o->t5, "T5 weights: bf16 (default) or nf4 (quantised while loading: 2.9 GB for T5-XXL)")
      ->check(CLI::IsMember({"bf16", "nf4"}));
  cmd->add_option("--lora-mode", o->lora_mode, "merged (default) or runtime")
      ->check(CLI::IsMember({"merged", "runtime"}));
  cmd->add_option("--lora-max-rank", o->lora_max_rank, "runtime mode: slot rank per projection");
  cmd->add_option("--device", o->device, "auto (default: the GPU when there is one), cuda or cpu")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->callback([o] { run(*o); });
}

}  // namespace fluxswap
