#include "lora/lora_key_mapping.h"

#include <algorithm>
#include <mutex>
#include <string_view>

#include "core/error.h"

namespace fluxswap {

namespace {

std::string underscored(std::string s) {
  std::replace(s.begin(), s.end(), '.', '_');
  return s;
}

// Prefixes that wrap dotted module paths in LoRA files (fal Kontext, ComfyUI, PEFT).
constexpr std::string_view kDottedPrefixes[] = {"base_model.model.", "diffusion_model.", "transformer."};

}  // namespace

const char* lora_format_name(LoraFormat f) {
  switch (f) {
    case LoraFormat::Peft: return "peft";
    case LoraFormat::Kohya: return "kohya";
    case LoraFormat::ComfyUI: return "comfyui";
    case LoraFormat::OneTrainer: return "onetrainer";
    case LoraFormat::XLabs: return "xlabs";
    case LoraFormat::BflLora: return "bfl-lora";
    case LoraFormat::FalKontext: return "fal-kontext";
  }
  return "?";
}

std::shared_ptr<const LoraKeyMapper> LoraKeyMapper::for_config(const FluxConfig& config) {
  static std::mutex mutex;
  static std::map<std::string, std::shared_ptr<const LoraKeyMapper>> made;  // by the config's JSON
  const std::string key = config.to_json();
  std::lock_guard<std::mutex> lock(mutex);
  auto& m = made[key];
  if (!m) m = std::make_shared<const LoraKeyMapper>(config);
  return m;
}

LoraKeyMapper::LoraKeyMapper(const FluxConfig& config) : inner_dim_(config.inner_dim()) {
  for (const auto& spec : flux_weight_specs(config, FluxNaming::BFL)) {
    if (spec.shape.size() == 2 && spec.name.ends_with(".weight")) {
      const std::string module = spec.name.substr(0, spec.name.size() - 7);
      modules_[module] = {spec.shape[0], spec.shape[1]};
      kohya_names_[underscored(module)] = module;
    } else if (spec.shape.size() == 1 && spec.name.ends_with(".scale")) {
      norm_scales_.insert(spec.name);
    }
  }
  for (const auto& spec : flux_weight_specs(config, FluxNaming::Diffusers))
    if (norm_scales_.count(spec.name))
      for (const auto& part : spec.parts) norm_scales_.insert(part.key);
  for (const auto& alias : flux_diffusers_aliases(config)) {
    diffusers_[alias.source].push_back(alias);
    onetrainer_names_[underscored(alias.source)] = alias.source;
  }
  // Both tables must be one-to-one for the lookup to be unambiguous; FLUX's names are, but check once here
  // rather than mis-place a LoRA if the weight map ever grows a colliding name.
  if (kohya_names_.size() != modules_.size() || onetrainer_names_.size() != diffusers_.size())
    throw Error("LoRA key mapping: two FLUX module names collide once dots become underscores");
}

bool LoraKeyMapper::is_norm_scale(const std::string& name) const {
  if (norm_scales_.count(name)) return true;
  for (std::string_view p : kDottedPrefixes)
    if (name.starts_with(p) && norm_scales_.count(name.substr(p.size()))) return true;
  return false;
}

std::optional<LoraTarget> LoraKeyMapper::whole_module(const std::string& module) const {
  auto it = modules_.find(module);
  if (it == modules_.end()) return std::nullopt;
  const Linear& l = it->second;
  return LoraTarget{module, 0, l.out, l.in, {{0, l.out, 0}}, ""};
}

std::optional<LoraTarget> LoraKeyMapper::diffusers_module(const std::string& name) const {
  auto it = diffusers_.find(name);
  if (it == diffusers_.end()) return std::nullopt;
  // A diffusers module maps onto one contiguous row range of one internal module (the alias table is built
  // that way), possibly in several blocks when the row order differs.
  const auto& aliases = it->second;
  LoraTarget t;
  t.module = aliases.front().module;
  t.row = aliases.front().row;
  t.in_features = modules_.at(t.module).in;
  t.diffusers_module = name;
  for (const auto& a : aliases) {
    t.row = std::min(t.row, a.row);
    t.rows += a.rows;
    t.blocks.push_back({a.row, a.rows, a.src_row});
  }
  return t;
}

std::optional<LoraTarget> LoraKeyMapper::kohya_module(const std::string& underscored_name) const {
  // Extracted LoRAs carry the wrapper of the checkpoint they came from ("model_diffusion_model_..."): peel
  // whole wrapper words only while the remainder is not yet a module name.
  std::string rest = underscored_name;
  for (;;) {
    auto it = kohya_names_.find(rest);
    if (it != kohya_names_.end()) return whole_module(it->second);
    if (rest.starts_with("model_")) {
      rest = rest.substr(6);
    } else if (rest.starts_with("diffusion_model_")) {
      rest = rest.substr(16);
    } else {
      return std::nullopt;
    }
  }
}

std::optional<LoraTarget> LoraKeyMapper::xlabs_module(const std::string& name) const {
  const auto pos = name.find(".processor.");
  if (pos == std::string::npos) return std::nullopt;
  const std::string block = name.substr(0, pos);
  const std::string proc = name.substr(pos + 11);
  // 1 = image stream, 2 = text stream; a single block's qkv_lora covers linear1's q, k, v rows only.
  static const std::map<std::string, std::string> kDouble = {{"qkv_lora1", "img_attn.qkv"},
                                                             {"qkv_lora2", "txt_attn.qkv"},
                                                             {"proj_lora1", "img_attn.proj"},
                                                             {"proj_lora2", "txt_attn.proj"}};
  if (block.starts_with("double_blocks.")) {
    auto it = kDouble.find(proc);
    return it == kDouble.end() ? std::nullopt : whole_module(block + "." + it->second);
  }
  if (block.starts_with("single_blocks.")) {
    if (proc == "proj_lora") return whole_module(block + ".linear2");
    if (proc != "qkv_lora") return std::nullopt;
    auto t = whole_module(block + ".linear1");
    if (t) {
      t->rows = 3 * inner_dim_;
      t->blocks = {{0, t->rows, 0}};
    }
    return t;
  }
  return std::nullopt;
}

std::optional<LoraTarget> LoraKeyMapper::target(LoraFormat format, const std::string& stem) const {
  auto strip = [&](const std::string& prefix) -> std::optional<std::string> {
    if (!stem.starts_with(prefix)) return std::nullopt;
    return stem.substr(prefix.size());
  };
  std::optional<std::string> rest;
  switch (format) {
    case LoraFormat::Peft:
      // diffusers drops keys without the `transformer.` prefix; a bare diffusers module name is unambiguous, so
      // accept it.
      return diffusers_module(strip("transformer.").value_or(stem));
    case LoraFormat::OneTrainer:
      if (!(rest = strip("lora_transformer_"))) return std::nullopt;
      if (auto it = onetrainer_names_.find(*rest); it != onetrainer_names_.end()) return diffusers_module(it->second);
      return std::nullopt;
    case LoraFormat::Kohya:
      if (!(rest = strip("lora_unet_"))) return std::nullopt;
      return kohya_module(*rest);
    case LoraFormat::ComfyUI:
      if (!(rest = strip("diffusion_model."))) return std::nullopt;
      return whole_module(*rest);
    case LoraFormat::FalKontext:
      if (!(rest = strip("base_model.model."))) return std::nullopt;
      return whole_module(*rest);
    case LoraFormat::BflLora: return whole_module(stem);
    case LoraFormat::XLabs: return xlabs_module(strip("diffusion_model.").value_or(stem));
  }
  return std::nullopt;
}

}  // namespace fluxswap
