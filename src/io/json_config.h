#pragma once
// Reading the JSON config files of a model folder (diffusers/transformers config.json, scheduler_config.json):
// every failure is an Error that names the file, and the field where one is at fault.
#include <nlohmann/json.hpp>
#include <string>

#include "core/error.h"

namespace fluxswap {

// The whole file as text; Error "<path>: cannot open" when it cannot be opened.
std::string read_text_file(const std::string& path);

// `text` parsed as a JSON object; `path` is for messages. Error "<path>: not valid JSON: <parser message>" or
// "<path>: expected a JSON object".
nlohmann::json parse_json_object(const std::string& text, const std::string& path);
// read_text_file, then parse_json_object.
nlohmann::json read_json_object_file(const std::string& path);

// Sets `out` from the field `key` of the object `j`; an absent or null field leaves `out` (the default) as it is.
// Error "<path>: field '<key>' has the wrong type (<value>)" when the value does not convert to T.
template <typename T>
void read_field(const nlohmann::json& j, const char* key, T& out, const std::string& path) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return;
  try {
    out = it->template get<T>();
  } catch (const nlohmann::json::exception&) {
    throw Error(path + ": field '" + key + "' has the wrong type (" + it->dump() + ")");
  }
}

}  // namespace fluxswap
