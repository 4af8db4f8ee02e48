// `fluxswap make-random-model`: a complete diffusers FLUX.1 pipeline folder with random weights, at FLUX.1-dev or
// -schnell size (~34 GB) or tiny, for measuring what real weights on disk cost (time to first image from process
// start) without downloading them. Every file is one the real loaders read: `fluxswap generate --model DIR` runs
// it. The weights are generated and written tensor by tensor on all cores (model/random_checkpoint.h), never held
// in memory whole.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "cli/commands.h"
#include "core/error.h"
#include "model/random_pipeline_files.h"
#include "pipeline/flow_match_scheduler.h"

namespace fluxswap {

namespace {

namespace fsys = std::filesystem;

struct RandomModelOptions {
  std::string out, size = "dev", transformer_dtype = "bf16", tokenizers;
  uint64_t seed = 0;
  unsigned threads = 0;
  bool evict = false;
};

// The Hugging Face libraries' default shard sizes, which FLUX.1-dev's folders follow (transformer in 3 files, T5-XXL
// in 2), so that loading reads the same file layout.
constexpr uint64_t kTransformerShardBytes = 10'000'000'000ull, kT5ShardBytes = 5'000'000'000ull;

struct PipelineConfigs {
  FluxConfig transformer;
  ClipTextConfig clip;
  T5EncoderConfig t5;
  VaeConfig vae;
  FlowMatchSchedulerConfig scheduler;
};

PipelineConfigs configs_for(const std::string& size) {
  PipelineConfigs c{FluxConfig::flux1_dev(), ClipTextConfig::flux1(), T5EncoderConfig::flux1(), VaeConfig::flux1(),
                    FlowMatchSchedulerConfig::flux1_dev()};
  if (size == "schnell") {
    c.transformer = FluxConfig::flux1_schnell();
    c.scheduler = FlowMatchSchedulerConfig::flux1_schnell();
  } else if (size == "tiny") {
    // The fixtures' tiny pipeline: text widths matching FluxConfig::tiny(), a 2x VAE with 4 latent channels. The
    // vocabularies stay full size (a few MB here) so that any CLIP or T5 tokenizer's ids fit.
    c.transformer = FluxConfig::tiny();
    c.clip.hidden_size = c.transformer.pooled_projection_dim;
    c.clip.intermediate_size = 37;
    c.clip.num_attention_heads = 4;
    c.clip.num_hidden_layers = 2;
    c.t5.d_model = c.transformer.joint_attention_dim;
    c.t5.d_kv = 8;
    c.t5.num_heads = 4;
    c.t5.d_ff = 48;
    c.t5.num_layers = 2;
    c.vae.block_out_channels = {8, 16};
    c.vae.layers_per_block = 1;
    c.vae.norm_num_groups = 4;
    c.vae.latent_channels = c.transformer.in_channels / 4;
  }
  return c;
}

std::string scheduler_config_json(const FlowMatchSchedulerConfig& c) {
  return nlohmann::json{{"_class_name", "FlowMatchEulerDiscreteScheduler"},
                        {"num_train_timesteps", c.num_train_timesteps},
                        {"shift", c.shift},
                        {"use_dynamic_shifting", c.use_dynamic_shifting},
                        {"base_shift", c.base_shift},
                        {"max_shift", c.max_shift},
                        {"base_image_seq_len", c.base_image_seq_len},
                        {"max_image_seq_len", c.max_image_seq_len}}
      .dump(2);
}

std::string model_index_json() {
  return nlohmann::json{{"_class_name", "FluxPipeline"},
                        {"scheduler", {"diffusers", "FlowMatchEulerDiscreteScheduler"}},
                        {"text_encoder", {"transformers", "CLIPTextModel"}},
                        {"text_encoder_2", {"transformers", "T5EncoderModel"}},
                        {"tokenizer", {"transformers", "CLIPTokenizer"}},
                        {"tokenizer_2", {"transformers", "T5TokenizerFast"}},
                        {"transformer", {"diffusers", "FluxTransformer2DModel"}},
                        {"vae", {"diffusers", "AutoencoderKL"}}}
      .dump(2);
}

void write_text(const fsys::path& path, const std::string& text) {
  fsys::create_directories(path.parent_path());
  std::ofstream out(path);
  out << text << "\n";
  if (!out) throw Error(path.string() + ": cannot write");
}

// A pipeline folder to take tokenizer/ and tokenizer_2/ from: the one given, else the fixtures' tiny pipeline (the
// real CLIP vocabulary and a small T5 one), found as `fluxswap demo` finds the fixtures.
fsys::path tokenizer_source(const std::string& given) {
  std::vector<fsys::path> candidates;
  if (!given.empty()) {
    candidates.push_back(given);
  } else {
    if (const char* env = std::getenv("FLUXSWAP_FIXTURES")) candidates.push_back(fsys::path(env) / "tiny/pipeline");
    for (const char* p : {"../shared/fixtures/tiny/pipeline", "../../shared/fixtures/tiny/pipeline"})
      candidates.push_back(p);
  }
  for (const auto& c : candidates)
    if (fsys::is_directory(c / "tokenizer") && fsys::is_directory(c / "tokenizer_2")) return c;
  if (!given.empty())
    throw Error(given + ": --tokenizers must be a pipeline folder with tokenizer/ and tokenizer_2/ folders");
  throw Error("no --tokenizers given and no fixture pipeline found (FLUXSWAP_FIXTURES or ../shared/fixtures): pass "
              "--tokenizers with a FLUX.1 pipeline folder (it needs tokenizer/ and tokenizer_2/)");
}

std::string size_text(uint64_t bytes) {
  char buf[32];
  if (bytes >= 100'000'000)
    std::snprintf(buf, sizeof buf, "%.2f GB", double(bytes) / 1e9);
  else
    std::snprintf(buf, sizeof buf, "%.2f MB", double(bytes) / 1e6);
  return buf;
}

struct Component {
  const char* folder;
  std::string what, config;
  std::string stem;  // of the weights files
  std::vector<RandomTensor> tensors;
  uint64_t shard_bytes = UINT64_MAX;
};

std::vector<Component> components_for(const RandomModelOptions& o, const PipelineConfigs& c) {
  std::vector<Component> out;
  out.push_back({"text_encoder", "CLIP-L text model", clip_text_config_json(c.clip), "model",
                 clip_text_random_tensors(c.clip)});
  out.push_back({"text_encoder_2", "T5 encoder", t5_encoder_config_json(c.t5), "model",
                 t5_encoder_random_tensors(c.t5), kT5ShardBytes});
  if (o.transformer_dtype == "fp8")
    out.push_back({"transformer", "FLUX transformer, one scaled-fp8 file", c.transformer.to_json(),
                   "flux1-" + o.size + "-fp8", flux_transformer_random_tensors(c.transformer, FluxNaming::BFL, true)});
  else
    out.push_back({"transformer", "FLUX transformer, bf16", c.transformer.to_json(), "diffusion_pytorch_model",
                   flux_transformer_random_tensors(c.transformer, FluxNaming::Diffusers, false),
                   kTransformerShardBytes});
  out.push_back({"vae", "VAE decoder", vae_config_json(c.vae), "diffusion_pytorch_model",
                 vae_decoder_random_tensors(c.vae)});
  return out;
}

void run(const RandomModelOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  const fsys::path out(o.out);
  if (fsys::exists(out) && !(fsys::is_directory(out) && fsys::is_empty(out)))
    throw Error(o.out + ": exists and is not an empty folder; choose a new one");
  const fsys::path tokenizers = tokenizer_source(o.tokenizers);
  const std::vector<Component> components = components_for(o, configs_for(o.size));

  uint64_t planned = 0;
  for (const auto& comp : components) {
    uint64_t bytes = 0;
    for (const auto& t : comp.tensors) bytes += random_tensor_bytes(t);
    std::printf("plan     %-15s %-38s %10s\n", comp.folder, comp.what.c_str(), size_text(bytes).c_str());
    planned += bytes;
  }
  fsys::create_directories(out);
  const uint64_t available = fsys::space(out).available;
  if (planned > available)
    throw Error(o.out + ": the weights need " + size_text(planned) + ", the disk has " + size_text(available) +
                " free");

  std::vector<RandomCheckpointFile> files;
  for (const auto& comp : components) {
    fsys::create_directories(out / comp.folder);
    write_text(out / comp.folder / "config.json", comp.config);
    auto f = plan_random_checkpoint((out / comp.folder).string(), comp.stem, comp.tensors, comp.shard_bytes);
    files.insert(files.end(), f.begin(), f.end());
  }
  write_text(out / "model_index.json", model_index_json());
  write_text(out / "scheduler" / "scheduler_config.json", scheduler_config_json(configs_for(o.size).scheduler));
  for (const char* t : {"tokenizer", "tokenizer_2"}) fsys::copy(tokenizers / t, out / t, fsys::copy_options::recursive);
  std::printf("tokens   tokenizer/ and tokenizer_2/ from %s\n", tokenizers.string().c_str());

  const bool tty = isatty(fileno(stdout));
  const auto t_write = std::chrono::steady_clock::now();
  RandomWriteOptions w;
  w.seed = o.seed;
  w.threads = o.threads;
  w.evict = o.evict;
  w.progress = [&](uint64_t done, uint64_t total) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_write).count();
    const double rate = s > 0 ? double(done) / s : 0;
    std::printf("%swrite    %s / %s, %.2f GB/s, %.0f s left%s", tty ? "\r" : "", size_text(done).c_str(),
                size_text(total).c_str(), rate / 1e9, rate > 0 ? double(total - done) / rate : 0.0,
                tty && done < total ? "" : "\n");
    std::fflush(stdout);
  };
  const uint64_t bytes = write_random_checkpoints(files, w);
  const double write_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_write).count();
  std::printf("wrote    %s: %s in %zu weights files, %.1f s (%.2f GB/s)%s; %.1f s in all\n", o.out.c_str(),
              size_text(bytes).c_str(), files.size(), write_s, double(bytes) / 1e9 / write_s,
              o.evict ? ", written through and dropped from the page cache" : "",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  std::printf("try      fluxswap generate --model %s -p \"a photo of a cat\"\n", o.out.c_str());
}

}  // namespace

