// `fluxswap transformer`: one transformer forward on inputs given under the fixture key names, written as `out`.
// Anyone can point it at their own reference outputs; `--check KEY` compares with a tensor of the inputs file.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>

#include "cli/commands.h"
#include "core/compare.h"
#include "core/error.h"
#include "lora/lora_argument.h"
#include "lora/lora_controller.h"
#include "model/flux_transformer_io.h"

namespace fluxswap {

namespace {

struct TransformerOptions {
  std::string model, inputs, out, device = "cpu", check, lora_mode = "merged";
  std::vector<std::string> loras;
  int64_t lora_max_rank = 64;
  double tolerance = 1e-4;
};

void run(const TransformerOptions& o) {
  auto backend = make_backend(o.device);
  const auto t0 = std::chrono::steady_clock::now();
  FluxCheckpoint ck = open_flux_checkpoint(o.model);
  WeightLoadReport report;
  FluxWeights weights = load_flux_weights(ck, *backend, &report);
  const auto t1 = std::chrono::steady_clock::now();
  std::printf("model    %s (%s naming%s%s), config %s\n", ck.weights_path.c_str(),
              ck.naming == FluxNaming::BFL ? "BFL" : "diffusers", ck.prefix.empty() ? "" : ", prefix ",
              ck.prefix.c_str(), ck.config_source.c_str());
  std::printf("weights  %zu tensors, %.1f MB on %s, loaded in %.2f s\n", report.tensors_loaded,
              report.bytes_on_device / 1e6, backend->name().c_str(),
              std::chrono::duration<double>(t1 - t0).count());
  if (!report.unused_keys.empty())
    std::printf("warning  %zu checkpoint tensors were not used, e.g. '%s'\n", report.unused_keys.size(),
                report.unused_keys.front().c_str());

  auto file = SafetensorsFile::open(o.inputs);
  FluxHostInputs in = read_flux_inputs(*file);
  FluxTransformer transformer(ck.config, std::move(weights), *backend);
  std::unique_ptr<LoraController> lora;
  if (!o.loras.empty()) {
    lora = std::make_unique<LoraController>(transformer, lora_mode_from_name(o.lora_mode), o.lora_max_rank);
    std::vector<ActiveLora> active;
    for (const auto& arg : o.loras) {
      LoraArgument a = parse_lora_argument(arg);
      auto adapter =
          std::make_shared<LoraAdapter>(load_lora_adapter(a.path, ck.config, backend->host_buffer_allocator()));
      std::printf("lora     %s: %s format, %zu LoRA tensors -> %zu low-rank updates, weight %g\n", a.path.c_str(),
                  adapter->format.c_str(), adapter->tensors_used, adapter->pairs.size(), double(a.weight));
      const size_t skipped = adapter->clip_tensors_used + adapter->ignored_keys.size();
      if (adapter->pairs.empty())
        throw Error(a.path + ": no transformer LoRA tensors (" + std::to_string(skipped) +
                    " text-encoder or DoRA-scale tensors, which this transformer-only command does not apply): it "
                    "would change nothing");
      if (skipped)
        std::printf("warning  %zu text-encoder or DoRA-scale tensors not applied by this transformer-only command\n",
                    skipped);
      active.push_back({adapter, a.weight});
    }
    LoraApplyReport r = lora->set_adapters(active);
    std::printf("lora     %s mode: %zu LoRA tensors applied to %zu layers in %.1f ms\n", o.lora_mode.c_str(),
                r.tensors, r.modules, r.seconds * 1e3);
  }
  const auto t2 = std::chrono::steady_clock::now();
  Tensor out = run_flux_transformer(transformer, in);
  const auto t3 = std::chrono::steady_clock::now();
  std::printf("forward  batch %lld, %lld image + %lld text tokens in %.3f s\n", (long long)in.hidden_states.size(0),
              (long long)in.hidden_states.size(1), (long long)in.encoder_hidden_states.size(1),
              std::chrono::duration<double>(t3 - t2).count());
  if (!o.out.empty()) {
    write_safetensors(o.out, {{"out", out}});
    std::printf("wrote    %s: out %s F32\n", o.out.c_str(), shape_str(out.shape()).c_str());
  }
  if (!o.check.empty()) {
    if (!file->contains(o.check)) throw Error(o.inputs + ": --check tensor '" + o.check + "' is missing");
    const double err = max_rel_error(out, file->tensor(o.check));
    std::printf("check    %s: max|a-b|/max|b| = %.3g (tolerance %.1g) %s\n", o.check.c_str(), err, o.tolerance,
                err <= o.tolerance ? "PASS" : "FAIL");
    if (!(err <= o.tolerance)) throw Error("output differs from '" + o.check + "' beyond the tolerance");
  }
}

}  // namespace

void register_transformer_command(CLI::App& app) {
  auto opts = std::make_shared<TransformerOptions>();
  CLI::App* cmd = app.add_subcommand("transformer", "Run one transformer forward pass on in.* tensors");
  cmd->add_option("--model", opts->model,
                  "diffusers folder, transformer/ folder, HF cache entry, single .safetensors (diffusers or BFL "
                  "naming) or config.json beside weights")
      ->required();
  cmd->add_option("--inputs", opts->inputs, "safetensors file with in.hidden_states, in.encoder_hidden_states, ...")
      ->required();
  cmd->add_option("--out", opts->out, "where to write the output as tensor 'out' (float32)");
  cmd->add_option("--device", opts->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--check", opts->check, "compare the output with this tensor of the inputs file (e.g. out.base)");
  cmd->add_option("--tolerance", opts->tolerance, "max|a-b|/max|b| allowed by --check");
  cmd->add_option("--lora", opts->loras, "LoRA file[:weight], repeatable (any order)");
  cmd->add_option("--lora-mode", opts->lora_mode, "merged (default) or runtime")
      ->check(CLI::IsMember({"merged", "runtime"}));
  cmd->add_option("--lora-max-rank", opts->lora_max_rank, "runtime mode: slot rank per projection");
  cmd->callback([opts] { run(*opts); });
}

}  // namespace fluxswap
