#pragma once
// Each subcommand of the `fluxswap` executable registers itself on the CLI11 app.
namespace CLI {
class App;
}

namespace fluxswap {

void register_transformer_command(CLI::App& app);
void register_demo_command(CLI::App& app);
void register_bench_command(CLI::App& app);
void register_generate_command(CLI::App& app);
void register_serve_command(CLI::App& app);
void register_random_model_command(CLI::App& app);

}  // namespace fluxswap
