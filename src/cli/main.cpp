#include <CLI/CLI.hpp>
#include <cstdio>

#include "cli/commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"fluxswap: FLUX.1 inference with instant LoRA hot-swapping"};
  app.require_subcommand(1);
  fluxswap::register_generate_command(app);
  fluxswap::register_demo_command(app);
  fluxswap::register_transformer_command(app);
  fluxswap::register_bench_command(app);
  fluxswap::register_serve_command(app);
  fluxswap::register_random_model_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const fluxswap::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "internal error: %s\n", e.what());
    return 2;
  }
  return 0;
}