void register_random_model_command(CLI::App& app) {
  auto o = std::make_shared<RandomModelOptions>();
  CLI::App* cmd = app.add_subcommand(
      "make-random-model", "Write a diffusers FLUX.1 pipeline folder with random weights (load-time measurements)");
  cmd->add_option("--out", o->out, "new folder to create")->required();
  cmd->add_option("--size", o->size, "dev (default; ~34 GB), schnell, or tiny (the test fixtures' shapes)")
      ->check(CLI::IsMember({"dev", "schnell", "tiny"}));
  cmd->add_option("--transformer-dtype", o->transformer_dtype,
                  "bf16 (default; diffusers names, sharded like FLUX.1-dev) or fp8 (one ComfyUI scaled-fp8 file)")
      ->check(CLI::IsMember({"bf16", "fp8"}));
  cmd->add_option("--seed", o->seed, "seed of the random values (default 0)");
  cmd->add_option("--tokenizers", o->tokenizers,
                  "pipeline folder to copy tokenizer/ and tokenizer_2/ from (default: the fixtures' tiny pipeline)");
  cmd->add_option("--threads", o->threads, "generator threads (default: every core)");
  cmd->add_flag("--evict-page-cache", o->evict,
                "write each file through to disk and drop it from the page cache, so the first load reads the disk");
  cmd->callback([o] { run(*o); });
}

}  // namespace fluxswap
