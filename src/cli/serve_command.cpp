// `fluxswap serve`: the HTTP server (src/server, API in docs/SERVER.md) in the foreground until SIGINT/SIGTERM.
// It prints "listening on http://HOST:PORT" as soon as the port is bound (port 0: the one the system picked),
// then "ready" once the model is loaded; a model that fails to load ends the command with the error.
#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdio>
#include <ctime>

#include "cli/commands.h"
#include "core/error.h"
#include "server/http_server.h"

namespace fluxswap {

namespace {

// Waits for SIGINT or SIGTERM for up to `seconds`; true when one came. The signals are blocked in every thread
// (the mask is set before the server starts its threads, which inherit it), so only this wait sees them.
bool wait_for_signal(double seconds) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  timespec ts{time_t(seconds), long((seconds - double(time_t(seconds))) * 1e9)};
  return sigtimedwait(&set, nullptr, &ts) > 0;
}

void run(const ServerOptions& o) {
  if (o.model.empty()) throw Error("serve: --model is required");
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  ImageServer server(o);
  const int port = server.start();
  std::printf("listening on http://%s:%d\n", o.host.c_str(), port);
  std::printf("model    %s loading\n", o.model.c_str());
  std::fflush(stdout);
  bool signalled = false;
  while (!server.wait_ready(0.05) && !server.load_failed())
    if (wait_for_signal(0.05)) {
      signalled = true;
      break;
    }
  if (server.load_failed()) {
    server.stop();
    throw Error("serve: the model did not load: " + server.load_error());
  }
  if (!signalled) {
    std::printf("ready\n");
    std::fflush(stdout);
    while (!wait_for_signal(3600)) {
    }
  }
  std::printf("stopping\n");
  std::fflush(stdout);
  server.stop();
}

}  // namespace

void register_serve_command(CLI::App& app) {
  auto o = std::make_shared<ServerOptions>();
  CLI::App* cmd = app.add_subcommand("serve", "Serve text-to-image over HTTP (OpenAI Images API + LoRAs)");
  cmd->add_option("--model", o->model, "diffusers FLUX.1 pipeline folder or Hugging Face cache entry")->required();
  cmd->add_option("--host", o->host, "address to listen on (default 127.0.0.1)");
  cmd->add_option("--port", o->port, "port (default 8080; 0: any free port, printed)")->check(CLI::Range(0, 65535));
  cmd->add_option("--device", o->device, "auto (default: the GPU when there is one), cuda or cpu")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->add_option("--lora-dir", o->lora_dir, "directory whose *.safetensors files clients may name as LoRAs");
  cmd->add_option("--lora-mode", o->lora_mode, "merged (default) or runtime")
      ->check(CLI::IsMember({"merged", "runtime"}));
  cmd->add_option("--lora-max-rank", o->lora_max_rank, "runtime mode: slot rank per projection (default 64)");
  cmd->add_flag("--fp8", o->fp8, "FP8 (e4m3) transformer linears, activations quantised per token (sm_89+)");
  cmd->add_flag("--fp8-attention", o->fp8_attention, "FP8 (e4m3) attention through cuDNN (sm_90+)");
  cmd->add_option("--lora-cache", o->lora_cache, "parsed adapters kept in memory, LRU (default 8)");
  cmd->add_option("--queue-size", o->queue_size, "requests that may wait; more get 429 (default 16)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--timeout-s", o->timeout_s, "seconds from arrival to answer before 504 (default 300)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-pixels", o->max_pixels, "largest width x height (default 2097152)")->check(CLI::PositiveNumber);
  cmd->add_option("--max-steps", o->max_steps, "most denoising steps a request may ask for (default 50)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-n", o->max_n, "most images per request (default 4)")->check(CLI::PositiveNumber);
  cmd->add_option("--max-body-bytes", o->max_body_bytes, "largest request body; more gets 413 (default 1048576)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-bypass", o->max_bypass,
                  "times a request may be passed over for one sharing the loaded LoRAs (default 4)")
      ->check(CLI::NonNegativeNumber);
  cmd->callback([o] { run(*o); });
}

}  // namespace fluxswap
