// `fluxswap demo`: the first thing a new user runs. With the golden fixtures beside the checkout it runs the tiny
// FLUX.1-dev-architecture model on the reference inputs and compares with the reference output; without them it
// builds a tiny model with random weights in memory (and says so) and runs it.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>

#include "cli/commands.h"
#include "core/compare.h"
#include "core/error.h"
#include "model/flux_random_weights.h"
#include "model/flux_transformer_io.h"

namespace fluxswap {

namespace {

std::string find_fixtures() {
  if (const char* env = std::getenv("FLUXSWAP_FIXTURES")) return env;
  for (const char* p : {"../shared/fixtures", "../../shared/fixtures"})
    if (std::filesystem::exists(std::string(p) + "/tiny/config.json")) return p;
  return "";
}

FluxHostInputs random_inputs(const FluxConfig& c, int64_t grid_h, int64_t grid_w, int64_t txt) {
  std::mt19937 rng(7);
  std::normal_distribution<float> n(0.0f, 1.0f);
  auto fill = [&](Shape s) {
    Tensor t = Tensor::empty(DType::F32, s);
    for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = n(rng);
    return t;
  };
  FluxHostInputs in;
  in.hidden_states = fill({1, grid_h * grid_w, c.in_channels});
  in.encoder_hidden_states = fill({1, txt, c.joint_attention_dim});
  in.pooled_projections = fill({1, c.pooled_projection_dim});
  in.timestep = Tensor::empty(DType::F32, {1});
  in.timestep.ptr<float>()[0] = 0.75f;
  in.guidance = Tensor::empty(DType::F32, {1});
  in.guidance.ptr<float>()[0] = 3.5f;
  in.img_ids = Tensor::zeros(DType::F32, {grid_h * grid_w, 3});
  for (int64_t r = 0; r < grid_h; ++r)
    for (int64_t col = 0; col < grid_w; ++col) {
      in.img_ids.ptr<float>()[(r * grid_w + col) * 3 + 1] = float(r);
      in.img_ids.ptr<float>()[(r * grid_w + col) * 3 + 2] = float(col);
    }
  in.txt_ids = Tensor::zeros(DType::F32, {txt, 3});
  return in;
}

void print_stats(const Tensor& out) {
  double sum = 0, sq = 0;
  for (int64_t i = 0; i < out.numel(); ++i) {
    sum += out.ptr<float>()[i];
    sq += double(out.ptr<float>()[i]) * out.ptr<float>()[i];
  }
  const double mean = sum / double(out.numel());
  std::printf("output   %s, mean %.4f, std %.4f\n", shape_str(out.shape()).c_str(), mean,
              std::sqrt(sq / double(out.numel()) - mean * mean));
}

void run(const std::string& device) {
  auto backend = make_backend(device);
  const std::string fixtures = find_fixtures();
  const auto t0 = std::chrono::steady_clock::now();
  if (!fixtures.empty()) {
    const std::string dir = fixtures + "/tiny";
    std::printf("demo     tiny FLUX.1-dev-architecture transformer from %s (reference fixtures)\n", dir.c_str());
    FluxCheckpoint ck = open_flux_checkpoint(dir + "/transformer_bfl.safetensors");
    FluxTransformer tr(ck.config, load_flux_weights(ck, *backend), *backend);
    auto goldens = SafetensorsFile::open(dir + "/transformer_goldens.safetensors");
    Tensor out = run_flux_transformer(tr, read_flux_inputs(*goldens));
    print_stats(out);
    const double err = max_rel_error(out, goldens->tensor("out.base"));
    std::printf("check    against the diffusers reference output: max|a-b|/max|b| = %.2g %s\n", err,
                err <= 1e-4 ? "(PASS, tolerance 1e-4)" : "(FAIL, tolerance 1e-4)");
    if (!(err <= 1e-4)) throw Error("the demo output does not match the reference");
  } else {
    std::printf("demo     no fixtures found (../shared/fixtures): running a tiny FLUX transformer with RANDOM "
                "weights made in memory\n");
    const FluxConfig c = FluxConfig::tiny();
    FluxTransformer tr(c, random_flux_weights(c, *backend, 1), *backend);
    print_stats(run_flux_transformer(tr, random_inputs(c, 6, 5, 7)));
  }
  std::printf("time     %.3f s on %s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), backend->name().c_str());
}

}  // namespace

void register_demo_command(CLI::App& app) {
  auto device = std::make_shared<std::string>("cpu");
  CLI::App* cmd = app.add_subcommand("demo", "Run the tiny demo transformer and check it against the reference");
  cmd->add_option("--device", *device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->callback([device] { run(*device); });
}

}  // namespace fluxswap
