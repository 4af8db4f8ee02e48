#pragma once
// Everything `fluxswap serve` can be told on its command line, with the defaults the server runs with.
#include <cstddef>
#include <cstdint>
#include <string>

namespace fluxswap {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;  // 0: any free port (ImageServer::port() says which)
  std::string model;
  std::string device = "auto";  // auto | cpu | cuda
  std::string lora_mode = "merged";
  int64_t lora_max_rank = 64;
  std::string lora_dir;  // empty: no LoRAs can be named
  bool fp8 = false, fp8_attention = false;  // FluxTransformer::set_precision

  size_t queue_size = 16;  // requests waiting (the one being generated is not counted)
  size_t lora_cache = 8;   // parsed adapters kept on the host (and uploaded ones kept on the device)
  double timeout_s = 300;  // arrival to answer; a request may ask for less
  int64_t max_pixels = 2048 * 1024;
  int max_steps = 50;
  int max_n = 4;
  size_t max_body_bytes = 1 << 20;
  // How many later requests may be served ahead of a waiting one because they share the loaded adapter set.
  int max_bypass = 4;
};

}  // namespace fluxswap
