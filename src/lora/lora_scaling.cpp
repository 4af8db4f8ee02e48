#include "lora/lora_scaling.h"

#include <cmath>
#include <nlohmann/json.hpp>
#include <regex>
#include <type_traits>

#include "core/error.h"

namespace fluxswap {

namespace {

// ordered_json keeps the file's key order, which decides which pattern wins when several match.
using json = nlohmann::ordered_json;

constexpr const char* kMetadataKey = "lora_adapter_metadata";

// diffusers prefixes every LoraConfig field with the component name; accept an unprefixed dump too, as the
// transformer's (a file with text-encoder LoRAs names both components).
const json* field(const json& config, const std::string& component, const std::string& name) {
  auto find = [&](const std::string& key) -> const json* {
    auto it = config.find(key);
    return it != config.end() && !it->is_null() ? &*it : nullptr;
  };
  if (const json* v = find(component + "." + name)) return v;
  return component == "transformer" ? find(name) : nullptr;
}

template <typename T>
T typed(const json& value, const std::string& what, const std::string& path) {
  try {
    return value.get<T>();
  } catch (const json::exception&) {
    throw Error(path + ": metadata '" + kMetadataKey + "': " + what + " is " + value.dump() + ", expected a " +
                (std::is_same_v<T, bool> ? "boolean" : "number"));
  }
}

template <typename T>
std::vector<std::pair<std::string, T>> pattern(const json& config, const std::string& component,
                                               const std::string& name, const std::string& path) {
  std::vector<std::pair<std::string, T>> out;
  const json* p = field(config, component, name);
  if (!p) return out;
  if (!p->is_object())
    throw Error(path + ": metadata '" + kMetadataKey + "': " + name + " is " + p->dump() +
                ", expected an object of module pattern -> number");
  for (const auto& [key, value] : p->items()) out.emplace_back(key, typed<T>(value, name + "." + key, path));
  return out;
}

// PEFT matches a pattern key as a regex against the end of the module path: (.*\.)?(key)$.
template <typename T>
std::optional<T> match(const std::vector<std::pair<std::string, T>>& patterns, const std::string& module,
                       const std::string& path) {
  for (const auto& [key, value] : patterns) {
    try {
      if (std::regex_match(module, std::regex("(.*\\.)?(" + key + ")"))) return value;
    } catch (const std::regex_error&) {
      throw Error(path + ": metadata '" + kMetadataKey + "': pattern '" + key + "' is not a valid regular expression");
    }
  }
  return std::nullopt;
}

}  // namespace

PeftScaling PeftScaling::from_metadata(const SafetensorsFile& file, const std::string& component) {
  PeftScaling s;
  auto it = file.metadata().find(kMetadataKey);
  if (it == file.metadata().end()) return s;
  const std::string& path = file.path();
  json config;
  try {
    config = json::parse(it->second);
  } catch (const json::exception& e) {
    throw Error(path + ": metadata '" + kMetadataKey + "' is not valid JSON (" + e.what() + ")");
  }
  if (!config.is_object()) throw Error(path + ": metadata '" + kMetadataKey + "' is not a JSON object");
  s.present = true;
  if (const json* a = field(config, component, "lora_alpha")) s.alpha = typed<double>(*a, "lora_alpha", path);
  if (const json* r = field(config, component, "r")) s.rank = typed<int64_t>(*r, "r", path);
  if (const json* rs = field(config, component, "use_rslora")) s.rslora = typed<bool>(*rs, "use_rslora", path);
  s.alpha_pattern = pattern<double>(config, component, "alpha_pattern", path);
  s.rank_pattern = pattern<int64_t>(config, component, "rank_pattern", path);
  return s;
}

float lora_pair_scale(LoraFormat format, const LoraTarget& target, int64_t rank, std::optional<double> alpha,
                      const PeftScaling& peft, const std::string& path, const std::string& down_key) {
  if (format == LoraFormat::Peft && peft.present) {
    const std::string& module = target.diffusers_module;
    std::optional<int64_t> declared = match(peft.rank_pattern, module, path);
    if (!declared) declared = peft.rank;
    if (declared && *declared != rank)
      throw Error(path + ": '" + down_key + "' has rank " + std::to_string(rank) + " but metadata '" + kMetadataKey +
                  "' declares r = " + std::to_string(*declared) + " for '" + module + "'");
    std::optional<double> a = match(peft.alpha_pattern, module, path);
    if (!a) a = peft.alpha;
    if (a) return float(*a / (peft.rslora ? std::sqrt(double(rank)) : double(rank)));
  }
  // kohya reads alpha 0 as "no alpha" (alpha = rank); a zero scale would silently disable the pair.
  if (alpha && *alpha != 0.0) return float(*alpha / double(rank));
  return 1.0f;
}

}  // namespace fluxswap
