#pragma once
// `fluxswap serve`: an HTTP/1.1 JSON API over one resident FLUX pipeline (routes and their contracts in
// docs/SERVER.md). Handler threads parse, validate and queue requests and wait for their job; one worker thread
// owns the model (generation_worker.h).
#include <functional>
#include <memory>
#include <string>

#include "server/server_options.h"

namespace fluxswap {

class Backend;

class ImageServer {
 public:
  // `make_backend` overrides options.device (tests pass the CPU reference).
  explicit ImageServer(const ServerOptions& options,
                       std::function<std::unique_ptr<Backend>()> make_backend = nullptr);
  ~ImageServer();  // stop()
  ImageServer(const ImageServer&) = delete;
  ImageServer& operator=(const ImageServer&) = delete;

  // Binds (port 0: a free one), starts listening and loading the model; returns the port. Throws Error when the
  // address cannot be bound. /health answers at once, /ready once the model is loaded.
  int start();
  // Blocks until the model is loaded (true) or failed to load (false; load_error() says why) or timeout_s passes.
  bool wait_ready(double timeout_s);
  bool load_failed() const;
  std::string load_error() const;
  // Stops accepting, answers waiting requests with 503, stops the running generation, joins every thread.
  void stop();

  int port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fluxswap
