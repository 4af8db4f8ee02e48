#include "text/tokenizer_files.h"

#include <filesystem>
#include <fstream>
#include <iterator>

#include "core/error.h"

namespace fluxswap::detail {

std::string read_tokenizer_file(const std::string& path, const char* what) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    throw Error("cannot read " + path + " (" + what + "): no such file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read " + path + " (" + what + "): cannot open it");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw Error("cannot read " + path + " (" + what + "): I/O error");
  return text;
}

nlohmann::json read_tokenizer_json(const std::string& path, const char* what) {
  const std::string text = read_tokenizer_file(path, what);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + " (" + what + "): expected JSON: " + e.what());
  }
}

nlohmann::json read_tokenizer_json_model(const std::string& path, const char* model_type, const char* who) {
  const std::string source = path + " (tokenizer.json)";
  nlohmann::json root = read_tokenizer_json(path, "tokenizer.json");
  if (!root.is_object() || !root.contains("model") || !root["model"].is_object()) {
    throw Error(source + ": expected an object with a \"model\" object");
  }
  const std::string type = root["model"].value("type", std::string());
  if (type != model_type) {
    throw Error(source + ": expected model.type \"" + model_type + "\" for a " + who + " tokenizer, got \"" + type +
                "\"");
  }
  return root;
}

std::vector<std::pair<std::string, int32_t>> parse_added_tokens(const nlohmann::json& root,
                                                                const std::string& source) {
  std::vector<std::pair<std::string, int32_t>> added;
  if (!root.contains("added_tokens")) return added;
  const nlohmann::json& list = root["added_tokens"];
  if (!list.is_array()) throw Error(source + ": added_tokens must be an array");
  for (const nlohmann::json& a : list) {
    if (!a.is_object() || !a.contains("content") || !a["content"].is_string() || !a.contains("id") ||
        !a["id"].is_number_integer() || a["id"].get<int64_t>() < 0) {
      throw Error(source + ": added_tokens entries need a string \"content\" and an integer \"id\", got " + a.dump());
    }
    added.emplace_back(a["content"].get<std::string>(), a["id"].get<int32_t>());
  }
  return added;
}

std::optional<std::string> special_token_field(const nlohmann::json& object, const std::string& key,
                                               const std::string& path) {
  if (!object.is_object()) return std::nullopt;
  auto it = object.find(key);
  if (it == object.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto content = it->find("content");
    if (content != it->end() && content->is_string()) return content->get<std::string>();
  }
  throw Error(path + ": \"" + key + "\" must be a token string or an object with a string \"content\"");
}

bool file_exists(const std::string& path) {
  std::error_code ec;
  return std::filesystem::is_regular_file(path, ec);
}

}  // namespace fluxswap::detail
