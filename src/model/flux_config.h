#pragma once
// The FLUX transformer's hyper-parameters: read from a diffusers config.json or inferred from tensor shapes.
#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "core/tensor.h"

namespace fluxswap {

struct FluxConfig {
  int64_t in_channels = 64;
  int64_t num_layers = 19;         // double-stream blocks
  int64_t num_single_layers = 38;  // single-stream blocks
  int64_t attention_head_dim = 128;
  int64_t num_attention_heads = 24;
  int64_t joint_attention_dim = 4096;  // T5 hidden size
  int64_t pooled_projection_dim = 768;  // CLIP pooled size
  bool guidance_embeds = true;          // dev: true, schnell: false
  std::array<int64_t, 3> axes_dims_rope = {16, 56, 56};
  float rope_theta = 10000.0f;
  int64_t mlp_ratio = 4;

  int64_t inner_dim() const { return attention_head_dim * num_attention_heads; }
  int64_t mlp_dim() const { return inner_dim() * mlp_ratio; }
  int64_t out_channels() const { return in_channels; }

  static FluxConfig flux1_dev();
  static FluxConfig flux1_schnell();
  // The fixtures' tiny FLUX.1-dev architecture (2+2 blocks, 2 heads of 16): demos and try-outs on a CPU.
  static FluxConfig tiny();

  // Parses a diffusers FluxTransformer2DModel config.json; `path` is for messages.
  static FluxConfig from_json_text(const std::string& text, const std::string& path);
  static FluxConfig from_json_file(const std::string& path);
  std::string to_json() const;

  // Throws Error naming `what` if a value is out of range or inconsistent.
  void validate(const std::string& what) const;
};

enum class FluxNaming { Diffusers, BFL };

// Looks up a tensor's shape by name; nullopt when absent.
using ShapeLookup = std::function<std::optional<Shape>(const std::string&)>;

// Infers the config of a checkpoint from its tensor shapes (single-file checkpoints carry no config).
// RoPE axes are inferable only for FLUX's own 128-wide heads; other head sizes need a config.json.
FluxConfig infer_flux_config(FluxNaming naming, const ShapeLookup& shape_of, const std::string& what);

}  // namespace fluxswap
