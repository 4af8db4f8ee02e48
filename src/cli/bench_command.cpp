// `fluxswap bench`: FLUX.1-dev-sized transformer steps on random weights made on the device (same shapes and
// FLOPs as the real model; values never zero). Method: bench/README.md.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/commands.h"
#include "core/error.h"
#include "model/flux_cost.h"
#include "model/flux_random_weights.h"
#include "model/flux_transformer.h"

namespace fluxswap {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

struct BenchOptions {
  std::string device = "cuda", model = "dev", json_out;
  std::vector<int> sizes = {1024};
  int steps = 20, txt_tokens = 512, batch = 1;
  bool profile = true;
};

FluxConfig bench_config(const std::string& model) {
  if (model == "dev") return FluxConfig::flux1_dev();
  if (model == "schnell") return FluxConfig::flux1_schnell();
  if (model == "tiny") return FluxConfig::tiny();  // the fixtures' architecture, for a CPU try-out
  throw Error("--model-size must be dev, schnell or tiny, got '" + model + "'");
}

// Inputs of one step at `size` x `size` pixels: 2x2 packed latents over an 8x-downsampled grid.
FluxInputs make_inputs(Backend& be, const FluxConfig& c, int size, int64_t txt, int64_t batch) {
  if (size % 16) throw Error("--sizes: " + std::to_string(size) + " is not a multiple of 16");
  const int64_t grid = size / 16, ni = grid * grid;
  FluxInputs in;
  const DType dt = be.compute_dtype();
  in.hidden_states = be.empty(dt, {batch, ni, c.in_channels});
  in.encoder_hidden_states = be.empty(dt, {batch, txt, c.joint_attention_dim});
  in.pooled_projections = be.empty(dt, {batch, c.pooled_projection_dim});
  be.fill_normal(in.hidden_states, 11, 0.0f, 1.0f);
  be.fill_normal(in.encoder_hidden_states, 12, 0.0f, 1.0f);
  be.fill_normal(in.pooled_projections, 13, 0.0f, 1.0f);
  Tensor t = Tensor::empty(DType::F32, {batch}), g = Tensor::empty(DType::F32, {batch});
  for (int64_t b = 0; b < batch; ++b) {
    t.ptr<float>()[b] = 0.9f;
    g.ptr<float>()[b] = 3.5f;
  }
  in.timestep = be.empty(DType::F32, {batch});
  be.copy_from_host(t, in.timestep);
  if (c.guidance_embeds) {
    in.guidance = be.empty(DType::F32, {batch});
    be.copy_from_host(g, in.guidance);
  }
  Tensor img_ids = Tensor::zeros(DType::F32, {ni, 3}), txt_ids = Tensor::zeros(DType::F32, {txt, 3});
  for (int64_t i = 0; i < ni; ++i) {
    img_ids.ptr<float>()[i * 3 + 1] = float(i / grid);
    img_ids.ptr<float>()[i * 3 + 2] = float(i % grid);
  }
  Tensor rope = flux_rope_table(c, txt_ids, img_ids);
  in.rope = be.empty(DType::F32, rope.shape());
  be.copy_from_host(rope, in.rope);
  return in;
}

nlohmann::json bench_size(FluxTransformer& tr, int size, const BenchOptions& o) {
  Backend& be = tr.backend();
  const FluxConfig& c = tr.config();
  FluxInputs in = make_inputs(be, c, size, o.txt_tokens, o.batch);
  const int64_t ni = in.hidden_states.size(1);
  Tensor out = be.empty(be.compute_dtype(), {int64_t(o.batch), ni, c.out_channels()});

  auto t0 = Clock::now();
  tr.forward(in, out);  // first eager step: allocates buffers, picks GEMM algorithms, builds attention plans
  be.synchronize();
  const double first_step_s = seconds_since(t0);
  t0 = Clock::now();
  auto graph = be.record([&] { tr.forward(in, out); });
  be.synchronize();
  const double capture_s = seconds_since(t0);

  for (int i = 0; i < 3; ++i) graph->replay();
  be.synchronize();
  std::vector<double> ms;
  for (int i = 0; i < o.steps; ++i) {
    t0 = Clock::now();
    graph->replay();
    be.synchronize();
    ms.push_back(seconds_since(t0) * 1e3);
  }
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted[sorted.size() / 2];
  const FluxStepCost cost = flux_step_cost(c, o.batch, ni, o.txt_tokens);

  nlohmann::json r = {{"size", size},
                      {"image_tokens", ni},
                      {"text_tokens", o.txt_tokens},
                      {"batch", o.batch},
                      {"first_eager_step_s", first_step_s},
                      {"graph_capture_s", capture_s},
                      {"ms_per_step_median", median},
                      {"ms_per_step_min", sorted.front()},
                      {"ms_per_step_max", sorted.back()},
                      {"tflop_per_step", cost.total_flops() / 1e12},
                      {"tflops_achieved", cost.total_flops() / (median * 1e-3) / 1e12},
                      {"peak_memory_gib", double(be.peak_memory()) / (1ull << 30)}};
  std::printf("\n%dx%d: %lld image + %d text tokens, batch %d, %.1f TFLOP/step (linear %.1f, attention %.1f)\n",
              size, size, (long long)ni, o.txt_tokens, o.batch, cost.total_flops() / 1e12, cost.linear_flops / 1e12,
              cost.attention_flops / 1e12);
  std::printf("  first eager step %.2f s, graph capture %.2f s\n", first_step_s, capture_s);
  std::printf("  ms/step  median %.2f  (min %.2f, max %.2f over %d replays)  ->  %.0f TFLOP/s\n", median,
              sorted.front(), sorted.back(), o.steps, cost.total_flops() / (median * 1e-3) / 1e12);

  if (o.profile) {
    be.set_profiling(true);
    tr.forward(in, out);
    be.synchronize();
    auto prof = be.profile_ms();
    be.set_profiling(false);
    double total = 0;
    for (auto& [k, v] : prof) total += v;
    std::vector<std::pair<double, std::string>> rows;
    for (auto& [k, v] : prof) rows.push_back({v, k});
    std::sort(rows.rbegin(), rows.rend());
    std::printf("  per-op (one eager step, device-timed):");
    for (auto& [v, k] : rows) {
      std::printf("  %s %.2f ms (%.0f%%)", k.c_str(), v, 100.0 * v / total);
      r["per_op_ms"][k] = v;
    }
    std::printf("\n");
  }
  std::printf("  peak device memory %.2f GiB\n", double(be.peak_memory()) / (1ull << 30));
  return r;
}

void run(const BenchOptions& o) {
  auto backend = make_backend(o.device);
  const FluxConfig c = bench_config(o.model);
  auto t0 = Clock::now();
  FluxTransformer tr(c, random_flux_weights(c, *backend, 1), *backend);
  backend->synchronize();
  const FluxStepCost cost = flux_step_cost(c, 1, 4096, 512);
  std::printf("device   %s\n", backend->name().c_str());
  std::printf("model    FLUX.1-%s-shaped transformer, RANDOM weights made on the device: %.2f B parameters "
              "(%.1f GB in %s) in %.1f s\n",
              o.model.c_str(), cost.weight_params / 1e9,
              cost.weight_params * double(dtype_size(backend->compute_dtype())) / 1e9,
              std::string(dtype_name(backend->compute_dtype())).c_str(), seconds_since(t0));
  nlohmann::json all = {{"device", backend->name()}, {"model", o.model}, {"results", nlohmann::json::array()}};
  for (int size : o.sizes) all["results"].push_back(bench_size(tr, size, o));
  if (!o.json_out.empty()) {
    std::ofstream(o.json_out) << all.dump(1) << "\n";
    std::printf("\nwrote %s\n", o.json_out.c_str());
  }
}

}  // namespace

void register_bench_command(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* cmd = app.add_subcommand("bench", "Time transformer steps on FLUX.1-sized random weights");
  cmd->add_option("--device", o->device, "cuda (default) or cpu")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--model-size", o->model, "dev (default), schnell, or tiny (for a CPU try-out)");
  cmd->add_option("--sizes", o->sizes, "image sizes in pixels (square), e.g. 512 1024 1536")->delimiter(',');
  cmd->add_option("--steps", o->steps, "timed graph replays per size (median reported)")->check(CLI::PositiveNumber);
  cmd->add_option("--text-tokens", o->txt_tokens, "T5 tokens (512 for dev, 256 for schnell)");
  cmd->add_option("--batch", o->batch, "images per step")->check(CLI::PositiveNumber);
  cmd->add_flag("!--no-profile", o->profile, "skip the per-op breakdown");
  cmd->add_option("--json", o->json_out, "also write the results as JSON here");
  cmd->callback([o] { run(*o); });
}

}  // namespace fluxswap
