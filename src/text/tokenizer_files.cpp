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
