#include "io/json_config.h"

#include <fstream>
#include <sstream>

namespace fluxswap {

std::string read_text_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw Error(path + ": cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

nlohmann::json parse_json_object(const std::string& text, const std::string& path) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw Error(path + ": expected a JSON object");
  return j;
}

nlohmann::json read_json_object_file(const std::string& path) { return parse_json_object(read_text_file(path), path); }

}  // namespace fluxswap
