#pragma once
// Name translation for LoRA files: which internal (BFL, fused) module and rows a file's key stem targets, for
// every supported naming. Module names are looked up in tables built from the model's own weight map, never
// rewritten by string substitution, so an underscore-joined kohya name can only resolve to a module that exists.
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "model/flux_config.h"
#include "model/flux_weight_map.h"

namespace fluxswap {

enum class LoraFormat { Peft, Kohya, ComfyUI, OneTrainer, XLabs, BflLora, FalKontext };

// The spelling LoraAdapter::format uses.
const char* lora_format_name(LoraFormat f);

// Up's rows [src_row, src_row + rows) land on internal rows [row, row + rows).
struct LoraRowBlock {
  int64_t row = 0;
  int64_t rows = 0;
  int64_t src_row = 0;
};

// Where one down/up pair of a file lands: internal rows [row, row + rows) of `module`, whose input width is
// `in_features`. `blocks` tile that range; there is more than one only when the source orders its rows
// differently (diffusers' norm_out.linear stores (scale, shift), the internal layout (shift, scale)).
struct LoraTarget {
  std::string module;
  int64_t row = 0;
  int64_t rows = 0;
  int64_t in_features = 0;
  std::vector<LoraRowBlock> blocks;
  std::string diffusers_module;  // the diffusers name for PEFT/OneTrainer stems (PEFT rank/alpha patterns use it)
};

class LoraKeyMapper {
 public:
  explicit LoraKeyMapper(const FluxConfig& config);
  // One per architecture, made once (~1 ms of tables) and shared: every LoRA parse of a swap needs it. Thread-safe.
  static std::shared_ptr<const LoraKeyMapper> for_config(const FluxConfig& config);

  // The target of the key stem `stem` (the key without its `.lora_down.weight`-style suffix) in a file of
  // `format`; nullopt when the stem names no module of this model in that naming.
  std::optional<LoraTarget> target(LoraFormat format, const std::string& stem) const;

  // Whether `name` (after removing any LoRA-file prefix) is an RMSNorm scale, in BFL or diffusers naming: a
  // full replacement tensor, which BFL Control LoRAs carry.
  bool is_norm_scale(const std::string& name) const;
  bool is_bfl_module(const std::string& name) const { return modules_.count(name) != 0; }

 private:
  struct Linear {
    int64_t out = 0;
    int64_t in = 0;
  };

  std::optional<LoraTarget> whole_module(const std::string& module) const;
  std::optional<LoraTarget> diffusers_module(const std::string& name) const;
  std::optional<LoraTarget> kohya_module(const std::string& underscored) const;
  std::optional<LoraTarget> xlabs_module(const std::string& name) const;

  int64_t inner_dim_ = 0;
  std::map<std::string, Linear> modules_;                      // internal linear modules
  std::map<std::string, std::vector<ModuleAlias>> diffusers_;  // diffusers module -> its internal rows
  std::map<std::string, std::string> kohya_names_;             // "double_blocks_0_img_attn_qkv" -> module
  std::map<std::string, std::string> onetrainer_names_;        // "transformer_blocks_0_attn_to_q" -> diffusers
  std::set<std::string> norm_scales_;                          // both namings
};

}  // namespace fluxswap
